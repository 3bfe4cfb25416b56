"""Lines mode: whole rows and columns of (B, C, H, W) maps (CNNs: ResNet, EfficientNet)."""
from __future__ import annotations

import logging

from repshift_fx.modes.base import Mode
from repshift_fx.passes import find_lines, insert_line_pruning, line_shapes
from repshift_fx.plan.budget import plan_lines_for_budget
from repshift_fx.plan.lines import make_line_plan
from repshift_fx.report.lines import build_line_report

log = logging.getLogger("repshift_fx")


def log_line_plan(ctx) -> None:
    config = ctx.plan.config
    score = f"shift(block, {config.distance})" if config.score == "shift" else config.score
    for drop in ctx.plan.drops:
        log.info("%s: block %d (%s) scores lines by %s; keeps %d of %d rows, %d of %d columns", ctx.model_name,
                 drop.block, ctx.analysis.sites[drop.block].module or "-", score, drop.keep_rows, drop.rows,
                 drop.keep_cols, drop.cols)


LINES = Mode(
    name="lines",
    analysis_passes=(find_lines,),
    make_plan=make_line_plan,
    rewrite_passes=(insert_line_pruning, line_shapes),
    report=build_line_report,
    search_budget=plan_lines_for_budget,
    log_plan=log_line_plan,
)
