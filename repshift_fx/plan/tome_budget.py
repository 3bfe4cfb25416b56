"""ToMe's r at a FLOP budget: `TomeCurve` (FLOPs against r, shared with the applications) and
`TomeSearch` (the planner's schedule for `target_flops` with score="tome").

    config, result = TomeSearch(model, x, config, unpruned, rewrite).plan()
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from repshift_fx.config import Config
from repshift_fx.errors import ConfigError
from repshift_fx.flops import node_macs
from repshift_fx.plan.budget import BudgetResult, Search

log = logging.getLogger("repshift_fx")


def first_within(low: int, high: int, cost: Callable[[int], float | None], limit,
                 saved: Callable[[int], float] = float) -> int:
    """The smallest x in (low, high] with cost(x) <= limit, where the cost falls as x grows,
    cost(high) <= limit, and cost(low) > limit (or low is a bound never costed); None counts as over.

    Regula falsi on integers: the next x is where the straight line through the bracket's two costs
    against `saved(x)` (what x saves, up to a factor: x itself by default) meets the limit, kept one
    in from either end (so a close guess is followed by its neighbour), and where two probes did not
    halve the bracket the next is its middle: a bent curve takes at most twice bisection's probes."""
    widths = [2 * (high - low) + 2] * 2  # no probe yet: no halving missed
    while high - low > 1:
        halve = high - low > widths[-2] // 2
        line = not halve and low >= 0 and cost(low) is not None and cost(low) > cost(high)
        x = _where_line_meets(low, high, cost, limit, saved) if line else (low + high) // 2
        over = cost(x) is None or cost(x) > limit
        low, high = (x, high) if over else (low, x)
        widths.append(high - low)
    return high


def _where_line_meets(low: int, high: int, cost: Callable, limit, saved: Callable) -> int:
    """The first x past `low` whose `saved(x)` reaches where the line through the bracket's costs
    meets `limit`; `high - 1` at most."""
    share = (cost(low) - limit) / (cost(low) - cost(high))
    needed = saved(low) + share * (saved(high) - saved(low))
    return next((x for x in range(low + 1, high) if saved(x) >= needed), high - 1)


class TomeCurve:
    """ToMe's FLOPs against r, the tokens merged away in every block: the one search for ToMe's r at
    a FLOP budget, for the planner (MACs) and the applications (FLOP ratios from inspect()).

        curve = TomeCurve(cost)               # cost(r): MACs or a FLOP ratio; None where r is refused
        curve.smallest_r_within(limit)        # the smallest r at most `limit`, None if out of reach
        curve.nearest_r(target)               # the r whose cost comes nearest `target`

    `cost(r)` is None where ToMe's bipartite matching cannot merge r away (some block holds too few
    tokens); refusals, once reached, hold for every larger r, and the cost falls as r grows, so both
    searches bisect. Each r is costed once. `refused`: an r known to be refused (the tokens before
    the first merge); without it, one is found by doubling r from 1."""

    def __init__(self, cost: Callable[[int], float | None], refused: int | None = None):
        self._cost, self._refused = cost, refused
        self.costs: dict[int, float | None] = {}

    def __call__(self, r: int) -> float | None:
        if r not in self.costs:
            self.costs[r] = self._cost(r)
        return self.costs[r]

    def _bracket(self) -> tuple[int, int]:
        """(an allowed r, a refused r): r=0 is taken to be allowed."""
        if self._refused is not None:
            return 0, self._refused
        high = 1
        while self(high) is not None:
            high *= 2
        return high // 2, high

    def largest_r(self) -> int:
        """The largest r ToMe allows."""
        low, high = self._bracket()
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self(middle) is not None else (low, middle)
        return low

    def smallest_r_within(self, limit) -> int | None:
        """The smallest r whose cost is at most `limit`; None where even the largest r's is above it."""
        most = self.largest_r()
        if self(most) > limit:
            return None
        return first_within(-1, most, self, limit)

    def nearest_r(self, target: float) -> int:
        """The r whose cost comes nearest `target` (the smaller r on a tie; the largest r where
        every cost is above it)."""
        within = self.smallest_r_within(target)
        if within is None:
            return self.largest_r()
        if within > 0 and abs(self(within - 1) - target) <= abs(self(within) - target):
            return within - 1
        return within


class TomeSearch(Search):
    """ToMe at a FLOP budget: the smallest r (the same in every block of `at`) within it (`TomeCurve`
    of the MACs measured on the rewritten graph), then one more token merged in as few of the first
    blocks as keep it within (`front_loaded`): a decreasing schedule, as in ToMe's paper. Where even
    the largest r is above the budget (few tokens), one more than it in the first blocks
    (`past_largest`). The planner says which schedules it refuses without a rewrite; the others are
    rewritten and counted, as few as `first_within` needs (on the real ViT at 112 px: 5 or 6
    rewrites where bisection took 15)."""

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        super().__init__(model, example_input, config, unpruned, rewrite)
        self.curve = TomeCurve(self.macs, refused=self.unpruned[1].plan.drops[0].before)

    def config_for(self, r) -> Config:
        return dataclasses.replace(self.config, r=r, at=self.at, target_flops=None)

    def macs(self, r: int) -> int | None:
        """Measured MACs at `r` (one rewrite and count); None where some block holds too few tokens
        to merge r away, which the planner says before any rewrite (`plans`)."""
        if not self.plans(r):
            return None
        try:
            gm, ctx = self.rewrite(r)
        except ConfigError:
            return None
        return sum(node_macs(gm, ctx.args).values())

    def planned(self, r):
        """The planner's plan for `r` on the unpruned rewrite's analysis (the token counts do not
        depend on r); ConfigError where it refuses r."""
        ctx = self.unpruned[1]
        return ctx.mode.make_plan(ctx.analysis, self.config_for(r))

    def plans(self, r) -> bool:
        """Whether the planner takes `r`: the searches probe many refused r, and a refusal costs no
        rewrite this way."""
        try:
            self.planned(r)
        except ConfigError:
            return False
        return True

    def plan(self) -> tuple[Config, BudgetResult]:
        r = self.curve.smallest_r_within(self.limit)
        r, reached = self.front_loaded(r) if r is not None else self.past_largest(self.curve.largest_r())
        kept = tuple(d.keep for d in self.planned(r).drops)
        result = BudgetResult(self.config.target_flops, reached / self.original, None, self.at, kept,
                              self.original / 1e9, reached / 1e9, r)
        log.info("target_flops=%s: ToMe r=%s in blocks %s; FLOP ratio %.4f", result.target, r, self.at,
                 result.reached)
        return self.config_for(r), result

    def front_loaded(self, r: int) -> tuple[int | tuple[int, ...], int]:
        """The r schedule nearest the budget from below, and its MACs: r in the first k blocks of at and
        r - 1 in the rest, with the fewest k within the budget (k = len(at) is r everywhere). An integer
        r alone can undershoot the budget by a whole token per block: on short texts, by 5% of the FLOPs."""
        n = len(self.at)
        if r == 0 or n == 1:
            return r, self.curve(r)
        return self.fewest_within(r, n, {0: self.curve(r - 1), n: self.curve(r)})  # r - 1: costed by the search

    def past_largest(self, most: int) -> tuple[tuple[int, ...], int]:
        """Where no r in every block is within the budget: most + 1 in the first k blocks and `most`
        in the rest, with the fewest k within it, among the k ToMe's matching allows (the tokens
        left for the last blocks bound it). ConfigError where even the largest such k is above."""
        r, macs = most + 1, {0: self.curve(most)}
        allowed, refused = 0, len(self.at)  # most + 1 everywhere is refused: `most` is the largest r
        while refused - allowed > 1:  # which k the planner takes: no rewrite
            k = (allowed + refused) // 2
            allowed, refused = (k, refused) if self.plans(self.schedule(r, k)) else (allowed, k)
        while allowed:
            macs[allowed] = self.macs(self.schedule(r, allowed))
            if macs[allowed] is not None:
                break
            allowed -= 1  # a rewrite refused what the planner took
        if macs[allowed] > self.limit:
            deepest = self.schedule(r, allowed) if allowed else most
            self.below_reach(macs[allowed], f"ToMe with r={deepest}", {"r": deepest})
        return self.fewest_within(r, allowed, macs)

    def fewest_within(self, r: int, high: int, macs: dict) -> tuple[int | tuple[int, ...], int]:
        """The fewest k <= `high` whose schedule(r, k) is within the budget, and its MACs; `macs` holds
        those measured already, schedule(r, high) within the budget, schedule(r, 0) above it."""
        def cost(k: int) -> int | None:
            if k not in macs:
                macs[k] = self.macs(self.schedule(r, k))
            return macs[k]

        high = first_within(0, high, cost, self.limit, self.saved_by_first)
        return (r if high == len(self.at) else self.schedule(r, high)), macs[high]

    def saved_by_first(self, k: int) -> int:
        """What one more token merged in the first k blocks of at saves, up to a factor: a token
        merged in block b is gone from the MLP of b and every block after it."""
        depth = len(self.unpruned[1].analysis.blocks)
        return sum(depth - b for b in self.at[:k])

    def schedule(self, r: int, k: int) -> tuple[int, ...]:
        return (r,) * k + (r - 1,) * (len(self.at) - k)
