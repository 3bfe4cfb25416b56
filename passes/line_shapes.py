"""Rewrite + verify (lines mode): fix the kept counts, check the smaller grid runs, record shapes.

Expects: a graph whose drops are inserted (`insert_line_pruning`, counts left as None), whose
nodes still carry the shapes recorded before the drops, `ctx.plan` and `ctx.args`.
Guarantees: the graph runs on `ctx.args` and every node carries its new shape; each drop's
`select_grid` node keeps ceil(rate * H) rows and ceil(rate * W) columns of the grid that reaches
it, written as ints, and the plan records every count and every block's grid; the outputs keep
their shapes. Refused, with an `UnsupportedSiteError` naming the node and its module:

- an op that fails on the smaller grid;
- a convolution or pooling whose windows, on the smaller grid, no longer reach the last rows or
  columns (kernel 2 stride 2 on an odd size: it needs an even count), where they did before;
- an op other than a convolution or pooling whose input grid shrank but whose output grid keeps
  its original size (a resize or a pooling to a fixed size);
- an output that changes shape (a dense-prediction head).
"""
from __future__ import annotations

import torch
import torch.fx

from repshift_fx.context import inserted, role_of
from repshift_fx.capture import ShapeRecorder
from repshift_fx.errors import UnsupportedSiteError, described, root_cause
from repshift_fx.fx.nodes import in_module, located, nodes_by_name, shape, value_phrase
from repshift_fx.fx.grid_ops import grid_op, pad_end, spatial, window
from repshift_fx.passes.verify import output_shapes
from repshift_fx.plan.tokens import kept_count


def _where(node: torch.fx.Node, gm) -> str:
    return f"{grid_op(node, gm)} in {in_module(node)}"


class _LineShapeProp(ShapeRecorder):
    """Shape recording that fixes the kept counts as it meets each drop and checks every op."""

    def __init__(self, gm: torch.fx.GraphModule, plan):
        super().__init__(gm)
        self.plan = plan
        self.drops = {d.block: d for d in plan.drops}
        self.old = {n: shape(n) for n in gm.graph.nodes}  # shapes before the drops
        self.sizes: dict[str, int] = {}  # the sizes computed so far, by node name
        for n in gm.graph.nodes:  # a gather stands where its (full) input stood
            if role_of(n) == "keep":
                self.old[n] = shape(n.args[0])

    def run_node(self, n: torch.fx.Node):
        if role_of(n) == "index":
            self._fix_counts(n, self.drops[inserted(n).block])
        self._check_window(n)
        try:
            result = super().run_node(n)
        except UnsupportedSiteError:
            raise
        except Exception as wrapped:
            raise UnsupportedSiteError(
                f"{_where(n, self.module)} fails once rows and columns are dropped: "
                f"{described(root_cause(wrapped), self.sizes)}. "
                "It needs the full grid; prune a block after it with a later `at`, or only the backbone.", **located(n)
            ) from wrapped
        if isinstance(result, int):  # a size: a model's message formatted at trace time may show it
            self.sizes[n.name] = result
        self._check_fixed_size(n, result)
        return result

    def _fix_counts(self, n: torch.fx.Node, drop) -> None:
        rows, cols = (s.shape[1] for s in self.env[n.args[0]])
        drop.rows, drop.cols = rows, cols
        drop.keep_rows, drop.keep_cols = kept_count(drop.rates[0], rows), kept_count(drop.rates[1], cols)
        n.args = (n.args[0], drop.keep_rows, drop.keep_cols)

    def _shrunk(self, arg) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """(old grid, new grid) of an input whose grid changed, else None."""
        if not isinstance(arg, torch.fx.Node) or not isinstance(self.env.get(arg), torch.Tensor):
            return None
        old, new = self.old.get(arg), tuple(self.env[arg].shape)
        if old is None or len(old) != 4 or len(new) != 4 or old[2:] == new[2:]:
            return None
        return old[2:], new[2:]

    def _check_window(self, n: torch.fx.Node) -> None:
        grids = self._shrunk(n.args[0]) if n.args else None
        win = window(n, self.module) if grids else None
        if win is None:
            return
        (old_h, old_w), (new_h, new_w) = grids
        extra = pad_end(n.args[0], self.module)
        for axis, (old, new, name) in enumerate(((old_h, new_h, "rows"), (old_w, new_w, "columns"))):
            if win.newly_lost(old, new, axis, extra[axis]):
                raise UnsupportedSiteError(
                    f"{_where(n, self.module)} (kernel {win.kernel[axis]}, stride {win.stride[axis]}) would skip the "
                    f"last {name} of the {new} kept: it needs a count its stride divides (it had {old}). Choose a keep "
                    f"rate that leaves such a count, or prune after it.", **located(n)
                )

    def _check_fixed_size(self, n: torch.fx.Node, result) -> None:
        if not isinstance(result, torch.Tensor) or result.dim() != 4:
            return
        old_out = self.old.get(n)
        if old_out is None or len(old_out) != 4 or tuple(result.shape[2:]) != old_out[2:] or old_out[2:] == (1, 1):
            return
        if window(n, self.module) is not None:  # a strided conv or pooling may round two sizes alike
            return
        if any(self._shrunk(arg) for arg in n.all_input_nodes):
            raise UnsupportedSiteError(
                f"{_where(n, self.module)} gives a {old_out[2]}x{old_out[3]} grid from a pruned input: it resizes "
                "or pools to a fixed size, which the dropped rows and columns would be stretched into. Prune "
                "after it, or only the backbone.", **located(n)
            )


def _record_grids(gm: torch.fx.GraphModule, ctx) -> None:
    """The grid entering and leaving each block, after pruning (for the plan and the report)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    kept = {n.args[0].name: n for n in gm.graph.nodes if role_of(n) == "keep"}

    def grid(name: str) -> tuple[int, int]:
        return spatial(kept.get(name, by_name[name]))

    plan = ctx.plan
    plan.grids_in = [grid(site.input) for site in ctx.analysis.sites]
    plan.grids_out = [grid(site.output) for site in ctx.analysis.sites]


def _check_outputs(gm: torch.fx.GraphModule, ctx) -> None:
    by_name = nodes_by_name(gm)
    for (name, old), (_, new) in zip(ctx.output_shapes, output_shapes(gm)):
        if old != new:
            raise UnsupportedSiteError(
                f"an output of the model ({value_phrase(by_name[name], gm)}) changes shape from {old} to {new} once rows and columns are dropped: a "
                "dense-prediction head needs the full grid, and under torch.compile(backend='repshift') a graph "
                "break after the drop (a print, .item(), data-dependent control flow) hands the map to Python "
                "code. Compress only the backbone, prune with a classification head, or remove the graph break "
                "(torch._dynamo.explain(model)(x) lists them)."
            )


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    _LineShapeProp(gm, ctx.plan).propagate(*ctx.args)
    gm.recompile()
    _record_grids(gm, ctx)
    _check_outputs(gm, ctx)
    return gm
