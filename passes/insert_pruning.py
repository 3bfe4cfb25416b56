"""Rewrite: insert the scoring, top-k and gather nodes of every planned drop.

Expects: `ctx.plan` (repshift_fx.plan.PrunePlan) naming nodes of this graph.
Guarantees: after each drop's block output three nodes are inserted,

    repshift_score_i = representation_shift(changed, reference) | token_norm | random_scores
    repshift_index_i = select_tokens(repshift_score_i, prefix, keep)
    repshift_keep_i  = gather_tokens(block_output, repshift_index_i)

and every later use of the block output reads `repshift_keep_i` instead. Nothing else changes;
sizes written as literals downstream are the job of `token_shapes`.
"""
from __future__ import annotations

import torch.fx

from repshift_fx import shift
from repshift_fx.graph import nodes_by_name

_SCORERS = {"shift": shift.representation_shift, "norm": shift.token_norm, "random": shift.random_scores}


def _insert_drop(graph: torch.fx.Graph, by_name, drop, config) -> torch.fx.Node:
    output = by_name[drop.after]
    inputs = tuple(by_name[name] for name in drop.score_inputs)
    kwargs = {"distance": config.distance} if config.score == "shift" else {}
    def add(after, stem, target, args, kwargs=None):
        with graph.inserting_after(after):
            node = graph.create_node("call_function", target, args, kwargs, name=f"repshift_{stem}_{drop.block}")
        node.meta["repshift"] = {"role": stem, "block": drop.block}
        return node

    score = add(output, "score", _SCORERS[config.score], inputs, kwargs)
    index = add(score, "index", shift.select_tokens, (score, drop.prefix, drop.keep))
    kept = add(index, "keep", shift.gather_tokens, (output, index))
    output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (score, kept))
    return kept


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    by_name = nodes_by_name(gm)
    for drop in ctx.plan.drops:
        _insert_drop(gm.graph, by_name, drop, ctx.plan.config)
    gm.graph.lint()
    gm.recompile()
    return gm
