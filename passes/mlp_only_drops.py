"""Rewrite (MLP-only drops): where a stage needs every token between its MLPs, the tokens a drop
leaves out skip only the MLPs of the stage's later blocks.

Expects: `ctx.plan` whose drops in such a stage are marked `mlp_only` (plan/restores.py: the planner
marks the stage when its windowed attention, grid convolution or token-mixing layer would undo a
drop at once), `ctx.analysis`, and `ctx.tokens.importance` for score="attention".
Guarantees: the stream keeps every token. After an MLP-only drop's block output,

    repshift_score_b = representation_shift(changed, reference) | token_norm | random_scores
    repshift_index_b = select_tokens(repshift_score_b, prefix, keep)               # (B, prefix + K)

and the MLP of every later block j of the stage runs on the chosen tokens alone (the latest
drop's), the other tokens passing it unchanged:

    repshift_mlp_keep_j    = gather_tokens(stream_j, index)                       # (B, prefix + K, C)
    add_j                  = mlp_keep_j + mlp(mlp_keep_j)                         # the block's own nodes
    repshift_mlp_restore_j = restore_dropped(add_j, index, stream_j)              # (B, N, C)

Every later use of `add_j` reads the restored tensor, so a later drop's score does too: at the
MLP site a token that skipped the MLP has shift 0 and stays out.
"""
from __future__ import annotations

import torch.fx

from repshift_fx.context import mark
from repshift_fx.fx.nodes import nodes_by_name
from repshift_fx.method import tokens as shift
from repshift_fx.method.merge import restore_dropped
from repshift_fx.passes.insert_pruning import insert_selection
from repshift_fx.plan.tokens import runs


def _mlp_on_kept(graph: torch.fx.Graph, by_name: dict, block, index: torch.fx.Node) -> None:
    """Block `block`'s MLP runs on the tokens at `index`; the others keep the stream's value."""
    site = block.mlp
    stream, add = by_name[site.stream], by_name[site.add]
    with graph.inserting_after(stream):
        kept = graph.create_node("call_function", shift.gather_tokens, (stream, index),
                                 name=f"repshift_mlp_keep_{block.index}")
    mark(kept, "mlp_keep", block.index)
    for user in list(stream.users):
        if user is add or user.name in site.nodes:
            user.replace_input_with(stream, kept)
    with graph.inserting_after(add):
        restored = graph.create_node("call_function", restore_dropped, (add, index, stream),
                                     name=f"repshift_mlp_restore_{block.index}")
    mark(restored, "mlp_restore", block.index)
    add.replace_all_uses_with(restored, delete_user_cb=lambda user: user is not restored)
    by_name[site.add] = restored  # a later score reads the block's output with every token


def _score_inputs_in_full(graph: torch.fx.Graph, by_name: dict, block, drop, index: torch.fx.Node) -> None:
    """A score that reads the MLP (its output, `changed`) reads it with every token: one that
    skipped the MLP takes the stream's value there, so its shift is 0."""
    stream = by_name[block.mlp.stream]
    for name in drop.score_inputs:
        if name in block.mlp.nodes:
            with graph.inserting_after(by_name[name]):
                full = graph.create_node("call_function", restore_dropped, (by_name[name], index, stream),
                                         name=f"repshift_mlp_full_{block.index}")
            mark(full, "mlp_restore", block.index)
            by_name[name] = full


def _stages(plan, analysis) -> list[list]:
    """The blocks of each run (plan/tokens.py: runs) holding MLP-only drops, from its first drop on."""
    marked = {d.block for d in plan.drops if d.mlp_only}
    found = []
    for blocks in runs(analysis):
        first = next((i for i, block in enumerate(blocks) if block.index in marked), None)
        if first is not None:
            found.append(blocks[first:])
    return found


def _note(stage: list, last_drops: bool) -> str:
    last = f"the drop after block {stage[-1].index}, the last of its stage, saves nothing"
    if len(stage) == 1:
        return last
    return (f"blocks {stage[1].index}..{stage[-1].index}: what lies between their MLPs needs every token, so the "
            "tokens a drop leaves out skip only the MLPs of the stage's later blocks (MLP-only drops)"
            + (f"; {last}" if last_drops else ""))


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    plan = ctx.plan
    drops = {d.block: d for d in plan.drops if d.mlp_only}
    if not drops:
        return gm
    by_name, graph = nodes_by_name(gm), gm.graph
    for stage in _stages(plan, ctx.analysis):
        index = None
        for block in stage:
            drop = drops.get(block.index)
            if index is not None and block.mlp is not None:
                _mlp_on_kept(graph, by_name, block, index)
                if drop is not None:
                    _score_inputs_in_full(graph, by_name, block, drop, index)
            if drop is not None and block is not stage[-1]:
                index = insert_selection(graph, by_name, drop, plan.config, ctx.tokens.importance)[1]
        ctx.notes.append(_note(stage, stage[-1].index in drops))
    gm.graph.lint()
    gm.recompile()
    return gm
