"""Plan (lines mode): the grid each drop meets and whether the layers after it take the counts
kept, worked out from the shapes of the graph at keep=1.0, before any rewrite.

    walk = GridWalk(gm, plan)                   # the rewrite at keep=1.0: its drops, shapes recorded
    kept, refusal = walk(rates)                 # (rows, cols) kept at each drop; None, or why refused

The walk follows the new shape of every value a drop reaches: through windows (convolution,
pooling: torch's output size), pads (their fixed border), permutes (ConvNeXt's channel-last
norms), ops that keep their input's shape but for the last axis (Linear, LayerNorm), broadcasting
ops, and upsampling by a whole factor. It refuses what passes/line_shapes.py refuses on the
rewritten graph: a window that would leave the last rows or columns of the counts kept unreached
where the full grid did not (kernel 2 stride 2 on an odd count), inputs whose grids no longer
broadcast (a shortcut cut otherwise than its block), and a reshape of the whole grid (MaxViT's
window partitions), whose sizes it cannot follow. A reduction (mean, pooling to a vector) ends
the grid; the rewrite's own checks stay the last word.
"""
from __future__ import annotations

import math

import torch
import torch.fx

from repshift_fx.context import inserted, role_of
from repshift_fx.fx.grid_ops import grid_op, pad_end, window
from repshift_fx.fx.nodes import in_module, op_name, shape
from repshift_fx.plan.tokens import kept_count

Shape = tuple[int, ...]


class GridWalk:
    """The planned drops of one unpruned lines-mode rewrite, walked at any rates."""

    def __init__(self, gm: torch.fx.GraphModule, plan):
        self.gm = gm
        self.order = {d.block: i for i, d in enumerate(plan.drops)}

    def __call__(self, rates: list[tuple[float, float]]) -> tuple[tuple[tuple[int, int], ...], str | None]:
        """(rows, cols) kept at each drop with `rates` (one (rows, cols) rate per drop), and None, or
        the first refusal a layer after a drop would raise (then the counts up to that drop)."""
        shapes: dict[torch.fx.Node, Shape] = {}  # the values whose shape differs from the recorded one
        kept = []
        for node in self.gm.graph.nodes:
            if role_of(node) == "keep":  # gather_lines(block output, index): (B, C, rows, cols)
                b, c, rows, cols = shapes.get(node.args[0], shape(node.args[0]))
                rate = rates[self.order[inserted(node).block]]
                shapes[node] = (b, c, kept_count(rate[0], rows), kept_count(rate[1], cols))
                kept.append(shapes[node][2:])
                continue
            if not any(a in shapes for a in node.all_input_nodes):
                continue
            followed = self._follow(node, shapes)
            if isinstance(followed, str):
                return tuple(kept), followed
            if followed is not None and followed != shape(node):
                shapes[node] = followed
        return tuple(kept), None

    def _follow(self, node: torch.fx.Node, shapes: dict) -> Shape | str | None:
        """The shape `node` gives with its inputs' new shapes; a refusal; None where not followed."""
        out = shape(node)
        source = next(a for a in node.all_input_nodes if a in shapes)
        old, new = shape(source), shapes[source]
        tensors = [a for a in node.all_input_nodes if shape(a) is not None and len(shape(a)) == len(new)]
        olds, news = [shape(a) for a in tensors], [shapes.get(a, shape(a)) for a in tensors]
        if not _broadcasts(news) and _broadcasts(olds):
            return f"{op_name(node, self.gm)} in {in_module(node)} meets grids {sorted(set(news))} that no longer fit"
        if out is None or inserted(node) is not None:
            return None
        win = window(node, self.gm) if node.args and node.args[0] is source and len(new) == 4 else None
        if win is not None:
            return self._through_window(node, win, old, new, out)
        if grid_op(node, self.gm) == "pad":
            return tuple(n + o - i for n, o, i in zip(new, out, old)) if len(out) == len(new) else None
        if op_name(node, self.gm) == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return tuple(new[d] for d in dims)
        if len(out) == len(new) and out == _broadcast(olds):  # elementwise, broadcasting
            return _broadcast(news)
        if len(out) == len(old) and out[:-1] == old[:-1]:  # Linear, LayerNorm over the last axis
            return new[:-1] + out[-1:]
        if len(out) == len(old) == 4 and out[:2] == old[:2] and all(o % i == 0 for o, i in zip(out[2:], old[2:])):
            return new[:2] + tuple(n * (o // i) for n, o, i in zip(new[2:], out[2:], old[2:]))  # upsampled
        if math.prod(out) == math.prod(old):  # every value, laid out anew (windows, tokens): sizes it cannot follow
            return f"{op_name(node, self.gm)} in {in_module(node)} reshapes the grid, and needs its full size"
        return None  # a reduction (mean, pooling to a vector): no longer a grid

    def _through_window(self, node, win, old: Shape, new: Shape, out: Shape) -> Shape | str:
        extra = pad_end(node.args[0], self.gm)
        for axis, name in enumerate(("rows", "columns")):
            if win.newly_lost(old[2 + axis], new[2 + axis], axis, extra[axis]):
                return (f"{grid_op(node, self.gm)} in {in_module(node)} (kernel {win.kernel[axis]}, stride "
                        f"{win.stride[axis]}) would skip the last {name} of the {new[2 + axis]} kept")
        return (new[0], out[1], win.out_size(new[2], 0), win.out_size(new[3], 1))


def _broadcast(shapes: list[Shape]) -> Shape | None:
    try:
        return tuple(torch.broadcast_shapes(*shapes)) if shapes else None
    except RuntimeError:
        return None


def _broadcasts(shapes: list[Shape]) -> bool:
    return len(shapes) < 2 or _broadcast(shapes) is not None
