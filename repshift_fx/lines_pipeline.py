"""The pipeline of lines mode (CNNs), in the two halves `repshift_fx.pipeline` runs:

    analyze_lines(gm, ctx)                  # find_lines: ctx.analysis (a LineAnalysis)
    gm = plan_and_rewrite_lines(gm, ctx)    # plan -> insert_line_pruning -> line_shapes

Which mode a graph gets is `repshift_fx.pipeline.analyze`.
"""
from __future__ import annotations

import logging

import torch.fx

from .config import PassContext
from .errors import UnsupportedSiteError
from .passes import find_lines, insert_line_pruning, line_shapes, verify
from .plan_lines import make_line_plan

log = logging.getLogger("repshift_fx")

LINE_ANALYSIS_PASSES = (find_lines,)
LINE_REWRITE_PASSES = (insert_line_pruning, line_shapes)


def analyze_lines(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """The analysis of lines mode: fills `ctx.analysis`; the graph is not changed. NoSiteError
    when the graph has no residual block over (B, C, H, W) maps."""
    ctx.output_shapes = verify.output_shapes(gm)
    for p in LINE_ANALYSIS_PASSES:
        gm = p.run(gm, ctx)
    ctx.mode = "lines"
    return gm


def plan_and_rewrite_lines(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Plan from `ctx.analysis` and `ctx.config`, then the rewrites of lines mode."""
    ctx.plan = make_line_plan(ctx.analysis, ctx.config)
    try:
        for p in LINE_REWRITE_PASSES:
            log.debug("running pass %s", p.__name__)
            gm = p.run(gm, ctx)
    except UnsupportedSiteError as error:
        error.plan = ctx.plan  # the counts fixed before the refusal: the FLOP-budget search learns from them
        raise
    _log_plan(ctx)
    return gm


def _log_plan(ctx: PassContext) -> None:
    config = ctx.plan.config
    score = f"shift(block, {config.distance})" if config.score == "shift" else config.score
    for drop in ctx.plan.drops:
        log.info("%s: block %d (%s) scores lines by %s; keeps %d of %d rows, %d of %d columns", ctx.model_name,
                 drop.block, ctx.analysis.sites[drop.block].module or "-", score, drop.keep_rows, drop.rows,
                 drop.keep_cols, drop.cols)
