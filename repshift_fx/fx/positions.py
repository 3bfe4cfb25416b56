"""Tokens read by a fixed position after the last block: a pooler's `hidden[:, 0]`, a head's
`x[:, 0]`, ViM's class token in the middle `x[:, N // 2]`. They must stay (passes/find_sites.py
protects them), and a read in the middle must follow the token once others are dropped.

    reads = read_positions(gm, graph, by_name, last_output)     # {position: (read node, ...)}
"""
from __future__ import annotations

import networkx as nx
import torch.fx

from repshift_fx.fx.nodes import literal_arg, op_name, shape, where

TOKEN_AXIS = 1
POSITION_READS = {"getitem", "select", "narrow"}


def positions_read(node: torch.fx.Node, op: str, tokens: int) -> range:
    """The token positions `node` reads by a fixed index from a (B, N, ...) input: x[:, i] -> [i],
    x[:, :j] -> 0..j-1, select(x, 1, i), narrow(x, 1, i, n); a negative i counts from the end.
    Empty when it reads no fixed position on the token axis."""
    if op == "getitem":
        index = node.args[1] if len(node.args) > 1 else None
        if not isinstance(index, tuple) or len(index) <= TOKEN_AXIS or index[0] != slice(None):
            return range(0)
        item = index[TOKEN_AXIS]
        if isinstance(item, int) and -tokens <= item < tokens:
            return range(item % tokens, item % tokens + 1)
        if isinstance(item, slice) and item.start in (None, 0) and isinstance(item.stop, int) and item.stop > 0 \
                and item.step in (None, 1):
            return range(min(item.stop, tokens))
        return range(0)
    dim = literal_arg(node, 1, "dim")
    start = literal_arg(node, 2, "index" if op == "select" else "start")
    if dim != TOKEN_AXIS or not isinstance(start, int) or not -tokens <= start < tokens:
        return range(0)
    start %= tokens
    return range(start, start + (literal_arg(node, 3, "length", 1) if op == "narrow" else 1))


def describe_read(by_name, gm, names) -> str:
    return where(by_name[names[0]], gm)


def read_positions(gm, graph: nx.DiGraph, by_name, last_output: str) -> dict[int, tuple[str, ...]]:
    """Tokens read by their position after the last block (a pooler's `hidden[:, 0]`, ViM's
    `x[:, N // 2]`): they must stay, so they are protected. {position: (the nodes reading it, ...)}."""
    tokens = shape(by_name[last_output])[TOKEN_AXIS]
    output = next(n.name for n in reversed(gm.graph.nodes) if n.op == "output")
    feeds_output = nx.ancestors(graph, output)
    found: dict[int, tuple[str, ...]] = {}
    order = {name: i for i, name in enumerate(by_name)}
    for name in sorted(nx.descendants(graph, last_output), key=order.get):
        node = by_name[name]
        op = op_name(node, gm)
        source = node.args[0] if node.args else None
        if op not in POSITION_READS or len(shape(source) or ()) != 3 or shape(source)[TOKEN_AXIS] != tokens:
            continue
        if name not in feeds_output:  # a pooler whose result the model drops
            continue
        for position in positions_read(node, op, tokens):
            found[position] = found.get(position, ()) + (name,)
    return found
