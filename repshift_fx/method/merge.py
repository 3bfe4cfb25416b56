"""Token merging as plain functions the pruning pass inserts into the graph.

    assignment = assign_to_kept(metric, kept_index, prefix, valid)   # (B, N) in 0..K
    merged, merged_size = merge_tokens(x, size, assignment, K)       # (B, K, C), (B, K)
    restored = unmerge(merged, assignment)                           # (B, N, C)

An assignment maps every original token to the kept position it ends up in; the value K means
"discarded": the token contributes nothing to any kept token (padding, or nowhere to go).
Sizes count how many original tokens a token holds, so successive merges stay an exact mean over
the original tokens, and proportional attention (ToMe, Bolya et al., ICLR 2023) adds log(size)
to the logits. `bipartite_soft_matching` is ToMe's matching, with the kept tokens left in order.
Given the tokens' sizes, both matchings minimise Ward's cost instead of maximising the cosine:
merging a token of size s_a into one of size s_b adds s_a s_b / (s_a + s_b) ||x_a - x_b||^2 to
the squared error of the stream, so "most similar" means "changes the tokens least when averaged".

All shapes are static and there is no data-dependent Python control flow: the functions trace
with torch.fx.symbolic_trace and compile with torch.compile(fullgraph=True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _positions_in_kept(kept_index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, K) sorted positions -> (B, N): the kept position of each original token, -1 if it leaves."""
    b, k = kept_index.shape
    own = torch.arange(k, device=kept_index.device).expand(b, k)
    return torch.full((b, n), -1, dtype=torch.long, device=kept_index.device).scatter(1, kept_index, own)


def similarity(a: torch.Tensor, b: torch.Tensor, size_a: torch.Tensor | None = None,
               size_b: torch.Tensor | None = None) -> torch.Tensor:
    """How alike each token of `a` is to each of `b`: (B, Na, C), (B, Nb, C) -> (B, Na, Nb).

    Without sizes the cosine (ToMe's). With sizes (B, Na), (B, Nb), minus Ward's cost
    s_a s_b / (s_a + s_b) ||a - b||^2, over its mean across the pairs of each sample, so that its
    scale is that of a cosine wherever the shift's guidance is weighed against it.
    """
    if size_a is None:
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)
    centre = a.mean(dim=1, keepdim=True)  # distances do not move; the squares lose less to rounding
    a, b = a - centre, b - centre
    squared = a.square().sum(-1, keepdim=True) + b.square().sum(-1).unsqueeze(1) - 2 * a @ b.transpose(1, 2)
    s_a, s_b = size_a.to(a.dtype).unsqueeze(2), size_b.to(a.dtype).unsqueeze(1)
    cost = squared.clamp_min(0) * s_a * s_b / (s_a + s_b)
    return -cost / cost.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def assign_to_kept(metric: torch.Tensor, kept_index: torch.Tensor, prefix: int,
                   valid: torch.Tensor | None = None, size: torch.Tensor | None = None) -> torch.Tensor:
    """Where each token goes: kept -> its own position, leaving -> the most similar kept token.

    metric (B, N, C): the stream, or attention keys averaged over heads. kept_index (B, K) int64,
    sorted, starting with the `prefix` positions 0..prefix-1. valid (B, N) bool, False = padding.
    size (B, N): the tokens' sizes, for Ward's cost (`similarity`); None: the cosine.
    Returns (B, N) int64 in 0..K. A leaving token goes to its most similar kept token that
    is not a prefix token and, with `valid`, is real; a leaving padding token, or one with no such
    kept token, gets K (discarded), so padding never mixes with real tokens.
    """
    b, n, c = metric.shape
    k = kept_index.shape[1]
    kept_metric = metric.gather(1, kept_index.unsqueeze(-1).expand(b, k, c))
    similar = similarity(metric, kept_metric, size, None if size is None else size.gather(1, kept_index))
    eligible = (torch.arange(k, device=metric.device) >= prefix).view(1, 1, k)
    if valid is not None:
        eligible = eligible & valid.gather(1, kept_index).unsqueeze(1) & valid.unsqueeze(2)
    best, target = similar.masked_fill(~eligible, float("-inf")).max(dim=-1)
    target = torch.where(torch.isneginf(best), k, target)
    own = _positions_in_kept(kept_index, n)
    return torch.where(own >= 0, own, target)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, assignment: torch.Tensor,
                 kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of the tokens assigned to each kept token.

    x (B, N, C), size (B, N) (original tokens each holds; ones at the start), assignment (B, N) in
    0..kept (kept = discarded). Returns merged (B, kept, C) and merged_size (B, kept), dtype of size.
    """
    b, n, c = x.shape
    weight = size.to(x.dtype)
    total = x.new_zeros(b, kept + 1, c).scatter_add(1, assignment.unsqueeze(-1).expand(b, n, c),
                                                    x * weight.unsqueeze(-1))
    merged_size = size.new_zeros(b, kept + 1).scatter_add(1, assignment, size)[:, :kept]
    return total[:, :kept] / merged_size.to(x.dtype).unsqueeze(-1), merged_size


def unmerge(y: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Every original token takes the value of the kept token it went into (discarded: zeros).

    y (B, K, C), assignment (B, N) in 0..K -> (B, N, C).
    """
    b, k, c = y.shape
    padded = torch.cat([y, y.new_zeros(b, 1, c)], dim=1)
    return padded.gather(1, assignment.unsqueeze(-1).expand(b, assignment.shape[1], c))


def restore_dropped(y: torch.Tensor, kept_index: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Drop mode: kept tokens take their current value, dropped ones keep `before`.

    y (B, K, C), kept_index (B, K), before (B, N, C) (the values when the tokens were dropped).
    """
    return before.scatter(1, kept_index.unsqueeze(-1).expand_as(y), y)


def bipartite_soft_matching(metric: torch.Tensor, r: int, prefix: int, valid: torch.Tensor | None = None,
                            shift: torch.Tensor | None = None, weight: float = 0.0,
                            size: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe: merge the r tokens of set A most similar to a token of set B into it.

    metric (B, N, C). A holds the non-prefix tokens at even positions, B those at odd positions
    (ToMe's split: with a class token, or class + distillation tokens, the same sets). Needs
    0 <= r <= min(len(A), len(B)). Returns kept_index (B, N - r) sorted, so the kept tokens keep their order
    (ToMe concatenates unmerged A then B), and the assignment (B, N) of `assign_to_kept`.
    valid (B, N) bool, False = padding: padding pairs only with padding, and merges first.
    shift (B, N): each token's representation shift in the block before, how far that block moved
    it (`shift_guidance`); an A token then leaves by
    its similarity less `weight` times its shift over the mean shift of A, so that of two equally
    redundant tokens the one the layers still change stays.
    size (B, N): the tokens' sizes: the pairs are then ranked by Ward's cost (`similarity`), not the cosine.
    """
    b, n, _ = metric.shape
    a_pos = torch.arange(prefix + prefix % 2, n, 2, device=metric.device)
    b_pos = torch.arange(prefix + 1 - prefix % 2, n, 2, device=metric.device)
    sizes = (None, None) if size is None else (size[:, a_pos], size[:, b_pos])
    similar = similarity(metric[:, a_pos], metric[:, b_pos], *sizes)
    if valid is not None:
        a_valid, b_valid = valid[:, a_pos], valid[:, b_pos]
        similar = similar.masked_fill(a_valid.unsqueeze(2) != b_valid.unsqueeze(1), float("-inf"))
        padding_pairs = ~a_valid.unsqueeze(2) & ~b_valid.unsqueeze(1)
        similar = similar.masked_fill(padding_pairs, 2.0)  # above any cosine or -cost: padding merges first
    similar = F.pad(similar, (0, 1), value=float("-inf"))  # a maximum even where B is empty (then r == 0)
    best, partner = similar.max(dim=-1)
    partner = partner.clamp(max=b_pos.shape[0] - 1)
    if shift is not None:
        a_shift = shift[:, a_pos]
        best = best - weight * a_shift / a_shift.mean(dim=1, keepdim=True).clamp_min(1e-12)
    chosen = best.argsort(dim=-1, descending=True)[:, :r]
    leaving = a_pos[chosen]
    positions = torch.arange(n, device=metric.device).expand(b, n)
    destination = positions.scatter(1, leaving, b_pos[partner.gather(1, chosen)])
    key = positions + n * torch.zeros_like(positions).scatter(1, leaving, 1)
    kept_index = key.sort(dim=-1).values[:, : n - r]
    return kept_index, _positions_in_kept(kept_index, n).gather(1, destination)


def size_bias(size: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Proportional attention as an additive attn_mask: (B, N) -> log(size) as (B, 1, 1, N).

    dtype: the query's (SDPA wants a float mask in q's dtype).
    On CPU, SDPA with this mask still runs aten::_scaled_dot_product_flash_attention_for_cpu.
    """
    return size.to(dtype).log()[:, None, None, :]


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + log size) v without an attn_mask, so flash kernels stay usable.

    q (B, H, Nq, D), k (B, H, N, D), v (B, H, N, Dv) with Dv <= D, size (B, N) -> (B, H, Nq, Dv). scale defaults to
    1/sqrt(D). q gets a column of ones and k a column log(size)/scale, then q, k and v are
    zero-padded to E = D + 1 rounded up to a multiple of 8. Why v too: on CPU (torch 2.13),
    SDPA picks aten::_scaled_dot_product_flash_attention_for_cpu only when q, k and v share the
    head dim (any dim, a multiple of 8 or not); with v narrower it falls back to
    aten::_scaled_dot_product_attention_math. The multiple of 8 is for the CUDA kernels.
    On CPU the masked form (`size_bias`) is also flash and cheaper (measured B=32, H=6, N=197,
    D=64, fp32, 1 thread: mask 1.03x, this 1.3x of unmasked SDPA: three copies, head dim 72);
    this form is for kernels that take no mask. The log(size)/scale column carries the bias at
    k's precision: fp32 rounding in fp32, coarse in bf16/fp16.
    """
    d = q.shape[-1]
    dv = v.shape[-1]
    if scale is None:
        scale = d ** -0.5
    pad = (-(d + 1)) % 8
    column, key_column = torch.zeros_like(q[..., :1]), torch.zeros_like(k[..., :1])  # Nq may differ from N
    bias = (size.to(k.dtype).log() / scale)[:, None, :, None].expand_as(key_column)
    q = torch.cat([q, torch.ones_like(column), column.expand(-1, -1, -1, pad)], dim=-1)
    k = torch.cat([k, bias, key_column.expand(-1, -1, -1, pad)], dim=-1)
    v = torch.cat([v, key_column.to(v.dtype).expand(-1, -1, -1, d + 1 + pad - dv)], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :dv]


def unit_sizes(x: torch.Tensor) -> torch.Tensor:
    """Every token holds one original token: (B, N, ...) -> (B, N) ones, in x's dtype."""
    return x.new_ones(x.shape[:2])


def key_metric(key: torch.Tensor) -> torch.Tensor:
    """ToMe's similarity metric: attention keys averaged over heads, (B, H, N, D) -> (B, N, D)."""
    return key.mean(dim=1)


def with_size_bias(attn_mask: torch.Tensor | None, size: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """An SDPA attn_mask that also adds log(size) over the keys: boolean masks (False: masked out)
    become additive first. (B, 1 | H, Nq | 1, N) or None, (B, N) -> broadcastable float mask."""
    bias = size_bias(size, query.dtype)
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    return attn_mask + bias


def size_weighted_sum(x: torch.Tensor, size: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The sum over the original tokens of a merged set: each token counted `size` times.
    x (B, K, ...), size (B, K) -> (B, ...) (keepdim: (B, 1, ...))."""
    weight = size.to(x.dtype).reshape(size.shape + (1,) * (x.dim() - 2))
    return (x * weight).sum(1, keepdim=keepdim)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """The mean over the original tokens of a merged set. x (B, K, ...), size (B, K) -> (B, ...)."""
    total = size.to(x.dtype).sum(1).reshape((size.shape[0],) + (1,) * (x.dim() - 2 + keepdim))
    return size_weighted_sum(x, size, keepdim) / total
