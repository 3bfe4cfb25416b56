"""A plain eager implementation of line-wise Representation Shift on torchvision ResNets: the oracle.

It runs the network's layers by hand, scores each position across the block, averages along
rows and columns, and keeps the best lines per sample with plain indexing. It shares no code
with repshift_fx.
"""
import math

import torch


def position_scores(out, reference, kind="l2"):
    """(B, C, H, W) x 2 -> (B, H, W)."""
    diff = out - reference
    if kind == "l2":
        return (diff * diff).sum(1).sqrt()
    if kind == "l1":
        return diff.abs().sum(1)
    dot = (out * reference).sum(1)
    return 1 - dot / (out.norm(dim=1) * reference.norm(dim=1)).clamp_min(1e-8)


def keep_lines(x, positions, rate_rows, rate_cols):
    """Keep ceil(rate * H) rows and ceil(rate * W) columns of x, best mean score first, in order."""
    height, width = x.shape[2:]
    k_rows = math.ceil(round(rate_rows * height, 9))
    k_cols = math.ceil(round(rate_cols * width, 9))
    kept = []
    for b in range(x.shape[0]):
        rows = positions[b].mean(1).argsort(descending=True)[:k_rows].sort().values
        cols = positions[b].mean(0).argsort(descending=True)[:k_cols].sort().values
        kept.append(x[b][:, rows][:, :, cols])
    return torch.stack(kept)


@torch.no_grad()
def resnet_reference(model, img, at, keep, kind="l2", score="shift"):
    """torchvision ResNet forward, pruning rows and columns after the blocks in `at`."""
    keeps = keep if isinstance(keep, list) else [keep] * len(at)
    schedule = {i: (k, k) if isinstance(k, float) else k for i, k in zip(at, keeps)}
    x = model.maxpool(model.relu(model.bn1(model.conv1(img))))
    index = 0
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            shortcut = block.downsample(x) if block.downsample is not None else x
            if hasattr(block, "conv3"):  # Bottleneck
                branch = block.relu(block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))))
                branch = block.bn3(block.conv3(branch))
            else:  # BasicBlock
                branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
            x = block.relu(branch + shortcut)
            if index in schedule:
                positions = position_scores(x, shortcut, kind) if score == "shift" else x.norm(dim=1)
                x = keep_lines(x, positions, *schedule[index])
            index += 1
    return model.fc(torch.flatten(model.avgpool(x), 1))
