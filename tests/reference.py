"""A plain eager implementation of Representation Shift pruning on timm ViTs: the test oracle.

It loops over the model's blocks by hand and prunes with per-sample indexing, sharing no code
with repshift_fx.
"""
import math

import torch


def distance(changed, reference, kind):
    diff = changed - reference
    if kind == "l2":
        return (diff * diff).sum(-1).sqrt()
    if kind == "l1":
        return diff.abs().sum(-1)
    dot = (changed * reference).sum(-1)
    return 1 - dot / (changed.norm(dim=-1) * reference.norm(dim=-1)).clamp_min(1e-8)


def prune(x, scores, prefix, keep):
    """Keep the prefix and the ceil(keep * n) best-scored other tokens, in order, per sample."""
    n = x.shape[1] - prefix
    k = math.ceil(round(keep * n, 9))
    rows = []
    for b in range(x.shape[0]):
        best = scores[b, prefix:].argsort(descending=True)[:k].sort().values + prefix
        rows.append(torch.cat([x[b, :prefix], x[b, best]]))
    return torch.stack(rows)


@torch.no_grad()
def reference_forward(model, img, at, keep, site="mlp", kind="l2", residual=False, score="shift", prefix=None):
    prefix = model.num_prefix_tokens if prefix is None else prefix
    keeps = keep if isinstance(keep, (tuple, list)) else [keep] * len(at)
    schedule = dict(zip(at, keeps))
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    for i, blk in enumerate(model.blocks):
        block_in = x
        attn_out = blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
        mid = x + attn_out
        mlp_out = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(mid))))
        x = mid + mlp_out
        if i not in schedule:
            continue
        if score == "norm":
            scores = (x * x).sum(-1).sqrt()
        elif site == "mlp":
            scores = distance(x if residual else mlp_out, mid, kind)
        elif site == "attn":
            scores = distance(mid if residual else attn_out, block_in, kind)
        else:
            scores = distance(x, block_in, kind)
        x = prune(x, scores, prefix, schedule[i])
    return model.forward_head(model.norm(x))
