"""One strategy object per reduction: what a mode analyses, plans, rewrites, reports and searches.

    mode.analyze(gm, ctx)                   # the analysis passes: ctx.analysis
    gm = mode.plan_and_rewrite(gm, ctx)     # the planner, then the ordered rewrite passes
    report = mode.report(model, gm, ctx, flops, budget)
    config, budget = mode.search_budget(model, x, config, unpruned, rewrite)

The run loop (repshift_fx/pipeline.py) drives a `Mode` the same way for compress(), inspect(),
the dynamo backend and the refused report; policy (the config) stays apart from mechanism (the
passes), as a torch_tensorrt lowering list or a pt2e Quantizer keeps it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch.fx

from repshift_fx.context import PassContext
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.passes import verify

log = logging.getLogger("repshift_fx")


@dataclass(frozen=True)
class Mode:
    """A reduction strategy. Every pass is `run(gm, ctx) -> gm`."""

    name: str
    analysis_passes: tuple  # fill ctx.analysis; the graph is not changed
    make_plan: Callable  # (analysis, config) -> plan: every decision made, or a refusal with the plan
    rewrite_passes: tuple  # in order
    report: Callable  # (model | None, gm, ctx, flops: bool, budget | None) -> Report
    search_budget: Callable  # (model, example_input, config, unpruned, rewrite) -> (Config, BudgetResult)
    log_plan: Callable  # (ctx) -> None: one INFO line per drop
    check_config: Callable = lambda config: None  # options that make no sense for this mode -> ConfigError

    def analyze(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        ctx.output_shapes = verify.output_shapes(gm)
        ctx.mode = self  # an analysis may probe with the mode's rewrite passes (passes/find_token_needs.py)
        for p in self.analysis_passes:
            gm = p.run(gm, ctx)
        return gm

    def plan_and_rewrite(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        """Plan from `ctx.analysis` and `ctx.config`, then the rewrites, once. A refusal carries the
        plan (the counts fixed before it: the FLOP-budget search learns from them)."""
        self.check_config(ctx.config)
        ctx.plan = self.make_plan(ctx.analysis, ctx.config)
        ctx.config = ctx.plan.config  # without the drops the planner skipped
        ctx.notes[:0] = ctx.plan.notes
        try:
            for p in self.rewrite_passes:
                log.debug("running pass %s", p.__name__)
                gm = p.run(gm, ctx)
        except UnsupportedSiteError as error:
            error.plan, error.analysis = ctx.plan, ctx.analysis  # the counts fixed before the refusal
            raise
        self.log_plan(ctx)
        return gm
