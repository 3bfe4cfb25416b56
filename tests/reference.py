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


def prune(x, scores, prefix, keep, fuse=False):
    """Keep the prefix and the ceil(keep * n) best-scored other tokens, in order, per sample.
    fuse: append one token, the dropped tokens averaged with softmax(their scores) as weights."""
    n = x.shape[1] - prefix
    k = math.ceil(round(keep * n, 9))
    rows = []
    for b in range(x.shape[0]):
        best = scores[b, prefix:].argsort(descending=True)[:k].sort().values + prefix
        row = [x[b, :prefix], x[b, best]]
        dropped = [i for i in range(prefix, x.shape[1]) if i not in set(best.tolist())]
        if fuse and dropped:
            weights = torch.softmax(scores[b, dropped], dim=0)
            row.append((weights[:, None] * x[b, dropped]).sum(0, keepdim=True))
        rows.append(torch.cat(row))
    return torch.stack(rows)


def attention_weights(attn, x):
    """softmax(q k^T * scale) of a timm Attention module on its (normed) input: (B, H, N, N)."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale, dim=-1)


def cls_attention(weights, prefix):
    """EViT importance: the CLS row averaged over heads; without prefix tokens, the mean column."""
    if prefix:
        return weights[:, :, 0, :].mean(1)
    return weights.mean(2).mean(1)


@torch.no_grad()
def reference_forward(model, img, at, keep, site="mlp", kind="l2", residual=False, score="shift", prefix=None,
                      fuse=False):
    prefix = model.num_prefix_tokens if prefix is None else prefix
    keeps = keep if isinstance(keep, (tuple, list)) else [keep] * len(at)
    schedule = dict(zip(at, keeps))
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    for i, blk in enumerate(model.blocks):
        block_in = x
        if hasattr(blk, "ffns"):  # ParallelThingsBlock: parallel attentions, then parallel MLPs, each summed
            attn_out = sum(attn(x) for attn in blk.attns)
            mid = x + attn_out
            mlp_out = sum(ffn(mid) for ffn in blk.ffns)
        else:
            attn_out = blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            mid = x + attn_out
            mlp_out = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(mid))))
        x = mid + mlp_out
        if i not in schedule:
            continue
        if score == "norm":
            scores = (x * x).sum(-1).sqrt()
        elif score == "attention":
            scores = cls_attention(attention_weights(blk.attn, blk.norm1(block_in)), prefix)
        elif site == "mlp":
            scores = distance(x if residual else mlp_out, mid, kind)
        elif site == "attn":
            scores = distance(mid if residual else attn_out, block_in, kind)
        else:
            scores = distance(x, block_in, kind)
        x = prune(x, scores, prefix, schedule[i], fuse)
    return model.forward_head(model.norm(x))


@torch.no_grad()
def reference_torchvision_vit(model, img, at, keep, fuse=False):
    """torchvision's VisionTransformer by hand, pruned by the CLS attention of nn.MultiheadAttention."""
    schedule = dict(zip(at, keep if isinstance(keep, (tuple, list)) else [keep] * len(at)))
    x = model._process_input(img)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1) + model.encoder.pos_embedding
    for i, layer in enumerate(model.encoder.layers):
        y = layer.ln_1(x)
        y, weights = layer.self_attention(y, y, y, need_weights=True, average_attn_weights=True)
        x = x + y
        x = x + layer.mlp(layer.ln_2(x))
        if i in schedule:
            x = prune(x, weights[:, 0, :], 1, schedule[i], fuse)
    return model.heads(model.encoder.ln(x)[:, 0])
