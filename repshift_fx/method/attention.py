"""Attention as the EViT-style baselines need it: explicit, with the importance its weights give.

    out, importance = explicit_attention(q, k, v, attn_mask, prefix=1)     # (B, H, N, Dv), (B, N)
"""
from __future__ import annotations

import torch


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
    and grouped-query heads (`enable_gqa`) as SDPA reads them; `dropout_p` (training) drops weights
    after the importance is read from them.
    (B, H, Nq, D), (B, Hk, Nk, D), (B, Hk, Nk, Dv) -> ((B, H, Nq, Dv), (B, Nk))."""
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
    importance = attention_importance(probs, prefix)
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return probs @ v, importance
