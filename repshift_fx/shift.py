"""The method itself, as plain functions the pruning pass inserts into the graph.

    scores = representation_shift(changed, reference)      # (B, N)
    index  = select_tokens(scores, prefix, keep)            # (B, prefix + keep)
    tokens = gather_tokens(x, index)                        # (B, prefix + keep, C)
    tokens = fuse_dropped(x, scores, index)                 # (B, prefix + keep + 1, C)  (fuse=True)

Baselines: `token_norm`, `random_scores`, and the EViT-style attention importance
(`attention_importance`, computed by `explicit_attention` in the scoring block).

Representation Shift (Choi et al., ICCV 2025): a token that a layer changes little carries little
new information and can be dropped. With the default site, `changed` is MLP(LN(x')) and
`reference` is x', the residual stream entering the MLP sub-layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def representation_shift(changed: torch.Tensor, reference: torch.Tensor, distance: str = "l2") -> torch.Tensor:
    """D(changed_i, reference_i) per token, over the channel axis: (B, N, C), (B, N, C) -> (B, N)."""
    if distance == "l2":
        return torch.linalg.vector_norm(changed - reference, ord=2, dim=-1)
    if distance == "l1":
        return torch.linalg.vector_norm(changed - reference, ord=1, dim=-1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(changed, reference, dim=-1)
    raise ValueError(f"unknown distance {distance!r}")


def token_norm(tokens: torch.Tensor) -> torch.Tensor:
    """Baseline score: the L2 norm of each token. (B, N, C) -> (B, N)."""
    return torch.linalg.vector_norm(tokens, ord=2, dim=-1)


def random_scores(tokens: torch.Tensor) -> torch.Tensor:
    """Baseline score: uniform noise, a fresh draw per call. (B, N, C) -> (B, N)."""
    return torch.rand(tokens.shape[:2], device=tokens.device, dtype=tokens.dtype)


def select_tokens(scores: torch.Tensor, prefix: int, keep: int) -> torch.Tensor:
    """Indices of the tokens kept: the `prefix` first ones, then the `keep` best-scored others,
    in their original order. (B, N) -> (B, prefix + keep), int64."""
    best = scores[:, prefix:].topk(keep, dim=1, sorted=False).indices
    best = best.sort(dim=1).values + prefix
    head = torch.arange(prefix, device=scores.device).expand(scores.shape[0], prefix)
    return torch.cat([head, best], dim=1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens at `index`, per sample: (B, N, ...) and (B, K) -> (B, K, ...)."""
    trailing = tokens.shape[2:]
    index = index.reshape(index.shape + (1,) * len(trailing)).expand(-1, -1, *trailing)
    return tokens.gather(1, index)  # take_along_dim would pin the batch size under dynamo


def attention_importance(probs: torch.Tensor, prefix: int) -> torch.Tensor:
    """EViT-style importance of each token from attention weights (rows sum to one).

    With a CLS token (prefix >= 1): the first token's attention to each token, averaged over heads.
    Without one (prefix 0): the mean attention each token receives, over heads and queries.
    (B, H, Nq, Nk) or (B, Nq, Nk) (heads averaged already) -> (B, Nk)."""
    if probs.dim() == 3:
        probs = probs.unsqueeze(1)
    if prefix > 0:
        return probs[:, :, 0, :].mean(dim=1)
    return probs.mean(dim=(1, 2))


def explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, *, prefix: int = 1):
    """F.scaled_dot_product_attention computed explicitly, with the importance its weights give.

    softmax(q k^T * scale + mask) v, the mask boolean (False: masked out) or additive, `is_causal`
    and grouped-query heads (`enable_gqa`) as SDPA reads them; dropout_p must be 0 (inference).
    (B, H, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv) -> ((B, H, Nq, Dv), (B, Nk))."""
    if dropout_p:
        raise ValueError("explicit_attention is for inference: dropout_p must be 0")
    q, k, v = query, key, value
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(dim=-1)
    return probs @ v, attention_importance(probs, prefix)


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
