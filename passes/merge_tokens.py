"""Rewrite (reduce="merge", score="tome"): each drop's gather becomes a size-weighted merge.

Expects: `insert_pruning`'s nodes, `repshift_index_b` and `repshift_keep_b = gather_tokens(x, index)`
(with score="tome", `repshift_match_b` = bipartite_soft_matching), and `padding_scores`.
Guarantees, for each drop b, in order:

    repshift_assign_b = assign_to_kept(metric, index, prefix, real[, size]) | getitem(repshift_match_b, 1)
    repshift_merge_b  = merge_tokens(x, size, assign, K)      size: ones, or the previous drop's
    repshift_merged_b = getitem(merge, 0)   in place of repshift_keep_b (role "keep")
    repshift_size_b   = getitem(merge, 1)   (role "size": `proportional_attention` reads it)

Each leaving token folds into its most similar kept token, by the cosine of the attention keys
of the block that scored it (ToMe's metric) or of the stream (`config.merge_metric`), or by Ward's
cost on the stream (merge_metric="ward": the matching or the assignment then also reads the sizes,
`size=`, the ones the merge weighs by); prefix
tokens, tokens kept in place for a read by position (`repshift_pinned_b`) and padding never
absorb or get absorbed. The kept tokens keep their order: a merge changes values, not places.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

from repshift_fx.context import Role, find_inserted, mark
from repshift_fx.fx.nodes import keys_before
from repshift_fx.method import merge
from repshift_fx.passes.padding_scores import real_tokens


def merges(config) -> bool:
    return config.reduce == "merge" or config.score == "tome"


def _metric(graph, x: torch.fx.Node, config, notes: list, block: int) -> torch.fx.Node:
    if config.merge_metric == "keys":
        key = keys_before(x)
        if key is not None:
            with graph.inserting_after(x):
                return graph.call_function(merge.key_metric, (key,))
        notes.append(f"block {block}: no attention keys over its tokens before the merge (none, or spatially "
                     "reduced); the stream is the metric there")
    return x


def _assignment(gm, drop, index, x, size, config, notes) -> torch.fx.Node:
    graph, name = gm.graph, f"repshift_assign_{drop.block}"
    ward = {"size": size} if config.merge_metric == "ward" else {}
    if config.score == "tome":
        match = find_inserted(gm, Role.MATCH, drop.block)
        match.kwargs = {**match.kwargs, **ward}
        return graph.create_node("call_function", operator.getitem, (match, 1), name=name)
    real = real_tokens(index)
    valid = graph.call_function(operator.ne, (real, 0)) if real is not None else None
    pinned = find_inserted(gm, Role.PINNED, drop.block)
    if pinned is not None:  # a token kept in place for a read by position absorbs nothing
        free = graph.call_function(operator.invert, (pinned,))
        valid = free if valid is None else graph.call_function(operator.and_, (valid, free))
    metric = _metric(graph, x, config, notes, drop.block)
    return graph.create_node("call_function", merge.assign_to_kept, (metric, index, drop.prefix, valid), ward,
                             name=name)


def _insert_merge(gm, drop, config, size, notes) -> torch.fx.Node:
    graph, b = gm.graph, drop.block
    kept = find_inserted(gm, Role.KEEP, b)
    x, index = kept.args
    if size is None:
        with graph.inserting_after(x):
            size = graph.call_function(merge.unit_sizes, (x,))
    with graph.inserting_before(kept):
        assign = _assignment(gm, drop, index, x, size, config, notes)
        merged = graph.create_node("call_function", merge.merge_tokens, (x, size, assign, drop.out),
                                   name=f"repshift_merge_{b}")
        tokens = graph.create_node("call_function", operator.getitem, (merged, 0), name=f"repshift_merged_{b}")
        new_size = graph.create_node("call_function", operator.getitem, (merged, 1), name=f"repshift_size_{b}")
    for node, role in ((assign, Role.ASSIGN), (merged, Role.MERGE), (tokens, Role.KEEP), (new_size, Role.SIZE)):
        mark(node, role, b)
    kept.replace_all_uses_with(tokens)
    graph.erase_node(kept)
    return new_size


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    config = ctx.plan.config
    if not merges(config) or not ctx.plan.drops:
        return gm
    size = None
    restored = {d.block: end for end, drops in ctx.plan.restore_at for d in drops}
    previous = None
    for drop in ctx.plan.drops:
        if previous is not None and restored.get(previous.block, drop.block) < drop.block:
            size = None  # a new stage after a restore: every token holds one again
        size = _insert_merge(gm, drop, config, size, ctx.notes)
        previous = drop
    how = ("ToMe's bipartite matching, " if config.score == "tome" else "") + (
        "Ward's cost on the stream" if config.merge_metric == "ward" else f"cosine of the {config.merge_metric}")
    ctx.notes.append(f"merge: each leaving token folds into a kept token ({how}), size-weighted; attention after a "
                     f"merge adds log(size) ({'an extra q/k column' if config.size_attention == 'qk' else 'attn_mask'})")
    gm.graph.lint()
    gm.recompile()
    return gm
