"""The method itself, as plain functions the pruning pass inserts into the graph.

    scores = representation_shift(changed, reference)      # (B, N)
    index  = select_tokens(scores, prefix, keep)            # (B, prefix + keep)
    tokens = gather_tokens(x, index)                        # (B, prefix + keep, C)
    tokens = fuse_dropped(x, scores, index)                 # (B, prefix + keep + 1, C)  (fuse=True)

Tokens kept in place among the others (ViM's class token in the middle, read by position after
the last block): `pinned_tokens` marks them for `select_tokens`, `carry_origin` follows every
token's original position through the drops, and `read_tokens` finds them again for the read.

Baselines: `token_norm`, `random_scores`, and the EViT-style attention importance
(repshift_fx/method/attention.py). Merging instead of dropping: repshift_fx/method/merge.py.

Representation Shift (Choi et al., ICCV 2025): a token that a layer changes little carries little
new information and can be dropped. With the default site, `changed` is MLP(LN(x')) and
`reference` is x', the residual stream entering the MLP sub-layer.
"""
from __future__ import annotations

import torch

from repshift_fx.method.distance import channel_distance


def representation_shift(changed: torch.Tensor, reference: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """D(changed_i, reference_i) per token, over the channel axis: (B, N, C), (B, N, C) -> (B, N)."""
    return channel_distance(changed, reference, distance, dim=-1)


def token_norm(tokens: torch.Tensor) -> torch.Tensor:
    """Baseline score: the L2 norm of each token. (B, N, C) -> (B, N)."""
    return torch.linalg.vector_norm(tokens, ord=2, dim=-1)


def random_scores(tokens: torch.Tensor) -> torch.Tensor:
    """Baseline score: uniform noise, a fresh draw per call. (B, N, C) -> (B, N)."""
    return torch.rand(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype)


def select_tokens(scores: torch.Tensor, prefix: int, keep: int, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the tokens kept: the `prefix` first ones, then the `keep` best-scored others,
    in their original order; `pinned` (B, N) bool: tokens kept whatever their score (counted in
    `keep`). (B, N) -> (B, prefix + keep), int64."""
    if pinned is not None:
        scores = scores.masked_fill(pinned, float("inf"))
    best = scores[:, prefix:].topk(keep, dim=1, sorted=False).indices
    best = best.sort(dim=1).values + prefix
    head = torch.arange(prefix, device=scores.device).expand(scores.shape[0], prefix)
    return torch.cat([head, best], dim=1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens at `index`, per sample: (B, N, ...) and (B, K) -> (B, K, ...)."""
    trailing = tokens.shape[2:]
    index = index.reshape(index.shape + (1,) * len(trailing)).expand(-1, -1, *trailing)
    return tokens.gather(1, index)  # take_along_dim would pin the batch size under dynamo


def fuse_dropped(tokens: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """EViT fusion: the kept tokens, then one token folding in all the dropped ones.

    The fused token is the average of the dropped tokens weighted by the softmax of their scores
    (over the dropped tokens of each sample). When nothing is dropped, the kept tokens alone.
    (B, N, C), (B, N), (B, K) -> (B, K + 1, C) (or (B, N, C) when K = N)."""
    kept = gather_tokens(tokens, index)
    if index.shape[1] == tokens.shape[1]:
        return kept
    dropped = torch.ones(scores.shape, dtype=torch.bool, device=scores.device).scatter(1, index, False)
    weights = scores.masked_fill(~dropped, float("-inf")).softmax(dim=1).to(tokens.dtype)
    fused = (weights.unsqueeze(-1) * tokens).sum(dim=1, keepdim=True)
    return torch.cat([kept, fused], dim=1)


def pinned_tokens(scores: torch.Tensor, positions: tuple[int, ...], origin: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N) bool: the tokens whose original position is one of `positions`; `origin` (B, N): each
    token's original position (`carry_origin`), None before any drop (the position itself)."""
    if origin is None:
        origin = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape)
    pinned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for position in positions:
        pinned = pinned | (origin == position)
    return pinned


def carry_origin(origin: torch.Tensor | None, index: torch.Tensor, fused: int = 0) -> torch.Tensor:
    """The original position of each token a drop keeps: (B, N) or None (no drop yet), (B, K) ->
    (B, K), and -1 for the token `fuse_dropped` appends."""
    kept = index if origin is None else origin.gather(1, index)
    return torch.cat([kept, kept.new_full((kept.shape[0], fused), -1)], dim=1) if fused else kept


def read_tokens(tokens: torch.Tensor, origin: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
    """The tokens that stood at `positions` before the drops, wherever each sample kept them:
    (B, K, ...), (B, K) -> (B, len(positions), ...)."""
    where = torch.stack([(origin == p).to(torch.int8).argmax(dim=1) for p in positions], dim=1)
    return gather_tokens(tokens, where)
