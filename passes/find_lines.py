"""Analyze (lines mode): find the residual blocks of a CNN over (B, C, H, W) maps, and what
downstream of each would break on a smaller grid.

Expects: a GraphModule whose nodes carry shapes (`capture`). Guarantees: `ctx.analysis` holds a
`LineAnalysis`; the graph is not changed. Raises `NoSiteError` when no residual block is found.

A residual block is an `add(a, b)` of two (B, C, H, W) maps with H or W above 1, where

- identity shortcut: one input depends on the other (`out = branch(x) + x`);
- projection shortcut: neither does; both descend from one nearest common ancestor x (the block
  input), and the shorter path from x is the shortcut (`downsample(x)`: conv + norm, or pooling).

The block output is the add, or the pointwise activation right after it when that is the add's
only user (torchvision's `relu(out + identity)`); it is what a drop gathers. An add whose branch
holds other blocks (a long skip, as in a U-Net) is not a block. Blocks are numbered in the order
the stream meets them; a stage is a run of blocks with the same output grid.

A hazard of a block is a node downstream of its output that needs the full grid: a concatenation
or an elementwise op with a map taken before the drop (an un-pruned skip, a fixed positional
table), an interpolation to a fixed size, a pooling to a fixed size or with a kernel that covers
the whole grid, or a reshape that writes the grid size as a literal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import torch.fx

from repshift_fx.errors import NoSiteError
from repshift_fx.fx.nodes import (common_path, data_graph, literal_arg, module_path, module_phrase, nodes_by_name,
                                  shape, tensor_args, value_phrase)
from repshift_fx.fx.grid_ops import ELEMENTWISE, POINTWISE, grid_op, is_grid, spatial


@dataclass(frozen=True)
class Hazard:
    """A node downstream of a block that needs the full grid."""

    node: str
    module: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} in {module_phrase(self.module)} {self.reason}"


@dataclass
class LineSite:
    """One residual block: output = act(branch(input) + shortcut), shortcut = input or proj(input)."""

    index: int
    add: str
    output: str  # what a drop gathers: the add, or the activation right after it
    input: str
    shortcut: str  # the reference of the score: the input, or its projection
    projection: bool
    module: str
    nodes: frozenset[str]  # every node from the input (excluded) to the output
    grid: tuple[int, int]  # (H, W) of the output
    channels: int
    stage: int = 0
    hazards: list[Hazard] = field(default_factory=list)


@dataclass
class LineAnalysis:
    sites: list[LineSite]
    stages: list[tuple[int, ...]]  # block indices of each stage
    long_skips: list[str] = field(default_factory=list)  # adds not taken as blocks


def _order(gm) -> dict[str, int]:
    return {node.name: i for i, node in enumerate(gm.graph.nodes)}


def _split(add, graph: nx.DiGraph, by_name, order) -> tuple[torch.fx.Node, torch.fx.Node, bool] | None:
    """(input, shortcut, projection) of a residual add, or None when it is not one."""
    a, b = add.args
    if nx.has_path(graph, a.name, b.name):
        return a, a, False
    if nx.has_path(graph, b.name, a.name):
        return b, b, False
    common = [n for n in nx.ancestors(graph, a.name) & nx.ancestors(graph, b.name) if is_grid(by_name[n])]
    if not common:
        return None
    start = max(common, key=order.get)
    below = nx.descendants(graph, start)
    side_a = below & (nx.ancestors(graph, a.name) | {a.name})
    side_b = below & (nx.ancestors(graph, b.name) | {b.name})
    return by_name[start], (a if len(side_a) <= len(side_b) else b), True


def _single_entry(members: set[str], start: str, by_name, weights: frozenset[str]) -> bool:
    """Every grid entering the block comes through its input (no merge of two streams)."""
    for name in members:
        for arg in tensor_args(by_name[name]):
            if arg.name in members or arg.name == start or arg.op == "get_attr" or arg.name in weights:
                continue
            if is_grid(arg):
                return False
    return True


def _output(add: torch.fx.Node, gm) -> torch.fx.Node:
    users = list(add.users)
    if len(users) == 1 and grid_op(users[0], gm) in POINTWISE and tensor_args(users[0]) == [add]:
        return users[0]
    return add


def _candidates(gm, graph, by_name, weights) -> list[LineSite]:
    order, found = _order(gm), []
    for node in gm.graph.nodes:
        if grid_op(node, gm) != "add" or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
            continue
        if not (is_grid(a) and shape(a) == shape(b)):
            continue
        split = _split(node, graph, by_name, order)
        if split is None:
            continue
        start, shortcut, projection = split
        members = (nx.descendants(graph, start.name) & nx.ancestors(graph, node.name)) | {node.name}
        if not _single_entry(members, start.name, by_name, weights):
            continue
        out = _output(node, gm)
        members.add(out.name)
        paths = [module_path(by_name[m]) for m in members if by_name[m].op.startswith("call")]
        s = shape(out)
        found.append(LineSite(0, node.name, out.name, start.name, shortcut.name, projection, common_path(paths),
                              frozenset(members), (s[2], s[3]), s[1]))
    return found


def _stages(sites: list[LineSite]) -> list[tuple[int, ...]]:
    stages: list[list[int]] = []
    for site in sites:
        if not stages or sites[stages[-1][-1]].grid != site.grid:
            stages.append([])
        stages[-1].append(site.index)
        site.stage = len(stages) - 1
    return [tuple(s) for s in stages]


# --- hazards: what downstream of a drop needs the full grid ---


def _fixed_size(node, gm, op: str) -> str:
    if op == "interpolate":
        size = gm.get_submodule(node.target).size if node.op == "call_module" else literal_arg(node, 1, "size")
        return "resamples to a fixed size (e.g. back to the input size)" if size is not None else ""
    if op in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        size = module.output_size if module is not None else literal_arg(node, 1, "output_size")
        sizes = size if isinstance(size, (tuple, list)) else (size,)
        return "" if all(s in (1, None) for s in sizes) else f"pools to a fixed size {size}"
    if op in ("avg_pool2d", "max_pool2d"):
        grid, out = spatial(node.args[0]), spatial(node)
        if grid and out == (1, 1) and grid != (1, 1):
            return f"pools with a fixed kernel that covers the whole {grid[0]}x{grid[1]} grid"
    return ""


def _literal_grid(node, op: str) -> str:
    if op not in ("view", "reshape"):
        return ""
    source = shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    if source is None or len(source) != 4 or not is_grid(node.args[0]):
        return ""
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    grid = {source[2] * source[3], math.prod(source[1:])}
    if any(isinstance(s, int) and s in grid for s in sizes):
        return f"writes the grid size as a literal {tuple(sizes)}"
    return ""


def _mixes_full_grid(node, op: str, below: set[str], gm, sites) -> str:
    if op == "cat" or op == "stack":
        inputs = [a for a in node.args[0] if isinstance(a, torch.fx.Node)] if node.args else []
    elif op in ELEMENTWISE:
        inputs = tensor_args(node)
    else:
        return ""
    pruned = [a for a in inputs if a.name in below]
    full = [a for a in inputs if a.name not in below and is_grid(a)]
    if pruned and full:
        verb = "concatenates" if op in ("cat", "stack") else "combines"
        return (f"{verb} the pruned map with {value_phrase(full[0], gm, sites)}, which keeps the full grid (a skip "
                "taken before the drop)")
    return ""


def hazards_after(output: str, gm, graph: nx.DiGraph, sites=()) -> list[Hazard]:
    """The nodes downstream of `output` that need the full grid, in graph order (`sites`: the
    blocks, to name a value that is one's input or output)."""
    below = nx.descendants(graph, output) | {output}
    found = []
    for node in gm.graph.nodes:
        if node.name not in below or node.name == output:
            continue
        op = grid_op(node, gm)
        reason = _mixes_full_grid(node, op, below, gm, sites) or _fixed_size(node, gm, op) or _literal_grid(node, op)
        if reason:
            found.append(Hazard(node.name, module_path(node), op, reason))
    return found


def analyze(gm: torch.fx.GraphModule, weights: frozenset[str] = frozenset()) -> LineAnalysis:
    by_name, graph = nodes_by_name(gm), data_graph(gm)
    found = _candidates(gm, graph, by_name, weights)
    outer = [s for s in found if any(o.add in s.nodes for o in found if o is not s)]
    sites = [s for s in found if s not in outer]
    if not sites:
        raise NoSiteError(
            f"no residual block over (B, C, H, W) maps (an add of a map and a branch of it) was found in "
            f"{type(gm).__name__}; line-wise pruning scores rows and columns at such blocks"
            + (f" (found only long skips: {', '.join(s.add for s in outer)})" if outer else "")
        )
    for i, site in enumerate(sites):
        site.index = i
    for site in sites:
        site.hazards = hazards_after(site.output, gm, graph, sites)
    return LineAnalysis(sites, _stages(sites), [s.add for s in outer])


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.analysis = analyze(gm, ctx.weight_placeholders)
    return gm
