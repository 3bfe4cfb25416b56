"""The report of lines mode: one row per residual block with its grid, stages, GFLOPs.

    report = build_line_report(model, gm, ctx, flops=True)
    print(report)              # table per block + grid and GFLOPs per stage
    report.to_dict()           # the keys of report.Report, plus grid_in / grid_out / stage per block,
                               # "mode": "lines" and "stages"

It is a `report.Report` (same fields, same summary lines where they apply): `tokens_in` and
`tokens_out` count positions (H * W), `prefix` is 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import networkx as nx
import torch.fx
from tabulate import tabulate

from repshift_fx.context import inserted, role_of
from repshift_fx.capture import capture
from repshift_fx.flops import node_macs
from repshift_fx.fx.nodes import carries_tensor, shape
from repshift_fx.report.tokens import ROLE_FILL, PRUNED_FILL, BlockRow, Report, gflops_text


@dataclass
class LineRow(BlockRow):
    grid_in: tuple[int, int] = (0, 0)  # (H, W) entering the block, after earlier drops
    grid_out: tuple[int, int] = (0, 0)  # (H, W) leaving it, after its own drop
    grid_original: tuple[int, int] = (0, 0)  # (H, W) of its output without pruning
    stage: int = 0
    kept: tuple[int, int] | None = None  # (rows, cols) kept by its drop
    # `refused` here: why no drop may come after this block (a node downstream needs the full grid)


@dataclass
class LineReport(Report):
    stages: list[dict] = field(default_factory=list)  # per stage: blocks, grid, grid_after, GFLOPs
    mode: ClassVar[str] = "lines"
    # the options that mean something on a grid
    shown_config: ClassVar[tuple[str, ...] | None] = ("keep", "at", "distance", "score", "mode", "target_flops")

    def to_dict(self) -> dict:
        data = super().to_dict()
        for row, block in zip(self.blocks, data["blocks"]):
            block.update(grid_in=row.grid_in, grid_out=row.grid_out, grid_original=row.grid_original,
                         stage=row.stage, kept=row.kept)
        data.update(mode=self.mode, stages=[dict(s) for s in self.stages])
        return data

    def table(self, fmt: str = "simple") -> str:
        rows = [
            (r.index, r.stage, r.module or "-", r.site, _grid(r.grid_in), _grid(r.grid_out), gflops_text(r.gflops_before),
             gflops_text(r.gflops_after), f"drop {r.kept[0]}x{r.kept[1]}" if r.scored else "")
            for r in self.blocks
        ]
        headers = ("block", "stage", "module", "shortcut", "grid in", "grid out", "GFLOPs before", "GFLOPs after", "")
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def stage_table(self, fmt: str = "simple") -> str:
        rows = [(s["stage"], f"{s['blocks'][0]}-{s['blocks'][-1]}", _grid(s["grid"]), _grid(s["grid_after"]),
                 gflops_text(s["gflops_before"]), gflops_text(s["gflops_after"])) for s in self.stages]
        headers = ("stage", "blocks", "grid", "grid after pruning", "GFLOPs before", "GFLOPs after")
        return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)

    def _summary_head(self) -> list[str]:
        return ["line-wise pruning (mode='lines'): rows and columns of (B, C, H, W) maps", self.stage_table(), ""]

    def _budget_line(self) -> str:
        """Report.summary's budget line, with the (rows, cols) kept at each drop."""
        b = self.budget
        kept = ", ".join(f"{rows}x{cols}" for rows, cols in b["kept"])
        return (f"FLOP budget {b['target']}: reached ratio {b['reached']:.4f} with keep={b['keep']:.4f} for rows "
                f"and columns at {tuple(b['at'])} (kept {kept} rows x columns)")

    def _side_lines(self) -> list[str]:
        return []  # a grid has no side tensors


def _grid(grid) -> str:
    return f"{grid[0]}x{grid[1]}" if grid else "-"


def block_owner(gm: torch.fx.GraphModule, analysis) -> dict[str, int]:
    """Block index of each node of `gm` that belongs to a residual block or to its drop."""
    owner = {name: site.index for site in analysis.sites for name in site.nodes}
    for node in gm.graph.nodes:
        if inserted(node) is not None and inserted(node).block is not None:
            owner[node.name] = inserted(node).block
    return owner


def per_block_gmacs(gm: torch.fx.GraphModule, args: tuple, analysis) -> tuple[float, list[float], float]:
    """(total, per block, outside the blocks) GMACs per sample of `gm`."""
    macs, owner = node_macs(gm, args), block_owner(gm, analysis)
    blocks = [0] * len(analysis.sites)
    for name, value in macs.items():
        if name in owner:
            blocks[owner[name]] += value
    total = sum(macs.values())
    return total / 1e9, [b / 1e9 for b in blocks], (total - sum(blocks)) / 1e9


def _stages(analysis, plan, before, after) -> list[dict]:
    stages = []
    for k, members in enumerate(analysis.stages):
        stages.append({
            "stage": k, "blocks": list(members), "grid": analysis.sites[members[0]].grid,
            "grid_after": plan.grids_out[members[-1]],
            "gflops_before": sum(before[i] for i in members) if before else None,
            "gflops_after": sum(after[i] for i in members) if after else None,
        })
    return stages


def build_line_report(model, gm: torch.fx.GraphModule, ctx, flops: bool = True, budget=None) -> LineReport:
    """The report of one lines-mode rewrite; with `flops`, GMACs per sample per block and stage;
    `budget`: the `plan.BudgetResult` when target_flops chose the keep rate."""
    analysis, plan = ctx.analysis, ctx.plan
    total_before = total_after = blocks_before = blocks_after = outside_before = outside_after = None
    if flops:
        original, _ = capture(model, ctx.args, train=ctx.config.train)  # the pipeline rewrote its own trace; names match
        total_before, blocks_before, outside_before = per_block_gmacs(original, ctx.args, analysis)
        total_after, blocks_after, outside_after = per_block_gmacs(gm, ctx.args, analysis)
    drops = {d.block: d for d in plan.drops}
    rows = []
    for site in analysis.sites:
        gin, gout = plan.grids_in[site.index], plan.grids_out[site.index]
        drop = drops.get(site.index)
        rows.append(LineRow(
            index=site.index, module=site.module, mixer="-", attention="-", tokens_in=gin[0] * gin[1],
            tokens_out=gout[0] * gout[1], scored=drop is not None, site="projection" if site.projection else "identity",
            gflops_before=blocks_before[site.index] if flops else None,
            gflops_after=blocks_after[site.index] if flops else None,
            refused="; ".join(map(str, site.hazards[:1])), grid_in=gin, grid_out=gout, grid_original=site.grid,
            stage=site.stage, kept=(drop.keep_rows, drop.keep_cols) if drop else None))
    refused = [f"no drop after block {s.index} ({s.module or '-'}): {s.hazards[0]}"
               for s in analysis.sites if s.hazards]
    refused += [f"add '{name}' holds other blocks (a long skip): not a block" for name in analysis.long_skips]
    config = dict(vars(plan.config), at=plan.at, mode="lines")
    if budget is not None:
        config["target_flops"] = budget.target
    return LineReport(
        model=ctx.model_name, config=config, blocks=rows, prefix=0, prefix_source="a grid has no prefix tokens",
        gflops_before=total_before, gflops_after=total_after, notes=list(ctx.notes),
        gflops_outside_before=outside_before, gflops_outside_after=outside_after, refused=refused,
        graph=line_dot_graph(gm, analysis), stages=_stages(analysis, plan, blocks_before, blocks_after),
        budget=dataclasses.asdict(budget) if budget is not None else None)


def line_dot_graph(gm: torch.fx.GraphModule, analysis) -> nx.DiGraph:
    """The tensor data flow of the rewritten graph for `report.to_dot`: inserted nodes filled
    red-orange, nodes on a pruned grid blue, one cluster per block."""
    owner = block_owner(gm, analysis)
    keep = {n.name for n in gm.graph.nodes if n.op in ("placeholder", "output") or carries_tensor(n)}
    graph = nx.DiGraph()
    graph.graph.update(graph={"rankdir": "TB", "fontname": "Helvetica"},
                       node={"shape": "box", "style": "filled", "fillcolor": "white", "fontsize": "10"})
    pruned = _pruned_nodes(gm)
    for node in gm.graph.nodes:
        if node.name not in keep:
            continue
        attrs = {"label": f"{node.name}\\n{tuple(shape(node) or ())}"}
        role = role_of(node)
        if role:
            attrs["fillcolor"] = ROLE_FILL[role]
        elif node.name in pruned:
            attrs["fillcolor"] = PRUNED_FILL
        graph.add_node(node.name, **attrs)
        graph.add_edges_from((a.name, node.name) for a in node.all_input_nodes if a.name in keep)
    clusters: dict[int, list[str]] = {}
    for name, block in owner.items():
        if name in graph:
            clusters.setdefault(block, []).append(name)
    graph.graph["clusters"] = {
        b: {"nodes": names, "label": f"block {b} ({analysis.sites[b].module or '-'})",
            "pruned": any(n in pruned for n in names)}
        for b, names in sorted(clusters.items())
    }
    return graph


def _pruned_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes downstream of a gather (they run on a smaller grid)."""
    graph = nx.DiGraph((a.name, n.name) for n in gm.graph.nodes for a in n.all_input_nodes)
    found: set[str] = set()
    for node in gm.graph.nodes:
        if role_of(node) == "keep":
            found |= nx.descendants(graph, node.name)
    return found

