"""Rewrite (reduce="merge", score="tome"): a sum or mean over the tokens of a merged set counts
each token as many times as the original tokens it stands for.

Expects: `merge_tokens` has run (roles "merge", "size", "index"), the side tensors gathered, and
the nodes' recorded shapes follow the merges.
Guarantees: every `sum`/`mean` over axis 1 of a (B, K, ...) tensor whose K tokens are a merge's
(the stream after it, or a side tensor gathered with it, `repshift_fx.fx.sizes`) becomes
`size_weighted_sum` / `size_weighted_mean`, and so does one over `t[:, p:]` (the tokens after the
prefix) with the sizes from p on: a mean pooling of the output, masked or not, is then
the mean over the original tokens, as a merge's average and proportional attention already are.
A drop has no sizes: its means stay over the kept tokens.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from repshift_fx.fx.nodes import literal_arg
from repshift_fx.fx.sizes import merged_token_sets, sizes_for
from repshift_fx.method import merge

_REWRITES = {"sum": merge.size_weighted_sum, "mean": merge.size_weighted_mean}


def _token_reduction(node: torch.fx.Node) -> str | None:
    """"sum" or "mean" for `x.sum(1)`, `torch.mean(x, dim=(1,))` and the like (no dtype), else None."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", None) if node.target in (torch.sum, torch.mean) else None
    else:
        return None
    if name not in _REWRITES or not node.args or set(node.kwargs) - {"dim", "keepdim"}:
        return None
    dim = literal_arg(node, 1, "dim")
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    return name if dims == (1,) and len(node.args) <= 3 else None


def _without_prefix(x: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(t, p) for `x = t[:, p:]` (a pooling that leaves out the prefix tokens), else None."""
    if x.op != "call_function" or x.target is not operator.getitem or not isinstance(x.args[0], torch.fx.Node):
        return None
    index = x.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], slice)
            and isinstance(index[1].start, int) and index[1].stop is None and index[1].step is None):
        return None
    return x.args[0], index[1].start


def _sizes_of(gm: torch.fx.GraphModule, x: torch.fx.Node, token_sets, before: torch.fx.Node) -> torch.fx.Node | None:
    """The sizes of x's tokens: a merged set's, or for `t[:, p:]` those of t's tokens from p on."""
    size = sizes_for(x, token_sets)
    sliced = _without_prefix(x) if size is None else None
    if sliced is None or (size := sizes_for(sliced[0], token_sets)) is None:
        return size
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(operator.getitem, (size, (slice(None), slice(sliced[1], None))))


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    token_sets = merged_token_sets(gm)
    if not token_sets:
        return gm
    rewritten = 0
    for node in list(gm.graph.nodes):
        kind = _token_reduction(node)
        if kind is None or not isinstance(node.args[0], torch.fx.Node):
            continue
        size = _sizes_of(gm, node.args[0], token_sets, node)
        if size is None:
            continue
        keepdim = bool(literal_arg(node, 2, "keepdim"))
        with gm.graph.inserting_before(node):
            weighted = gm.graph.call_function(_REWRITES[kind], (node.args[0], size, keepdim))
        weighted.meta.update(node.meta)
        node.replace_all_uses_with(weighted)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        ctx.notes.append(f"{rewritten} sum(s) or mean(s) over merged tokens weigh each token by its size")
    gm.graph.lint()
    gm.recompile()
    return gm
