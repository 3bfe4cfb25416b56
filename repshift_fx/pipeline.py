"""The run loop: capture -> analyze -> plan -> rewrite -> verify, the same for every mode.

    gm, ctx = rewrite(model, example_input, config)            # the rewritten graph and its context
    gm, report = run(model, example_input, config, flops)      # with the FLOP budget and the report

The steps live in their folders: capture/ (the graph and its shapes), passes/ (one pass a file:
analysis, rewrites, verify), plan/ (the schedule), report/ (what was done). A mode
(repshift_fx/modes/) names the passes, planner, report and budget search of one reduction.
compress(), inspect() (the refused report too), and the dynamo backend (compile/backend.py) all
run through here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx

from repshift_fx.capture import capture, eager_module, reuse_traces, set_own_modes
from repshift_fx.config import Config, unreduced
from repshift_fx.context import PassContext
from repshift_fx.errors import ConfigError, TargetOutOfReach, UnsupportedSiteError
from repshift_fx.fx.nodes import within_module
from repshift_fx.modes import TOKENS, choose
from repshift_fx.passes import attention_to_sdpa
from repshift_fx.plan import default
from repshift_fx.plan.tokens import PrunePlan, default_at
from repshift_fx.report.tokens import Report, build_report


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Analysis, planning and rewrites on a captured graph (shapes recorded), in the chosen mode."""
    return choose(gm, ctx).plan_and_rewrite(gm, ctx)


def rewrite(model: torch.nn.Module, example_input, config: Config) -> tuple[torch.fx.GraphModule, PassContext]:
    """Capture, analyze, plan and rewrite, once. The planner (the mode's `make_plan`) decides every
    drop, restore and MLP-only drop from the analysis, or refuses with the plan attached."""
    gm, args = capture(model, example_input, train=config.train)
    set_own_modes(gm, model, config.train)
    ctx = PassContext(config=config, args=args, model_name=type(model).__name__)
    return run_passes(gm, ctx), ctx


def rewrite_unpruned(model: torch.nn.Module, example_input, config: Config):
    """The rewrite at keep=1.0 (ToMe: r=0): which drops `at` means, and their sizes without pruning."""
    return rewrite(model, example_input, unreduced(config))


def plan_for_budget(model: torch.nn.Module, example_input, config: Config, rewrite_with: Callable | None = None):
    """`config.target_flops` -> the config with the keep rate chosen, and the `BudgetResult`.
    The search is the mode's; it rewrites through this loop (`rewrite_with`), which it is handed."""
    unpruned = rewrite_unpruned(model, example_input, config)
    return unpruned[1].mode.search_budget(model, example_input, config, unpruned, rewrite_with or rewrite)


def remembering() -> Callable:
    """`rewrite`, remembering each config's result, for one model and example input: the budget
    search has already rewritten the config it picks (its graph is only counted, never changed)."""
    done: dict = {}

    def remembered(model, example_input, config: Config):  # Config is frozen, its sequences tuples
        if config not in done:
            done[config] = rewrite(model, example_input, config)
        return done[config]

    return remembered


def run(model: torch.nn.Module, example_input, config: Config, flops: bool, fallback: Config | None = None):
    """The rewritten graph and its `Report` (GFLOPs per block with `flops`). With a `fallback` (the
    default reduction, plan/default.py), `config` is tried first and the fallback runs where the
    planner cannot carry it out (a FLOP target out of its reach, a reduction it refuses here)."""
    budget, rewrites, asked = None, remembering(), config
    with reuse_traces():  # one trace for the budget search's rewrites and the last (the model does not change)
        try:
            if config.target_flops is not None:
                config, budget = plan_for_budget(model, example_input, config, rewrites)
            gm, ctx = rewrites(model, example_input, config)
        except (ConfigError, UnsupportedSiteError) as refusal:
            if fallback is None:
                raise
            try:
                gm, report = run(model, example_input, fallback, flops)
            except TargetOutOfReach as short:  # the target both miss: say the lower of what they reach
                raise default.lower_reach(refusal, short) from None
            report.notes.insert(0, default.fallback_note(asked, refusal))
            return gm, report
    gm = eager_module(gm)  # the searches' rewrites are only counted: their code is never written
    report = ctx.mode.report(model, gm, ctx, flops, budget)
    if fallback is not None:
        report.notes.insert(0, default.chosen_note(asked))
    return gm, report


NOTHING_PRUNED = "nothing is pruned: compress() refuses this model with this config (see 'refused')"


def _block_of(analysis, node: str | None, module: str | None):
    """The block whose nodes hold `node` or whose module holds `module`; None when outside every block."""
    for block in analysis.blocks:
        sites = [s for s in (block.mixer, block.mlp) if s is not None]
        if node is not None and any(node in s.nodes for s in sites):
            return block
        if within_module(module, block.module):
            return block
    return None


def refused_report(model, example_input, config: Config, error: UnsupportedSiteError) -> Report:
    """The report of a refused model: every block as the tokens mode's analysis found it, no token
    dropped, attention as it would be fused, the block that holds the refused node marked with the
    reason, and the error's message under "refused". Re-raises `error` when the model has no token
    blocks to show (the refusal came earlier)."""
    gm, args = capture(model, example_input, train=config.train)
    ctx = PassContext(config=unreduced(config), args=args, model_name=type(model).__name__)
    try:
        TOKENS.analyze(gm, ctx)
    except Exception:
        return _refused_unpruned(model, example_input, config, error)
    analysis = ctx.analysis
    prefix = analysis.prefix if config.protect == "auto" else int(config.protect)
    ctx.plan = PrunePlan(ctx.config, [], [b.tokens for b in analysis.blocks], prefix)
    attention_to_sdpa.run(gm, ctx)
    report = build_report(ctx, gm=gm)
    block = _block_of(analysis, error.node, error.module)
    where = f"block {block.index} ({block.module or 'root'})" if block is not None else "outside the blocks"
    if block is not None:
        report.blocks[block.index].refused = error.message
    said = error.message if getattr(error, "what", None) else f"{where} (module '{error.module or '-'}'): {error.message}"
    report.refused.insert(0, said)  # a refusal in model terms says where already
    report.config["at"] = config.at if config.at is not None else default_at(len(analysis.blocks))
    report.config["keep"] = config.keep
    report.notes.append(NOTHING_PRUNED)
    return report


def _refused_unpruned(model, example_input, config: Config, error: UnsupportedSiteError):
    """The refused report of a model without token blocks (a CNN, lines mode): the mode's own report of
    the same drops at keep=1.0, nothing pruned, with the refusal under "refused". Re-raises `error`
    where even that rewrite fails."""
    try:
        gm, ctx = rewrite(model, example_input, unreduced(config))
    except Exception:
        raise error from None
    report = ctx.mode.report(model, eager_module(gm), ctx, True, None)
    report.refused.insert(0, error.message)
    report.config["keep"] = config.keep
    report.notes.append(NOTHING_PRUNED)
    return report
