"""Rewrite: padded positions score lowest at every drop, so they leave before any real token.

Expects: `insert_pruning` has run (each drop's index node, role "index", reads its score first).
Guarantees: where the graph takes a padding mask (an integer or boolean (B, N) input that reaches
the attention but not the token stream: BERT's attention_mask), each drop's index reads
`padding_last(score, real)` instead of the score, `real` being the mask cut to that drop's tokens
by the earlier drops. `passes/merge_tokens.py` reads the same `real` so that padding never merges
into a real token. Without such an input the graph is unchanged.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx

from repshift_fx.context import inserted, mark, role_of
from repshift_fx.fx.nodes import data_graph, input_name, nodes_by_name, shape
from repshift_fx.passes.gather_side_tensors import gather_side


def padding_last(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Scores with every padded position (real == 0) the lowest: (B, N), (B, N) -> (B, N).
    The padded scores differ, falling with the position, so that a drop keeping some padding keeps
    the first padded positions: equal scores would leave the choice to top-k's tie-breaking, which
    torch and onnxruntime do not share."""
    position = torch.arange(scores.shape[1], device=scores.device, dtype=scores.dtype) / scores.shape[1]
    lowest = torch.finfo(scores.dtype).min / 2 * (1 + position)
    return torch.where(real == 0, lowest, scores)


def padding_mask(gm: torch.fx.GraphModule, analysis, weights=frozenset(), args: tuple = ()) -> torch.fx.Node | None:
    """The (B, N) input that masks the attention: integer, boolean, or floating with only 0 and 1
    in the example `args`; it reaches a token-mixing branch but not the token stream (input_ids
    do). None when there is none."""
    by_name, graph = nodes_by_name(gm), data_graph(gm)
    stream = analysis.blocks[0].input
    batch, tokens = shape(by_name[stream])[:2]
    feeds_stream = {stream} | nx.ancestors(graph, stream)
    mixers = set().union(*(b.mixer.nodes for b in analysis.blocks if b.mixer is not None))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for position, node in enumerate(placeholders):
        meta = node.meta.get("tensor_meta")
        if node.name in weights or node.name in feeds_stream or getattr(meta, "shape", None) != (batch, tokens):
            continue
        if meta.dtype.is_floating_point:
            value = args[position] if position < len(args) else None
            if not isinstance(value, torch.Tensor) or not bool(((value == 0) | (value == 1)).all()):
                continue  # an additive float mask (0 / -inf) is no 0/1 padding mask
        if mixers & nx.descendants(graph, node.name):
            return node
    return None


def real_tokens(index: torch.fx.Node) -> torch.fx.Node | None:
    """The padding mask (B, N) at this drop's input, where the drop's score reads one."""
    score = index.args[0]
    if isinstance(score, torch.fx.Node) and score.target is padding_last:
        return score.args[1]
    return None


def _score_padding_last(graph: torch.fx.Graph, index: torch.fx.Node, real: torch.fx.Node, block: int) -> None:
    """The drop's index reads `padding_last(score, real)` instead of its score."""
    with graph.inserting_before(index):
        score = graph.create_node("call_function", padding_last, (index.args[0], real),
                                  name=f"repshift_real_score_{block}")
    mark(score, "score", block)
    index.args = (score, *index.args[1:])


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    if not ctx.plan.drops:
        return gm
    mask = padding_mask(gm, ctx.analysis, ctx.weight_placeholders, ctx.args)
    if mask is None:
        return gm
    graph, real, previous = gm.graph, mask, None
    mlp_only = {d.block for d in ctx.plan.drops if d.mlp_only}  # their stream keeps every token
    for index in [n for n in graph.nodes if role_of(n) == "index"]:
        block = inserted(index).block
        if block in mlp_only:
            _score_padding_last(graph, index, mask, block)
            continue
        match = index.args[0] if index.target is operator.getitem else None  # ToMe's matching
        with graph.inserting_before(match if match is not None else index):
            if previous is not None:
                real = graph.create_node("call_function", gather_side, (real, previous, (1,), 2, 0),
                                        name=f"repshift_padding_{block}")
                mark(real, "side", inserted(previous).block, source=mask.name)
            if match is not None:  # padding pairs only with padding
                valid = graph.call_function(operator.ne, (real, 0))
                mark(valid, "side", block, source=mask.name)  # cut already: gather_side_tensors leaves it
                match.args = (*match.args[:3], valid)
            else:
                _score_padding_last(graph, index, real, block)
        previous = index
    ctx.notes.append(f"padding: input '{input_name(gm, mask, ctx.args)}' marks padded positions; they score "
                     "lowest at every drop, and the attention mask is gathered with the kept tokens")
    gm.graph.lint()
    gm.recompile()
    return gm
