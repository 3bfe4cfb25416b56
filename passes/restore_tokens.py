"""Rewrite (restore): every token put back at its original position where the graph needs them all.

Expects: the drops (and merges) inserted, and `ctx.plan.restore_at`: the blocks after which the
tokens are restored (the last block of each run of blocks over one token count that holds a drop:
before a per-token output, a stage's reshape back to its grid, a dense head).
Guarantees: after the stream leaving each such block,

    repshift_restore_b = restore_dropped(y, index_k, before_k)   (a dropped token: its value when dropped)
                       | unmerge(y, assign_k)                     (a merged token: the value it went into)

chained back through every drop of that run, latest first, so the tensor is (B, N, C) again with
N the run's original count; every later use of the stream reads it. Nodes downstream of a
restore lie outside every drop's region (gather_side_tensors, merge_tokens stop there).
"""
from __future__ import annotations

import torch.fx

from repshift_fx.context import Role, inserted, mark
from repshift_fx.fx.nodes import nodes_by_name
from repshift_fx.method import merge


def _drop_nodes(gm: torch.fx.GraphModule) -> dict[int, dict[str, torch.fx.Node]]:
    """block -> {"index", "keep"} of its drop, found by their roles, and "assign" where the drop merged."""
    found: dict[int, dict[str, torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        record = inserted(node)
        if record is not None and record.mode == "tokens" and record.role in (Role.INDEX, Role.KEEP, Role.ASSIGN):
            found.setdefault(record.block, {})[record.role.value] = node
    return found


def _stream_after(block, drops, nodes: dict, by_name) -> torch.fx.Node:
    """The node carrying the stream out of `block` now: its drop's kept tokens if it ends with one."""
    if drops[-1].block == block.index and drops[-1].after == block.output:
        return nodes[block.index]["keep"]
    return by_name[block.output]


def _restore_chain(graph, stream, drops, nodes) -> torch.fx.Node:
    value = stream
    for drop in reversed(drops):
        found = nodes[drop.block]
        with graph.inserting_after(value):
            if "assign" in found:
                value = graph.call_function(merge.unmerge, (value, found["assign"]))
            else:
                before = found["keep"].args[0]  # the stream the drop gathered from
                value = graph.call_function(merge.restore_dropped, (value, found["index"], before))
        mark(value, "restore", drop.block)
    return value


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    plan = ctx.plan
    if not plan.restore_at:
        return gm
    by_name, nodes = nodes_by_name(gm), _drop_nodes(gm)
    blocks = ctx.analysis.blocks
    for end, drops in plan.restore_at:
        if all(d.block == end for d in drops):
            ctx.notes.append(f"block {end}: its drop is undone right after it (what follows needs every token), "
                             "so it saves nothing; drop at an earlier block of its stage, or after what needs them")
        stream = _stream_after(blocks[end], drops, nodes, by_name)
        users = list(stream.users)
        restored = _restore_chain(gm.graph, stream, drops, nodes)
        for user in users:
            user.replace_input_with(stream, restored)
    gm.graph.lint()
    gm.recompile()
    return gm
