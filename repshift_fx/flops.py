"""FLOPs of what actually runs, counted by `torch.utils.flop_counter` on the example input.

Figures are multiply-accumulates (the convention of the paper and of fvcore: DeiT-S = 4.6
GFLOPs), i.e. half of what `FlopCounterMode` reports. The CPU flash-attention kernel that SDPA
dispatches to on this machine has no formula in torch; it gets the standard SDPA one.

    per_sample_gmacs(model, args)                    -> 4.599      (whole model)
    node_macs(gm, args)                              -> {node name: MACs}   (one graph run)
    breakdown(gm, args, analysis)                    -> FlopBreakdown (per block + outside)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from repshift_fx.context import inserted
from repshift_fx.capture import capture
from repshift_fx.fx.nodes import module_path, within_module

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


class _TotalsOnly:
    """Stands in for FlopCounterMode's module tracker: only the total is read here, and the
    tracker's grad hooks fail ("Expected gradient function to be set") on a view of a parameter
    made under no_grad that enters a module, as timm's attention pooling does with its latent."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _counter() -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA)
    counter.mod_tracker = _TotalsOnly()
    return counter


def count_macs(fn, args: tuple) -> int:
    """Multiply-accumulates of one call `fn(*args)` (whatever the batch in `args`)."""
    with torch.no_grad(), _counter() as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def first_sample(args: tuple) -> tuple:
    """(B, ...) tensors -> (1, ...): FLOPs are reported per sample."""
    return tuple(a[:1] for a in args)


def per_sample_gmacs(fn, args: tuple) -> float:
    """GMACs ("GFLOPs" in the paper's sense) per sample, counted on the first sample of `args`."""
    return count_macs(fn, first_sample(args)) / 1e9


class _NodeCounter(torch.fx.Interpreter):
    """Runs a graph inside one FlopCounterMode and notes how much each node added."""

    def __init__(self, gm: torch.fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.macs: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node):
        start = self.counter.get_total_flops()
        result = super().run_node(n)
        self.macs[n.name] = (self.counter.get_total_flops() - start) // 2
        return result


def node_macs(gm: torch.fx.GraphModule, args: tuple) -> dict[str, int]:
    """MACs of every node of `gm` for one call on the first sample of `args`: {node name: MACs}."""
    with torch.no_grad(), _counter() as counter:
        runner = _NodeCounter(gm, counter)
        runner.run(*first_sample(args))
    return runner.macs


@dataclass
class FlopBreakdown:
    """GMACs per sample: the whole graph, each block, and what lies outside every block
    (patch embedding, head, ...). `sum(blocks) + outside == total`."""

    total: float
    blocks: list[float]
    outside: float


def block_of_nodes(gm: torch.fx.GraphModule, analysis, known: set[str] | None = None) -> dict[str, int | None]:
    """The block (index) each node of `gm` belongs to, None outside every block.

    A node belongs to block i when it is one of the block's branch nodes (as found by the
    analysis), was inserted for block i's drop (`repshift_fx.context.inserted`), or was traced inside
    block i's module. Nodes a rewrite created (not in `known`) and that match none of these
    (an SDPA node in a model without submodules) take the block of their first user.
    """
    by_name: dict[str, int] = {}
    for block in analysis.blocks:
        for site in (block.mixer, block.mlp):
            if site is not None:
                by_name.update(dict.fromkeys(site.nodes, block.index))
    modules = [(block.module, block.index) for block in analysis.blocks]
    owner: dict[str, int | None] = {}
    orphans = []
    for node in gm.graph.nodes:
        found = (inserted(node).block if inserted(node) else by_name.get(node.name))
        if found is None:
            path = module_path(node)
            found = next((i for prefix, i in modules if within_module(path, prefix)), None)
        owner[node.name] = found
        if found is None and known is not None and node.name not in known:
            orphans.append(node)
    for node in reversed(orphans):
        owner[node.name] = next((owner[u.name] for u in node.users if owner.get(u.name) is not None), None)
    return owner


def breakdown(gm: torch.fx.GraphModule, args: tuple, analysis, known: set[str] | None = None) -> FlopBreakdown:
    """Per-sample GMACs of `gm` on `args`, split by block (see `block_of_nodes`)."""
    macs = node_macs(gm, args)
    owner = block_of_nodes(gm, analysis, known)
    per_block = [0] * len(analysis.blocks)
    outside = 0
    for name, value in macs.items():
        if owner.get(name) is None:
            outside += value
        else:
            per_block[owner[name]] += value
    return FlopBreakdown(sum(macs.values()) / 1e9, [v / 1e9 for v in per_block], outside / 1e9)


def before_and_after(model: torch.nn.Module, gm: torch.fx.GraphModule, ctx) -> tuple[FlopBreakdown, FlopBreakdown]:
    """Per-block GMACs of the model as traced (before any rewrite) and of the rewritten `gm`.

    The model is traced again: the pipeline rewrote its first trace in place. Tracing is
    deterministic, so node names match the ones the analysis recorded.
    """
    original, _ = capture(model, ctx.args, train=ctx.config.train)
    known = {node.name for node in original.graph.nodes}
    return breakdown(original, ctx.args, ctx.analysis), breakdown(gm, ctx.args, ctx.analysis, known)
