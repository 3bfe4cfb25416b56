"""The pipeline of lines mode (CNNs), and the choice between it and tokens mode.

    mode = pick_mode(gm, ctx)               # "tokens" | "lines", from ctx.config.mode and the graph
    gm = run_line_passes(gm, ctx)           # find_lines -> plan -> insert_line_pruning -> line_shapes

mode="auto" takes tokens mode when the graph has residual MLPs over (B, N, C) tokens, else lines
mode when it has residual blocks over (B, C, H, W) maps; a model with neither is a NoSiteError
that says what was found.
"""
from __future__ import annotations

import logging

import torch.fx

from .config import Config, PassContext
from .errors import ConfigError, NoSiteError, UnsupportedSiteError
from .passes import find_lines, find_sites, insert_line_pruning, line_shapes, verify
from .plan_lines import make_line_plan

log = logging.getLogger("repshift_fx")

LINE_ANALYSIS_PASSES = (find_lines,)
LINE_REWRITE_PASSES = (insert_line_pruning, line_shapes)


def _check_token_keep(config: Config) -> None:
    keep = config.keep
    if isinstance(keep, tuple) and any(isinstance(k, tuple) for k in keep):
        raise ConfigError(f"keep={keep!r} holds (rows, cols) pairs, which are for line-wise pruning of CNNs; "
                          "this model is pruned by tokens: give one rate per entry of at, or a single float")


def pick_mode(gm: torch.fx.GraphModule, ctx: PassContext) -> str:
    """"tokens" or "lines" for this graph; sets `ctx.mode`. Raises NoSiteError when neither fits."""
    mode = ctx.config.mode
    if mode == "auto":
        try:
            find_sites.analyze(gm, ctx.weight_placeholders)
            mode = "tokens"
        except NoSiteError as tokens_error:
            try:
                find_lines.analyze(gm, ctx.weight_placeholders)
            except NoSiteError as lines_error:
                message = f"{tokens_error.message} Nor for lines mode: {lines_error.message}."
                raise NoSiteError(message) from tokens_error
            mode = "lines"
    if mode == "tokens":
        _check_token_keep(ctx.config)
    ctx.mode = mode
    return mode


def run_line_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Analysis, planning and rewrites of lines mode on a captured graph (shapes recorded)."""
    ctx.mode = "lines"
    ctx.output_shapes = verify.output_shapes(gm)
    for p in LINE_ANALYSIS_PASSES:
        gm = p.run(gm, ctx)
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
