"""The run loop: capture -> analyze -> plan -> rewrite -> verify, the same for every mode.

    gm, ctx = rewrite(model, example_input, config)            # the rewritten graph and its context
    gm, report = run(model, example_input, config, flops)      # with the FLOP budget and the report

The steps live in their folders: capture/ (the graph and its shapes), passes/ (one pass a file:
analysis, rewrites, verify), plan/ (the schedule), report/ (what was done). A mode
(repshift_fx/modes/) names the passes, planner, report and budget search of one reduction.
compress(), inspect(), the dynamo backend (compile/backend.py) and the refused report
(report/refusals.py) all run through here.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx

from repshift_fx.capture import capture, copy_graph
from repshift_fx.config import Config
from repshift_fx.context import PassContext
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.fx.nodes import nodes_by_name, reachable
from repshift_fx.modes import choose
from repshift_fx.report.needs import in_model_terms


def run_passes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    """Analysis, planning and rewrites on a captured graph (shapes recorded), in the chosen mode."""
    return choose(gm, ctx).plan_and_rewrite(gm, ctx)


def rewrite(model: torch.nn.Module, example_input, config: Config) -> tuple[torch.fx.GraphModule, PassContext]:
    """Capture and rewrite. Unless restore=False, a refusal that putting the tokens back would
    avoid (a per-token output, a dense head) is answered by another rewrite that restores before
    it; a drop that restore would undo at once becomes MLP-only, or is skipped."""
    gm, args = capture(model, example_input)
    gm.eval()

    def attempt(graph, restore_after=frozenset(), skipped=(), mlp_only=frozenset()):
        ctx = PassContext(config=config, args=args, model_name=type(model).__name__, restore_after=restore_after,
                          skipped_drops=frozenset(skipped), mlp_only=mlp_only)
        return run_passes(graph, ctx), ctx

    if config.restore is False:
        try:
            return attempt(copy_graph(gm))
        except UnsupportedSiteError as refusal:
            raise in_model_terms(refusal, gm, tried_restore=False) from None
    restore_after, first, skipped, mlp_only, hint = frozenset(), None, {}, frozenset(), ""
    while True:
        try:
            result = attempt(copy_graph(gm), restore_after, skipped, mlp_only)
        except UnsupportedSiteError as refusal:
            first = first or refusal
            block = _last_block_before(gm, refusal) if refusal.needs_every_token else None
            if block is None or block in restore_after:  # nothing to restore before it, or it did not help
                raise in_model_terms(first, gm, tried_restore=refusal.needs_every_token) from None
            if _undone_at_once(refusal, block):  # restoring would undo that drop before any block ran
                if _mlp_only_may_help(config, refusal, block):  # the stage's MLPs can still run on fewer
                    mlp_only |= {block}
                    continue
                hint = hint or _mlp_only_hint(config)
                config = _without_drop(config, refusal.plan, block)
                if config is None:
                    raise in_model_terms(first, gm, tried_restore=True, hint=hint) from None
                skipped[block] = refusal
                continue
            restore_after |= {block}
            continue
        if skipped and not _prunes(result[1]):  # every drop left was undone at once: a refusal, not a no-op
            raise in_model_terms(first, gm, tried_restore=True, hint=hint)
        result[1].notes[:0] = [_skip_note(refusal, block) for block, refusal in skipped.items()]
        return result


def _prunes(ctx: PassContext) -> bool:
    """Some block runs on fewer tokens (modes without a token plan: taken as yes)."""
    return not hasattr(ctx.plan, "prunes") or ctx.plan.prunes(ctx.analysis.blocks)


def _without_drop(config: Config, plan, block: int) -> Config | None:
    """`config` with the drop after `block` left out of `at` (None if it was the only one)."""
    at = plan.at
    if len(at) < 2:
        return None
    i = at.index(block)
    field = "r" if config.score == "tome" else "keep"
    amount = getattr(config, field)
    if isinstance(amount, tuple):
        amount = amount[:i] + amount[i + 1:]
    return dataclasses.replace(config, at=at[:i] + at[i + 1:], **{field: amount})


def _skip_note(refusal: UnsupportedSiteError, block: int) -> str:
    what = getattr(refusal, "what", None) or f"module '{refusal.module or 'root'}' needs every token"
    return (f"the drop after block {block} is skipped: right after it, {what}; the tokens would be put back "
            "before any block ran on fewer. Drop at an earlier block of its stage (at=...)")


def mlp_only_block(gm: torch.fx.GraphModule, refusal: UnsupportedSiteError, config: Config) -> int | None:
    """The block whose drop `refusal` shows restore would undo at once, where an MLP-only drop can
    still prune (the stage's later MLPs); None where it cannot. `gm`: the graph before the rewrite."""
    block = _last_block_before(gm, refusal) if refusal.needs_every_token else None
    if block is None or not _undone_at_once(refusal, block) or not _mlp_only_may_help(config, refusal, block):
        return None
    return block


def _mlp_only_may_help(config: Config, refusal: UnsupportedSiteError, block: int) -> bool:
    """An MLP-only drop (plan.tokens.Drop.mlp_only) is worth trying for the drop after `block`:
    it drops (no merge, no fused token) and is not MLP-only already."""
    drop = next(d for d in refusal.plan.drops if d.block == block)
    return config.reduce == "drop" and config.score != "tome" and not config.fuse and not drop.mlp_only


def _mlp_only_hint(config: Config) -> str:
    """What would let a drop undone at once still prune: an MLP-only drop, which only drops."""
    if config.score == "tome" or config.reduce == "merge" or config.fuse:
        chosen = "score='tome'" if config.score == "tome" else "reduce='merge'" if config.reduce == "merge" else "fuse=True"
        return (f"With {chosen} the drop cannot skip only the MLPs of the stage's later blocks; with reduce='drop' "
                "(the default) it can.")
    return ""


def _undone_at_once(refusal: UnsupportedSiteError, block: int) -> bool:
    """Restoring after `block` would undo the drop made at that block's output before any block ran."""
    output = refusal.analysis.blocks[block].output
    return refusal.plan is not None and any(d.block == block and d.after == output for d in refusal.plan.drops)


def _last_block_before(gm: torch.fx.GraphModule, refusal: UnsupportedSiteError) -> int | None:
    """The last block whose output reaches the node that needs every token (on the captured graph;
    a node a rewrite made, such as the mask of an attention rewritten to SDPA: the block before the
    one whose module holds it)."""
    by_name = nodes_by_name(gm)
    if not hasattr(refusal.analysis, "blocks"):  # tokens mode only
        return None
    if refusal.node not in by_name:
        holder = [b.index for b in refusal.analysis.blocks if refusal.module and b.module and
                  (refusal.module == b.module or refusal.module.startswith(b.module + "."))]
        return holder[0] - 1 if holder and holder[0] > 0 else None
    upstream = {n.name for n in reachable([by_name[refusal.node]], lambda n: n.all_input_nodes)}
    found = [b.index for b in refusal.analysis.blocks if b.output in upstream]
    return max(found, default=None)


def rewrite_unpruned(model: torch.nn.Module, example_input, config: Config):
    """The rewrite at keep=1.0 (ToMe: r=0): which drops `at` means, and their sizes without pruning."""
    nothing = {"r": 0} if config.score == "tome" else {"keep": 1.0}
    return rewrite(model, example_input, dataclasses.replace(config, target_flops=None, **nothing))


def plan_for_budget(model: torch.nn.Module, example_input, config: Config):
    """`config.target_flops` -> the config with the keep rate chosen, and the `BudgetResult`.
    The search is the mode's; it rewrites through this loop, which it is handed."""
    unpruned = rewrite_unpruned(model, example_input, config)
    return unpruned[1].mode.search_budget(model, example_input, config, unpruned, rewrite)


def run(model: torch.nn.Module, example_input, config: Config, flops: bool):
    """The rewritten graph and its `Report` (GFLOPs per block with `flops`)."""
    budget = None
    if config.target_flops is not None:
        config, budget = plan_for_budget(model, example_input, config)
    gm, ctx = rewrite(model, example_input, config)
    return gm, ctx.mode.report(model, gm, ctx, flops, budget)
