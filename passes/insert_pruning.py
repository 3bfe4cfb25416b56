"""Rewrite: insert the scoring, top-k and gather nodes of every planned drop.

Expects: `ctx.plan` (repshift_fx.plan.tokens.PrunePlan) naming nodes of this graph.
Guarantees: after each drop's block output three nodes are inserted,

    repshift_score_i = representation_shift(changed, reference) | token_norm | random_scores
    repshift_index_i = select_tokens(repshift_score_i, prefix, keep)
    repshift_keep_i  = gather_tokens(block_output, repshift_index_i)
                     | fuse_dropped(block_output, repshift_score_i, repshift_index_i)   (drop.fused)

and every later use of the block output reads `repshift_keep_i` instead. A drop with protected
tokens (`drop.protected`: read by position after the last block, ViM's middle class token) also
gets `repshift_pinned_i = pinned_tokens(score, positions, origin)` as select_tokens' `pinned`, and
`repshift_origin_i = carry_origin(origin, index)` (each kept token's original position); unless
the tokens are restored after the last drop, each read `x[:, p]` then reads
`read_tokens(x, origin, (p,))[:, 0]` (role "protect"), the token wherever each sample kept it.
With score="tome" the matching
`repshift_match_i = bipartite_soft_matching(metric, r, prefix)` chooses the kept tokens (metric: the
block's attention keys averaged over heads, or with merge_metric="stream" the stream merged); with
`shift_guidance` it also reads `repshift_guide_i`, the shift of the block before. With score="attention"
the score node is the importance `attention_scores` put inside the block (`ctx.tokens.importance`), and
only the index and keep nodes are inserted. Nothing else changes; sizes written as literals
downstream are the job of `token_shapes`.
"""
from __future__ import annotations

import operator

import torch.fx

from repshift_fx.context import mark
from repshift_fx.method import tokens as shift
from repshift_fx.fx.nodes import keys_before, nodes_by_name
from repshift_fx.method import merge

_SCORERS = {"shift": shift.representation_shift, "norm": shift.token_norm, "random": shift.random_scores}


def add_node(graph: torch.fx.Graph, drop, after: torch.fx.Node, stem: str, target, args, kwargs=None) -> torch.fx.Node:
    """`repshift_{stem}_{block}` = target(*args, **kwargs), inserted after `after`, marked with role `stem`."""
    with graph.inserting_after(after):
        node = graph.create_node("call_function", target, args, kwargs, name=f"repshift_{stem}_{drop.block}")
    mark(node, stem, drop.block)
    return node


def insert_selection(graph: torch.fx.Graph, by_name, drop, config, importance: dict, origin=None):
    """The drop's score and index nodes, after its block's output: (score, index)."""
    output = by_name[drop.after]
    if config.score == "attention":  # the importance lies inside the block, before its output
        score, anchor = by_name[importance[drop.block]], output
    else:
        inputs = tuple(by_name[name] for name in drop.score_inputs)
        kwargs = {"distance": config.distance} if config.score == "shift" else {}
        score = anchor = add_node(graph, drop, output, "score", _SCORERS[config.score], inputs, kwargs)
    pinned = None
    if drop.protected:
        pinned = anchor = add_node(graph, drop, anchor, "pinned", shift.pinned_tokens, (score, drop.protected, origin))
    index = add_node(graph, drop, anchor, "index", shift.select_tokens, (score, drop.prefix, drop.keep, pinned))
    return score, index


def _insert_drop(graph: torch.fx.Graph, by_name, drop, config, importance: dict, origin=None):
    """The drop's nodes; returns its kept tokens and the origin after it (None without protected tokens)."""
    output = by_name[drop.after]  # never an earlier drop's output: a block's output is its MLP add

    def add(after, stem, target, args, kwargs=None):
        return add_node(graph, drop, after, stem, target, args, kwargs)

    if config.score == "tome":  # ToMe: the matching chooses both who leaves and where it goes
        keys = keys_before(output) if config.merge_metric == "keys" else None  # else: the stream itself
        anchor, guidance = output, {}
        if drop.guide:  # the block before's shift holds back the tokens the layers still change
            changed, reference = (by_name[name] for name in drop.guide)
            anchor = add(output, "guide", shift.representation_shift, (changed, reference),
                         {"distance": config.distance})
            guidance = {"shift": anchor, "weight": config.shift_guidance}
        metric = add(anchor, "metric", merge.key_metric, (keys,)) if keys is not None else output
        match = add(metric if keys is not None else anchor, "match", merge.bipartite_soft_matching,
                    (metric, drop.before - drop.keep, drop.prefix), guidance)
        index = add(match, "index", operator.getitem, (match, 0))
        kept = add(index, "keep", shift.gather_tokens, (output, index))  # passes/merge_tokens makes it a merge
        output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (metric, match, kept))
        return kept, None
    score, index = insert_selection(graph, by_name, drop, config, importance, origin)
    if drop.fused:
        kept = add(index, "keep", shift.fuse_dropped, (output, score, index))
    else:
        kept = add(index, "keep", shift.gather_tokens, (output, index))
    output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (score, kept))
    if not drop.protected:
        return kept, None
    return kept, add(kept, "origin", shift.carry_origin, (origin, index, drop.fused))


def _follow_reads(gm: torch.fx.GraphModule, protected: dict, origin: torch.fx.Node) -> None:
    """Each read of protected tokens by position (x[:, p], select(x, 1, p), narrow(x, 1, p, n)) reads
    them where they now are: `read_tokens` finds them per sample, the read takes them from 0 on."""
    by_name, reads = nodes_by_name(gm), {}
    for position, names in protected.items():
        for name in names:
            reads.setdefault(name, []).append(position)
    for name, positions in reads.items():
        node = by_name[name]
        with gm.graph.inserting_before(node):
            found = gm.graph.create_node("call_function", shift.read_tokens, (node.args[0], origin, tuple(positions)),
                                         name=f"repshift_read_{positions[0]}")
        mark(found, "protect")
        node.args = (found, *_at_zero(node))


def _at_zero(node: torch.fx.Node) -> tuple:
    """The read's arguments after its source, with the token position made 0 (of the one token found)."""
    if node.target is operator.getitem:
        index = list(node.args[1])
        index[1] = 0
        return (tuple(index),)
    rest = list(node.args[1:])  # select(x, 1, p) / narrow(x, 1, p, 1)
    if len(rest) >= 2:
        rest[1] = 0
    else:
        node.kwargs = {**node.kwargs, **({"index": 0} if "index" in node.kwargs else {"start": 0})}
    return tuple(rest)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    by_name = nodes_by_name(gm)
    importance = ctx.tokens.importance
    restored = {d.block: end for end, drops in ctx.plan.restore_at for d in drops}
    origin, previous = None, None
    for drop in (d for d in ctx.plan.drops if not d.mlp_only):  # MLP-only drops: passes/mlp_only_drops.py
        if previous is not None and restored.get(previous.block, drop.block) < drop.block:
            origin = None  # every token was put back: positions are the original ones again
        kept, origin = _insert_drop(gm.graph, by_name, drop, ctx.plan.config, importance, origin)
        by_name[drop.after] = kept  # a later drop scoring against this block's output reads the kept tokens
        previous = drop
    if origin is not None and previous.block not in restored:
        _follow_reads(gm, {p: ctx.analysis.protected[p] for p in previous.protected}, origin)
        ctx.notes.append(f"protected in place: {ctx.analysis.protected_source}; every drop keeps it, in order, and "
                         "the read follows it to where each sample kept it")
    if any(drop.fused for drop in ctx.plan.drops):
        ctx.notes.append("fuse=True: each drop folds its dropped tokens into one token after the kept ones "
                         "(their average weighted by the softmax of their scores)")
    gm.graph.lint()
    gm.recompile()
    return gm
