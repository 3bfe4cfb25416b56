"""Plain eager merging on timm ViTs, the oracle of reduce="merge", score="tome" and restore.

Loops over the blocks and the samples by hand, attention written out with the sizes added to its
logits, and shares no code with repshift_fx.
"""
import math

import torch
import torch.nn.functional as F


def attention(attn, x, size):
    """A timm Attention on its (normed) input with log(size) added to the logits; also the keys
    averaged over heads (ToMe's metric). (B, N, C), (B, N) -> (B, N, C), (B, N, D)."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k) * attn.scale + size.log()[:, None, None, :]
    out = torch.einsum("bhqk,bhkd->bhqd", logits.softmax(-1), v).transpose(1, 2).reshape(batch, tokens, -1)
    return attn.proj_drop(attn.proj(attn.norm(out))), k.mean(1)


def cosine(a, b):
    return (a @ b) / (a.norm() * b.norm()).clamp_min(1e-12)


def ward_cost(a, b, size_a, size_b):
    """What merging a (of size_a original tokens) into b adds to the squared error: Ward's criterion."""
    return size_a * size_b / (size_a + size_b) * ((a - b) ** 2).sum()


def alike(metric, size, b, i, j, ward):
    """How alike tokens i and j of sample b are: the cosine, or minus Ward's cost."""
    if ward:
        return -ward_cost(metric[b, i], metric[b, j], size[b, i], size[b, j])
    return cosine(metric[b, i], metric[b, j])


class Tracker:
    """Where every original token is now: alive at a position, or frozen at its value when dropped."""

    def __init__(self, batch, tokens):
        self.where = [[("alive", i) for i in range(tokens)] for _ in range(batch)]

    def move(self, b, new_position, dropped_values=None):
        """new_position[old] -> new position (alive), or None (dropped: frozen at dropped_values[old])."""
        self.where[b] = [(s, new_position[p]) if s == "alive" and new_position[p] is not None else
                         ("frozen", dropped_values[p]) if s == "alive" else (s, p) for s, p in self.where[b]]

    def restore(self, x):
        return torch.stack([torch.stack([x[b, p] if s == "alive" else p for s, p in row])
                            for b, row in enumerate(self.where)])


def merge_step(x, size, scores, metric, prefix, keep, tracker=None, ward=False):
    """Keep the prefix and the best-scored ceil(keep * n); every other token is added into its most
    cosine-similar kept non-prefix token (`ward`: the one its merge costs least), a size-weighted mean."""
    n = x.shape[1] - prefix
    k = math.ceil(round(keep * n, 9))
    rows, sizes = [], []
    for b in range(x.shape[0]):
        kept = list(range(prefix)) + sorted((scores[b, prefix:].argsort(descending=True)[:k] + prefix).tolist())
        total = {j: size[b, j] * x[b, j] for j in kept}
        weight = {j: size[b, j].clone() for j in kept}
        destination = {j: j for j in kept}
        for i in range(prefix, x.shape[1]):
            if i in total:
                continue
            j = max(kept[prefix:], key=lambda j: alike(metric, size, b, i, j, ward))
            total[j] = total[j] + size[b, i] * x[b, i]
            weight[j] = weight[j] + size[b, i]
            destination[i] = j
        rows.append(torch.stack([total[j] / weight[j] for j in kept]))
        sizes.append(torch.stack([weight[j] for j in kept]))
        if tracker is not None:
            tracker.move(b, {i: kept.index(j) for i, j in destination.items()})
    return torch.stack(rows), torch.stack(sizes)


def drop_step(x, scores, prefix, keep, tracker):
    n = x.shape[1] - prefix
    k = math.ceil(round(keep * n, 9))
    rows = []
    for b in range(x.shape[0]):
        kept = list(range(prefix)) + sorted((scores[b, prefix:].argsort(descending=True)[:k] + prefix).tolist())
        rows.append(x[b, kept])
        tracker.move(b, {i: (kept.index(i) if i in kept else None) for i in range(x.shape[1])}, x[b])
    return torch.stack(rows)


def tome_step(x, size, metric, prefix, r, tracker=None, shift=None, guidance=0.0, ward=False):
    """ToMe's bipartite soft matching, kept tokens in their original order; with `shift` (B, N), an
    A token's similarity is lowered by `guidance` times its shift over the mean shift of A. `ward`:
    pairs ranked by minus Ward's cost over its mean across the pairs of A and B, not by the cosine."""
    rows, sizes = [], []
    tokens = x.shape[1]
    a_side = list(range(prefix + prefix % 2, tokens, 2))
    b_side = list(range(prefix + 1 - prefix % 2, tokens, 2))
    for b in range(x.shape[0]):
        best = {a: max(b_side, key=lambda j: alike(metric, size, b, a, j, ward)) for a in a_side}
        similarity = {a: alike(metric, size, b, a, best[a], ward) for a in a_side}
        if ward:
            mean = sum(ward_cost(metric[b, a], metric[b, j], size[b, a], size[b, j]) for a in a_side for j in b_side)
            similarity = {a: s / (mean / (len(a_side) * len(b_side))) for a, s in similarity.items()}
        if shift is not None:
            mean = sum(shift[b, a] for a in a_side) / len(a_side)
            similarity = {a: similarity[a] - guidance * shift[b, a] / mean for a in a_side}
        leaving = sorted(a_side, key=lambda a: -similarity[a])[:r]
        kept = [i for i in range(tokens) if i not in leaving]
        total = {j: size[b, j] * x[b, j] for j in kept}
        weight = {j: size[b, j].clone() for j in kept}
        for a in leaving:
            total[best[a]] = total[best[a]] + size[b, a] * x[b, a]
            weight[best[a]] = weight[best[a]] + size[b, a]
        rows.append(torch.stack([total[j] / weight[j] for j in kept]))
        sizes.append(torch.stack([weight[j] for j in kept]))
        if tracker is not None:
            tracker.move(b, {i: kept.index(best.get(i, i) if i in leaving else i) for i in range(tokens)})
    return torch.stack(rows), torch.stack(sizes)


def shift_mlp(mlp_out, mid):
    return ((mlp_out - mid) ** 2).sum(-1).sqrt()


@torch.no_grad()
def merge_forward(model, img, at=(), keep=0.7, metric="keys", tome_r=None, reduce="merge", per_token=False,
                  guidance=0.0):
    """The model's logits (or, with `per_token`, its normed tokens, every one restored) with the
    shift's drops merged (reduce="merge"), dropped (reduce="drop"), or ToMe (tome_r tokens per block,
    or one r per block; `guidance`: shift-guided, by the shift of the block before). `metric`: what
    a merge compares, the attention keys averaged over heads, the stream ("stream"), or the stream by
    Ward's cost ("ward")."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    prefix, size = model.num_prefix_tokens, torch.ones(x.shape[:2])
    tracker = Tracker(*x.shape[:2])
    shift = None
    for i, blk in enumerate(model.blocks):
        attn_out, keys = attention(blk.attn, blk.norm1(x), size)
        mid = x + blk.drop_path1(blk.ls1(attn_out))
        if tome_r is not None:
            mid, size = tome_step(mid, size, keys if metric == "keys" else mid, prefix,
                                  tome_r[i] if isinstance(tome_r, tuple) else tome_r, tracker,
                                  shift if guidance else None, guidance, ward=metric == "ward")
        mlp_out = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(mid))))
        shift = ((mid + mlp_out - mid) ** 2).sum(-1).sqrt()  # how far the MLP moved each token
        x = mid + mlp_out
        if i in at and reduce == "merge":
            x, size = merge_step(x, size, shift_mlp(mlp_out, mid), keys if metric == "keys" else x, prefix, keep, tracker,
                                 ward=metric == "ward")
        elif i in at:
            x = drop_step(x, shift_mlp(mlp_out, mid), prefix, keep, tracker)
            size = torch.ones(x.shape[:2])
    if per_token:
        return model.norm(tracker.restore(x))
    return model.forward_head(model.norm(x))


def proportional_reference(q, k, v, size, scale):
    """softmax(q k^T * scale + log size) v, explicit. (B, H, N, D), (B, N) -> (B, H, N, Dv)."""
    logits = q @ k.transpose(-2, -1) * scale + size.log()[:, None, None, :]
    return F.softmax(logits, dim=-1) @ v
