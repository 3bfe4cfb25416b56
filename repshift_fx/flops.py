"""FLOPs of what actually runs, counted by `torch.utils.flop_counter` on the example input.

Figures are multiply-accumulates (the convention of the paper and of fvcore: DeiT-S = 4.6
GFLOPs), i.e. half of what `FlopCounterMode` reports. The CPU flash-attention kernel that SDPA
dispatches to on this machine has no formula in torch; it gets the standard SDPA one.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _cpu_flash_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's fused inference kernel: in-projection, attention, out-projection."""
    batch, length, _ = query_shape
    source = key_shape[1]
    projections = 2 * batch * (length + 2 * source) * embed_dim * embed_dim + 2 * batch * length * embed_dim**2
    return projections + 4 * batch * length * source * embed_dim


_EXTRA = {aten._native_multi_head_attention: _native_mha}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_sdpa


def count_macs(fn, args: tuple) -> int:
    """Multiply-accumulates of one call `fn(*args)` (whatever the batch in `args`)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def per_sample_gmacs(fn, args: tuple) -> float:
    """GMACs ("GFLOPs" in the paper's sense) per sample, counted on the first sample of `args`."""
    one = tuple(a[:1] for a in args)
    return count_macs(fn, one) / 1e9
