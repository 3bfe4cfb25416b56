"""Analyze: the nodes that need every token, found by probe rewrites on a copy of the graph.

Expects: `find_sites` has run (`ctx.analysis`), and `ctx.mode` is the tokens mode (its rewrite
passes run the probes). Guarantees: `ctx.analysis.needs` is a `TokenNeeds`; the graph is not changed.

    needs.first_after(block, drops) -> Need | None   # what a drop after `block` (and `drops`) first reaches
                                                     # that needs every token

Whether a node needs every token is a fact of the graph: a per-token output or dense head, a
reshape into a grid, windows, a token-mixing weight, a table sized for every token. It is found
the way a rewrite finds it (`token_shapes`, `verify`): a probe rewrites a copy of the graph with
tokens dropped after `block` and after the plan's later drops of its run, and the first node that
cannot take fewer is the need, located in the model's terms. Probes run when the planner asks
(plan/restores.py), once per stretch of blocks that one need covers, and are remembered with the
trace: a plain ViT costs one probe, a windowed stage one per block the schedule drops at.
"""
from __future__ import annotations

import dataclasses
import logging

import torch.fx

from repshift_fx.capture import copy_graph
from repshift_fx.config import Config
from repshift_fx.context import TokenRecords
from repshift_fx.errors import RepShiftError, UnsupportedSiteError
from repshift_fx.fx.nodes import nodes_by_name, reachable, within_module
from repshift_fx.plan.restores import Need
from repshift_fx.plan.tokens import kept_count, make_plan, run_of
from repshift_fx.wording import place

log = logging.getLogger("repshift_fx")
PROBE_KEEP = 0.7


class TokenNeeds:
    """What needs every token after each block, probed on demand and remembered per trace."""

    def __init__(self, gm: torch.fx.GraphModule, ctx):
        self._gm, self._ctx = copy_graph(gm), ctx  # the rewrite changes `gm` once planned
        self._prefix = ctx.analysis.prefix if ctx.config.protect == "auto" else int(ctx.config.protect)
        # {(prefix, first block probed, blocks dropped at): (last block it answers for, Need | None)},
        # shared by the copies of a reused trace
        self._found = gm.meta.setdefault("repshift_memo", {}).setdefault("needs", {})

    def first_after(self, block: int, drops: tuple[int, ...]) -> Need | None:
        """The first node that tokens dropped after `block`, and after the blocks `drops` of its run
        (the plan's later drops), reach and that needs every token; None where nothing does, or a
        probe was refused for another reason (the rewrite then says why).

        A probe from `block` answers for every later block up to the need it found (or the run's end),
        with the same or fewer drops: the tokens reach that need first from there too."""
        drops = frozenset(d for d in drops if d >= block) | {block}
        for (prefix, start, probed), (end, need) in self._found.items():
            if prefix == self._prefix and start <= block <= end and drops <= probed:
                return need
        need = self._probe(block, drops)
        end = max(block, need.restore_after) if need is not None and need.restore_after is not None else run_of(self._ctx.analysis, block)[-1].index
        self._found[(self._prefix, block, drops)] = (end, need)
        return need

    def _probe(self, block: int, drops: frozenset[int]) -> Need | None:
        ctx = self._ctx
        config = _probe_config(ctx.analysis, block, drops, self._prefix, ctx.config)
        if config is None:
            return None
        probe = dataclasses.replace(ctx, config=config, notes=[], tokens=TokenRecords())
        probe.plan = make_plan(ctx.analysis, config)
        gm = copy_graph(self._gm)
        try:
            for p in ctx.mode.rewrite_passes:
                gm = p.run(gm, probe)
        except UnsupportedSiteError as refusal:
            return _need(self._gm, ctx.analysis, refusal) if refusal.needs_every_token else None
        except (RepShiftError, RuntimeError, ValueError, TypeError, IndexError) as error:
            log.debug("probe after block %d: %s", block, error)
        return None


def _probe_config(analysis, block: int, drops: frozenset[int], prefix: int, config: Config) -> Config | None:
    """About a third of the tokens dropped after each block of `drops` in `block`'s run, at least one
    (None: too few tokens). Not just one: with one prefix token, N - 1 tokens left would pass for a
    table sized for the N patches."""
    run = run_of(analysis, block)
    last = run[-1] is analysis.blocks[-1]  # the last run: the tokens read by position after it are held
    held = len([p for p in getattr(analysis, "protected", {}) if p >= prefix]) if last else 0
    left = run[0].tokens - prefix - held
    at, keep = [], []
    for b in (b for b in run if b.index in drops):
        kept = min(left - 1, kept_count(PROBE_KEEP, left))
        if kept < 1:
            break
        at.append(b.index)
        keep.append(kept / left)
        left = kept
    if not at:
        return None
    return Config(keep=tuple(keep), at=tuple(at), score="norm", reduce="drop", restore="auto", protect=config.protect)


def _need(gm: torch.fx.GraphModule, analysis, refusal: UnsupportedSiteError) -> Need:
    """The refusal of a node that needs every token, placed in the captured graph."""
    by_name = nodes_by_name(gm)
    upstream = set()
    if refusal.node in by_name:
        upstream = {n.name for n in reachable([by_name[refusal.node]], lambda n: n.all_input_nodes)}
    where, first_ok = place(analysis, refusal.module, upstream)
    return Need(refusal, _last_block_before(analysis, refusal, upstream, refusal.node in by_name), where, first_ok)


def _last_block_before(analysis, refusal: UnsupportedSiteError, upstream: set[str], captured: bool) -> int | None:
    """The last block whose output reaches the node that needs every token; for a node a rewrite
    made (the mask of an attention rewritten to SDPA), the block before the one whose module holds it."""
    if not captured:
        holder = [b.index for b in analysis.blocks if within_module(refusal.module, b.module)]
        return holder[0] - 1 if holder and holder[0] > 0 else None
    return max((b.index for b in analysis.blocks if b.output in upstream), default=None)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    ctx.analysis.needs = TokenNeeds(gm, ctx)
    return gm
