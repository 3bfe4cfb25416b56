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
from .passes import attention_to_sdpa, find_sites, insert_pruning, token_shapes, verify
from .plan import make_plan

log = logging.getLogger("repshift_fx")

ANALYSIS_PASSES = (find_sites,)
REWRITE_PASSES = (attention_to_sdpa, insert_pruning, token_shapes, verify)


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Run analysis, planning and rewrites on a captured graph (shapes recorded)."""
    ctx.output_shapes = verify.output_shapes(gm)
    for p in ANALYSIS_PASSES:
        gm = p.run(gm, ctx)
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
            ctx.model_name, drop.block, analysis.blocks[drop.block].module or "-",
            plan.config.score if plan.config.score != "shift" else f"shift({plan.config.site}, {plan.config.distance})",
            drop.prefix, drop.keep, drop.prefix + drop.before,
        )
    rewritten = sum(rec.impl == "explicit -> sdpa" for rec in ctx.attention)
    if rewritten:
        log.info("%s: %d explicit attentions rewritten to SDPA", ctx.model_name, rewritten)
