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
from .passes import (attention_scores, attention_to_sdpa, find_sites, gather_side_tensors, insert_pruning,
                     token_shapes, verify)
from .plan import make_plan
from .lines_pipeline import pick_mode, run_line_passes

log = logging.getLogger("repshift_fx")

ANALYSIS_PASSES = (find_sites,)
REWRITE_PASSES = (attention_to_sdpa, attention_scores, insert_pruning, gather_side_tensors, token_shapes, verify)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Run analysis, planning and rewrites on a captured graph (shapes recorded)."""
    if pick_mode(gm, ctx) == "lines":  # CNNs: rows and columns of (B, C, H, W) maps
        return run_line_passes(gm, ctx)
    return plan_and_rewrite(analyze_graph(gm, ctx), ctx)


def analyze_graph(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """The analysis half of `run_passes`: fills `ctx.analysis`; the graph is not changed.

    The dynamo backend runs the halves apart: between them it maps the model's block numbering
    onto the graph it was handed (see repshift_fx/dynamo_backend.py)."""
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
