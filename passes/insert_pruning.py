"""Rewrite: insert the scoring, top-k and gather nodes of every planned drop.

Expects: `ctx.plan` (repshift_fx.plan.tokens.PrunePlan) naming nodes of this graph.
Guarantees: after each drop's block output three nodes are inserted,

    repshift_score_i = representation_shift(changed, reference) | token_norm | random_scores
    repshift_index_i = select_tokens(repshift_score_i, prefix, keep)
    repshift_keep_i  = gather_tokens(block_output, repshift_index_i)
                     | fuse_dropped(block_output, repshift_score_i, repshift_index_i)   (drop.fused)

and every later use of the block output reads `repshift_keep_i` instead. With score="attention"
the score node is the importance `attention_scores` put inside the block (`ctx.importance`), and
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


def _insert_drop(graph: torch.fx.Graph, by_name, drop, config, importance: dict) -> torch.fx.Node:
    output = by_name[drop.after]  # never an earlier drop's output: a block's output is its MLP add

    def add(after, stem, target, args, kwargs=None):
        with graph.inserting_after(after):
            node = graph.create_node("call_function", target, args, kwargs, name=f"repshift_{stem}_{drop.block}")
        mark(node, stem, drop.block)
        return node

    if config.score == "tome":  # ToMe: the matching chooses both who leaves and where it goes
        keys = keys_before(output)
        metric = add(output, "metric", merge.key_metric, (keys,)) if keys is not None else output
        match = add(metric, "match", merge.bipartite_soft_matching, (metric, drop.before - drop.keep, drop.prefix))
        index = add(match, "index", operator.getitem, (match, 0))
        kept = add(index, "keep", shift.gather_tokens, (output, index))  # passes/merge_tokens makes it a merge
        output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (metric, match, kept))
        return kept
    if config.score == "attention":  # the importance lies inside the block, before its output
        score, anchor = by_name[importance[drop.block]], output
    else:
        inputs = tuple(by_name[name] for name in drop.score_inputs)
        kwargs = {"distance": config.distance} if config.score == "shift" else {}
        score = anchor = add(output, "score", _SCORERS[config.score], inputs, kwargs)
    index = add(anchor, "index", shift.select_tokens, (score, drop.prefix, drop.keep))
    if drop.fused:
        kept = add(index, "keep", shift.fuse_dropped, (output, score, index))
    else:
        kept = add(index, "keep", shift.gather_tokens, (output, index))
    output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (score, kept))
    return kept


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    by_name = nodes_by_name(gm)
    importance = getattr(ctx, "importance", {})
    for drop in ctx.plan.drops:
        kept = _insert_drop(gm.graph, by_name, drop, ctx.plan.config, importance)
        by_name[drop.after] = kept  # a later drop scoring against this block's output reads the kept tokens
    if any(drop.fused for drop in ctx.plan.drops):
        ctx.notes.append("fuse=True: each drop folds its dropped tokens into one token after the kept ones "
                         "(their average weighted by the softmax of their scores)")
    gm.graph.lint()
    gm.recompile()
    return gm
