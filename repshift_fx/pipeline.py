"""The pipeline: capture -> analyze -> plan -> rewrite -> verify, as an ordered list of passes.

    gm, ctx = rewrite(model, example_input, config)

Every pass is `run(gm, ctx) -> gm` (see `repshift_fx.passes`); `make_plan` sits between the
analysis and the rewrites because it reads the analysis and the config, not the graph.
"""
from __future__ import annotations

import logging

import torch
import torch.fx

from .capture import capture
from .config import Config, PassContext
from .errors import ConfigError, NoSiteError
from .lines_pipeline import analyze_lines, plan_and_rewrite_lines
from .passes import (attention_scores, attention_to_sdpa, find_sites, gather_side_tensors, insert_pruning,
                     token_shapes, verify)
from .plan import make_plan

log = logging.getLogger("repshift_fx")

ANALYSIS_PASSES = (find_sites,)
REWRITE_PASSES = (attention_to_sdpa, attention_scores, insert_pruning, gather_side_tensors, token_shapes, verify)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Run analysis, planning and rewrites on a captured graph (shapes recorded)."""
    if analyze(gm, ctx) == "lines":  # CNNs: rows and columns of (B, C, H, W) maps
        return plan_and_rewrite_lines(gm, ctx)
    return plan_and_rewrite(gm, ctx)


def analyze(gm: torch.fx.GraphModule, ctx: PassContext) -> str:
    """The analysis of the mode `ctx.config.mode` names, or with "auto" of the one the graph fits:
    tokens mode when it has residual MLPs over (B, N, C) tokens, else lines mode when it has
    residual blocks over (B, C, H, W) maps. Fills `ctx.analysis` and `ctx.mode`; returns the mode.
    NoSiteError when the graph fits neither (with "auto", the message says what both found)."""
    mode = ctx.config.mode
    if mode == "lines":
        analyze_lines(gm, ctx)
        return "lines"
    try:
        analyze_graph(gm, ctx)
    except NoSiteError as tokens_error:
        if mode == "tokens":
            raise
        try:
            analyze_lines(gm, ctx)
        except NoSiteError as lines_error:
            message = f"{tokens_error.message} Nor for lines mode: {lines_error.message}."
            raise NoSiteError(message) from tokens_error
        return "lines"
    _check_token_keep(ctx.config)
    ctx.mode = "tokens"
    return "tokens"


def _check_token_keep(config: Config) -> None:
    keep = config.keep
    if isinstance(keep, tuple) and any(isinstance(k, tuple) for k in keep):
        raise ConfigError(f"keep={keep!r} holds (rows, cols) pairs, which are for line-wise pruning of CNNs; "
                          "this model is pruned by tokens: give one rate per entry of at, or a single float")


def analyze_graph(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """The analysis of tokens mode (through `analyze`): fills `ctx.analysis`; the graph is not changed.

    The dynamo backend runs the analysis and `plan_and_rewrite` apart: between them it maps the
    model's block numbering onto the graph it was handed (see repshift_fx/dynamo_backend.py)."""
    ctx.output_shapes = verify.output_shapes(gm)
    for p in ANALYSIS_PASSES:
        gm = p.run(gm, ctx)
    return gm


def plan_and_rewrite(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """The rewriting half of `run_passes`: plan from `ctx.analysis` and `ctx.config`, rewrite, verify."""
    ctx.plan = make_plan(ctx.analysis, ctx.config)
    for p in REWRITE_PASSES:
        log.debug("running pass %s", p.__name__)
        gm = p.run(gm, ctx)
    _log_plan(ctx)
    return gm


def rewrite(model: torch.nn.Module, example_input, config: Config) -> tuple[torch.fx.GraphModule, PassContext]:
    gm, args = capture(model, example_input)
    gm.eval()
    ctx = PassContext(config=config, args=args, model_name=type(model).__name__)
    return run_passes(gm, ctx), ctx


def _log_plan(ctx: PassContext) -> None:
    plan, analysis = ctx.plan, ctx.analysis
    for drop in plan.drops:
        log.info(
            "%s: block %d (%s) scores by %s; keeps %d + %d of %d tokens",
            ctx.model_name, drop.block + ctx.block_offset, analysis.blocks[drop.block].module or "-",
            plan.config.score if plan.config.score != "shift" else f"shift({plan.config.site}, {plan.config.distance})",
            drop.prefix, drop.keep, drop.prefix + drop.before,
        )
    rewritten = sum(rec.impl == "explicit -> sdpa" for rec in ctx.attention)
    if rewritten:
        log.info("%s: %d explicit attentions rewritten to SDPA", ctx.model_name, rewritten)
