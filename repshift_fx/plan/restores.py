"""Plan: where every token comes back, which drops become MLP-only and which are skipped, decided
from what the analysis found needs every token (passes/find_token_needs.py), before any rewrite.

    plan = plan_tokens(analysis, config)     # a PrunePlan, or an UnsupportedSiteError with the plan

A drop that reaches a node needing every token (a per-token output, a grid reshape, windows, a
token-mixing weight) is answered, with restore="auto" (the default) or True, by putting every token
back after the last block before that node. Where that would undo the drop at once (the node is in
the next block: a windowed stage), the drop becomes MLP-only (the stage's later MLPs run on fewer
tokens) or, where it cannot, is skipped with a note. With restore=False, or where nothing helps,
the planner refuses, in the model's terms.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from repshift_fx.config import Config
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.plan.tokens import Drop, PrunePlan, make_plan, run_of
from repshift_fx.wording import need_message


@dataclass(frozen=True)
class Need:
    """A node that needs every token, as a probe found it."""

    refusal: UnsupportedSiteError  # what the probe's pass raised (needs_every_token=True)
    restore_after: int | None  # the last block whose output reaches the node; None: no block does
    where: str  # where the node lies, in the model's terms: "block 5 (layers.1.blocks.0)"
    first_ok: int | None  # the first block a drop after which runs past it; None: none


def plan_tokens(analysis, config: Config) -> PrunePlan:
    """The plan of `config` on `analysis`, with the restores, MLP-only drops and skips the needs call for."""
    plan = make_plan(analysis, config)
    if config.restore is False:
        unmet = _first_unmet(plan, analysis)
        if unmet is not None:
            raise _refusal(unmet[1], plan, analysis, tried_restore=False)
        return plan
    restore_after, mlp_only, skipped, first, hint = frozenset(), frozenset(), {}, None, ""
    while (unmet := _first_unmet(plan, analysis)) is not None:
        drop, need = unmet
        first = first or need
        block = need.restore_after
        if block is None or block in restore_after:  # nothing to restore before it, or restoring did not help
            raise _refusal(first, plan, analysis, tried_restore=True)
        undone = _undone_at_once(plan, analysis, block)
        if undone is None:
            restore_after |= {block}
        elif _mlp_only_may_help(config, undone):
            mlp_only |= {block}
        else:
            hint = hint or _mlp_only_hint(config)
            config = _without_drop(config, plan, block)
            if config is None:
                raise _refusal(first, plan, analysis, tried_restore=True, hint=hint)
            skipped[block] = need
        plan = make_plan(analysis, config, restore_after=restore_after, mlp_only=mlp_only)
    if skipped and not plan.prunes(analysis.blocks):  # every drop left was undone at once: a refusal, not a no-op
        raise _refusal(first, plan, analysis, tried_restore=True, hint=hint)
    plan.restore_after, plan.skipped = restore_after, frozenset(skipped)
    plan.notes = [_skip_note(need, block) for block, need in skipped.items()]
    return plan


def _first_unmet(plan: PrunePlan, analysis) -> tuple[Drop, Need] | None:
    """The first drop whose tokens reach a node that needs every token before they are put back."""
    restored = {d.block: block for block, drops in plan.restore_at for d in drops}
    run_start = {d.block: run_of(analysis, d.block)[0].index for d in plan.drops}
    for drop in plan.drops:
        if drop.mlp_only:
            continue
        later = tuple(d.block for d in plan.drops if not d.mlp_only and run_start[d.block] == run_start[drop.block])
        need = analysis.needs.first_after(drop.block, later)
        back = restored.get(drop.block)
        if need is not None and (back is None or need.restore_after is None or back > need.restore_after):
            return drop, need
    return None


def _undone_at_once(plan: PrunePlan, analysis, block: int) -> Drop | None:
    """The drop made at `block`'s output, which restoring after `block` would undo before any block ran."""
    output = analysis.blocks[block].output
    return next((d for d in plan.drops if d.block == block and d.after == output), None)


def _mlp_only_may_help(config: Config, drop: Drop) -> bool:
    """An MLP-only drop (Drop.mlp_only) only drops: no merge, no ToMe, no fused token."""
    return config.reduce == "drop" and config.score != "tome" and not config.fuse and not drop.mlp_only


def _mlp_only_hint(config: Config) -> str:
    """What would let a drop undone at once still prune: an MLP-only drop, which only drops."""
    if config.score == "tome" or config.reduce == "merge" or config.fuse:
        chosen = "score='tome'" if config.score == "tome" else "reduce='merge'" if config.reduce == "merge" else "fuse=True"
        return (f"With {chosen} the drop cannot skip only the MLPs of the stage's later blocks; with reduce='drop' "
                "(the default) it can.")
    return ""


def _without_drop(config: Config, plan: PrunePlan, block: int) -> Config | None:
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


def _refusal(need: Need, plan: PrunePlan, analysis, tried_restore: bool, hint: str = "") -> UnsupportedSiteError:
    """The refusal of `need`, in the model's terms where the probe said what the node does, with the plan."""
    what = getattr(need.refusal, "what", None)
    if what is None:
        refusal = copy.copy(need.refusal)  # the probe's own is remembered with the trace
    else:
        refusal = UnsupportedSiteError(need_message(what, need.where, need.first_ok, tried_restore, hint),
                                       node=need.refusal.node, module=need.refusal.module, needs_every_token=True)
        refusal.what = what
    refusal.plan, refusal.analysis = plan, analysis
    return refusal


def _skip_note(need: Need, block: int) -> str:
    refusal = need.refusal
    what = getattr(refusal, "what", None) or f"module '{refusal.module or 'root'}' needs every token"
    return (f"the drop after block {block} is skipped: right after it, {what}; the tokens would be put back "
            "before any block ran on fewer. Drop at an earlier block of its stage (at=...)")
