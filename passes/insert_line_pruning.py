"""Rewrite (lines mode): insert the row/column scoring, selection and gather of every planned drop.

Expects: `ctx.plan` (repshift_fx.plan.lines.LinePlan) naming nodes of this graph.
Guarantees: after each drop's block output three nodes are inserted,

    repshift_score_i = line_shift(output, shortcut, distance) | line_norm(output) | random_lines(output)
    repshift_index_i = select_grid(repshift_score_i, keep_rows, keep_cols)
    repshift_keep_i  = gather_lines(output, repshift_index_i)              # (B, C, h, w)

and every later use of the block output reads `repshift_keep_i` instead. The kept counts are
left as None: the grid that reaches a drop is known only once earlier drops have run, so
`line_shapes` fills them in while it propagates shapes.
"""
from __future__ import annotations

import torch.fx

from repshift_fx.context import mark
from repshift_fx.method import lines
from repshift_fx.fx.nodes import nodes_by_name

_SCORERS = {"shift": lines.line_shift, "norm": lines.line_norm, "random": lines.random_lines}


def _insert_drop(graph: torch.fx.Graph, by_name, drop, config, kept_for: dict) -> torch.fx.Node:
    output = by_name[drop.after]
    # an earlier drop's output read by this score (an identity shortcut) is read as that drop kept it
    inputs = tuple(kept_for.get(by_name[name], by_name[name]) for name in drop.score_inputs)
    kwargs = {"distance": config.distance} if config.score == "shift" else {}

    def add(after, stem, target, args, kwargs=None):
        with graph.inserting_after(after):
            node = graph.create_node("call_function", target, args, kwargs, name=f"repshift_{stem}_{drop.block}")
        mark(node, stem, drop.block, mode="lines")
        return node

    score = add(output, "score", _SCORERS[config.score], inputs, kwargs)
    index = add(score, "index", lines.select_grid, (score, None, None))
    kept = add(index, "keep", lines.gather_lines, (output, index))
    output.replace_all_uses_with(kept, delete_user_cb=lambda user: user not in (score, kept))
    return kept


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    by_name, kept_for = nodes_by_name(gm), {}
    for drop in ctx.plan.drops:
        kept_for[by_name[drop.after]] = _insert_drop(gm.graph, by_name, drop, ctx.plan.config, kept_for)
    gm.graph.lint()
    gm.recompile()
    return gm
