"""FLOP budgets: the keep rate whose FLOPs are the largest within `target_flops`, searched by
rewriting and counting the model (tokens mode here; lines mode: plan/budget_lines.py), and ToMe's
r at a budget (`TomeCurve`, which the applications share).

    config, result = plan_tokens_for_budget(model, x, config, unpruned, rewrite)

The searches run the whole pipeline, which sits above them: the run loop hands its `rewrite` in.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from repshift_fx.context import inserted, role_of
from repshift_fx.config import Config
from repshift_fx.errors import ConfigError
from repshift_fx.plan.tokens import kept_count
from repshift_fx.flops import count_macs, first_sample, node_macs

log = logging.getLogger("repshift_fx")

@dataclass(frozen=True)
class BudgetResult:
    """What the planner chose for `target_flops`, with the ratio measured on the rewritten graph."""

    target: float
    reached: float  # GMACs after / GMACs before, counted by the flop counter
    keep: float | None  # the single keep rate given to every drop (None: ToMe, which sets r)
    at: tuple[int, ...]
    kept: tuple  # non-prefix tokens kept at each drop; lines mode: (rows, cols) kept at each drop
    gflops_before: float
    gflops_after: float
    r: int | tuple[int, ...] | None = None  # score="tome": the tokens merged away in each block of at


@dataclass
class CostModel:
    """MACs per sample as a function of the token counts after each drop.

        macs(n_1, ..., n_d) = fixed + sum_j segment_j(n_j)

    `fixed` is everything before the first drop; segment j is everything that runs on the
    n_j tokens (prefix included) left by drop j, up to and including the scoring of drop j+1.
    Each segment is the polynomial through its measured points (n, MACs): with three points
    it is exact for linear layers (a n) plus attention (b n^2).
    """

    fixed: int
    points: list[dict[int, int]]  # per segment: {tokens: MACs}

    def segment(self, j: int, n: int) -> Fraction:
        pts = self.points[j]
        if n in pts:
            return Fraction(pts[n])
        total = Fraction(0)
        for xi, yi in pts.items():  # Lagrange interpolation, exact in rationals
            term = Fraction(yi)
            for xk in pts:
                if xk != xi:
                    term *= Fraction(n - xk, xi - xk)
            total += term
        return total

    def macs(self, tokens: tuple[int, ...]) -> int:
        return round(self.fixed + sum(self.segment(j, n) for j, n in enumerate(tokens)))


def kept_chain(rate: float, before: int, drops: int, fuse: bool = False) -> tuple[int, ...]:
    """Non-prefix tokens kept at each of `drops` drops with one rate, as `make_plan` counts them
    (with `fuse`, a drop that drops tokens passes one more, the fused token, to the next)."""
    return tuple(k for k, _ in _chain_with_fused(rate, before, drops, fuse))


def _chain_with_fused(rate: float, before: int, drops: int, fuse: bool) -> list[tuple[int, int]]:
    """(kept, fused) at each drop: fused is 1 where fuse adds the fused token."""
    chain, n = [], before
    for _ in range(drops):
        kept = kept_count(rate, n)
        fused = int(fuse and kept < n)
        chain.append((kept, fused))
        n = kept + fused
    return chain


def largest_rate(cost: Callable[[float], int], limit: Fraction, before: int) -> float | None:
    """The largest keep rate with cost(rate) <= limit, None if even 1/before (one token, or one row
    and one column of grids up to before x before) exceeds it.

    `cost` is a non-decreasing step function of the rate whose steps end at fractions j/m with
    m <= before (where some drop's ceil(rate * m) changes), at least 1/before^2 apart. Bisection
    to float precision therefore ends in the last step within the limit; the rate is then snapped
    to that step's end j/m, the simplest rate that gives the same schedule."""
    low, high = 1.0 / before, 1.0
    if cost(low) > limit:
        return None
    if cost(high) <= limit:
        return high
    while True:  # invariant: cost(low) <= limit < cost(high)
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if cost(middle) <= limit:
            low = middle
        else:
            high = middle
    snapped = float(Fraction(low).limit_denominator(before))
    return snapped if snapped < high and cost(snapped) == cost(low) else low


def _segments(gm, macs: dict[str, int], at: tuple[int, ...]) -> list[int]:
    """MACs per segment: 0 before the first drop, j after drop j (by data flow)."""
    after = {at.index(inserted(n).block) + 1: n.name for n in gm.graph.nodes
             if role_of(n) == "keep"}
    starts = {name: j for j, name in after.items()}
    segment, totals = {}, [0] * (len(at) + 1)
    for node in gm.graph.nodes:
        j = starts.get(node.name, max((segment[a.name] for a in node.all_input_nodes), default=0))
        segment[node.name] = j
        totals[j] += macs.get(node.name, 0)
    return totals


class Search:
    """What the budget searches of both modes share: the unpruned rewrite (the drops `at`), the
    original MACs, rewrites at a given keep, the largest rate within the budget and its result.
    tokens mode: `TokenSearch` below; lines mode: `budget_lines.LineSearch`.

    `unpruned` is the pipeline's (graph, context) at keep=1.0 (which drops `at` means, their sizes
    without pruning); `rewrite(model, example_input, config)` is the pipeline itself, handed in
    by the run loop that sits above this search."""

    least = "one token"  # what the lowest rate, 1/before, keeps at every drop

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        self.model, self.example_input, self.config = model, example_input, config
        self.unpruned, self._rewrite = unpruned, rewrite
        ctx = self.unpruned[1]
        self.at = ctx.plan.at
        if not self.at:
            raise ConfigError("target_flops needs at least one drop; pass at=")
        self.original = count_macs(model, first_sample(ctx.args))

    def config_for(self, keep) -> Config:
        return dataclasses.replace(self.config, keep=keep, at=self.at, target_flops=None)

    def rewrite(self, keep):
        return self._rewrite(self.model, self.example_input, self.config_for(keep))

    @property
    def limit(self) -> Fraction:
        """The budget in MACs: target * original."""
        return Fraction(self.config.target_flops) * self.original

    def largest(self, cost: Callable[[float], int], before: int) -> float:
        """`largest_rate` within the budget; ConfigError naming the lowest reachable ratio."""
        rate = largest_rate(cost, self.limit, before)
        if rate is None:
            self.below_reach(cost(1.0 / before), f"keeping {self.least} at every drop")
        return rate

    def below_reach(self, lowest: int, what: str) -> None:
        """ConfigError: the target is below `lowest` MACs, what `what` (the lowest schedule) reaches."""
        ratio = lowest / self.original
        raise ConfigError(
            f"target_flops={self.config.target_flops} is below what any schedule at at={self.at} reaches: {what} "
            f"gives a FLOP ratio of {ratio:.3f}. Ask for at least {math.ceil(ratio * 1000) / 1000}, "
            "or drop earlier (a smaller first block in at)."
        )

    def result(self, rate: float, reached: int, kept: tuple) -> tuple[Config, BudgetResult]:
        """The config to compress with (keep=rate) and the `BudgetResult` of `reached` MACs."""
        result = BudgetResult(self.config.target_flops, reached / self.original, rate, self.at, kept,
                              self.original / 1e9, reached / 1e9)
        log.info("target_flops=%s: keep=%.4f at %s keeps %s; FLOP ratio %.4f", result.target, rate, self.at,
                 kept, result.reached)
        return self.config_for(rate), result


class TokenSearch(Search):
    """Rewrites and counts the model at given kept counts (a small cache around the pipeline)."""

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        super().__init__(model, example_input, config, unpruned, rewrite)
        gm, ctx = self.unpruned
        self.prefix = ctx.plan.prefix
        self.before = ctx.plan.drops[0].before
        self.runs = {self.before: self._segments(gm, ctx)}
        self.totals: dict[tuple[int, ...], int] = {}

    def _segments(self, gm, ctx) -> list[int]:
        return _segments(gm, node_macs(gm, ctx.args), self.at)

    def at_first_drop(self, m: int) -> list[int]:
        """Segment MACs when the first drop keeps m tokens and the later drops keep all."""
        if m not in self.runs:
            self.runs[m] = self._segments(*self.rewrite((m / self.before,) + (1.0,) * (len(self.at) - 1)))
        return self.runs[m]

    def chain(self, rate: float) -> tuple[int, ...]:
        return kept_chain(rate, self.before, len(self.at), self.config.fuse)

    def passed(self, rate: float) -> tuple[int, ...]:
        """Non-prefix tokens leaving each drop (the fused token included)."""
        return tuple(k + f for k, f in _chain_with_fused(rate, self.before, len(self.at), self.config.fuse))

    def total(self, rate: float) -> int:
        """Measured MACs of the single-rate schedule (one rewrite per distinct schedule)."""
        chain = self.chain(rate)
        if chain not in self.totals:
            self.totals[chain] = sum(self._segments(*self.rewrite(rate)))
        return self.totals[chain]

    def cost_model(self) -> CostModel:
        sizes = sorted({self.before, -(-self.before // 2), 1})
        runs = {m: self.at_first_drop(m) for m in sizes}
        fixed = {r[0] for r in runs.values()}
        if len(fixed) != 1:
            log.info("FLOPs before the first drop vary with later token counts: %s", sorted(fixed))
        fused = {m: int(self.config.fuse and m < self.before) for m in sizes}  # fuse=True: one more token
        points = [{self.prefix + m + fused[m]: runs[m][j] for m in sizes} for j in range(1, len(self.at) + 1)]
        return CostModel(runs[self.before][0], points)


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
        low, high = -1, most  # cost(high) <= limit < cost(low)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self(middle) > limit else (low, middle)
        return high

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
    (`past_largest`)."""

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        super().__init__(model, example_input, config, unpruned, rewrite)
        self.curve = TomeCurve(self.macs, refused=self.unpruned[1].plan.drops[0].before)

    def config_for(self, r) -> Config:
        return dataclasses.replace(self.config, r=r, at=self.at, target_flops=None)

    def macs(self, r: int) -> int | None:
        """Measured MACs at `r` (one rewrite and count); None where some block holds too few tokens
        to merge r away."""
        try:
            gm, ctx = self.rewrite(r)
        except ConfigError:
            return None
        return sum(node_macs(gm, ctx.args).values())

    def plan(self) -> tuple[Config, BudgetResult]:
        r = self.curve.smallest_r_within(self.limit)
        r, reached = self.front_loaded(r) if r is not None else self.past_largest(self.curve.largest_r())
        kept = tuple(d.keep for d in self.unpruned[1].mode.make_plan(self.unpruned[1].analysis,
                                                                      self.config_for(r)).drops)
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
        return self.fewest_within(r, n, {n: self.curve(r)})

    def past_largest(self, most: int) -> tuple[tuple[int, ...], int]:
        """Where no r in every block is within the budget: most + 1 in the first k blocks and `most`
        in the rest, with the fewest k within it, among the k ToMe's matching allows (the tokens
        left for the last blocks bound it). ConfigError where even the largest such k is above."""
        r, macs = most + 1, {0: self.curve(most), len(self.at): None}
        allowed, refused = 0, len(self.at)  # most + 1 everywhere is refused: `most` is the largest r
        while refused - allowed > 1:
            k = (allowed + refused) // 2
            macs[k] = self.macs(self.schedule(r, k))
            allowed, refused = (k, refused) if macs[k] is not None else (allowed, k)
        if macs[allowed] > self.limit:
            self.below_reach(macs[allowed], f"ToMe with r={self.schedule(r, allowed) if allowed else most}")
        return self.fewest_within(r, allowed, macs)

    def fewest_within(self, r: int, high: int, macs: dict) -> tuple[int | tuple[int, ...], int]:
        """The fewest k <= `high` whose schedule(r, k) is within the budget, and its MACs; `macs` holds
        those measured already, schedule(r, high) within the budget, schedule(r, 0) above it."""
        low = 0
        while high - low > 1:
            k = (low + high) // 2
            macs[k] = macs[k] if k in macs else self.macs(self.schedule(r, k))
            low, high = (k, high) if macs[k] is None or macs[k] > self.limit else (low, k)
        return (r if high == len(self.at) else self.schedule(r, high)), macs[high]

    def schedule(self, r: int, k: int) -> tuple[int, ...]:
        return (r,) * k + (r - 1,) * (len(self.at) - k)


def plan_tokens_for_budget(model, example_input, config: Config, unpruned, rewrite: Callable
                           ) -> tuple[Config, BudgetResult]:
    """The single keep rate for `config.at` whose FLOPs are the largest <= target * original.

    The FLOPs of each segment are measured at three token counts (a rewrite and a count each),
    the search bisects the rate on that exact cost model (`largest_rate`), and the result is
    counted again on the rewritten graph; should the two ever disagree, the search
    runs again on measured counts. Returns the config to compress with (keep=rate) and the result.
    Raises ConfigError if even one token per drop exceeds the budget. score="tome": the smallest r
    within the budget (`TomeSearch`)."""
    if config.score == "tome":
        return TomeSearch(model, example_input, config, unpruned, rewrite).plan()
    measure = TokenSearch(model, example_input, config, unpruned, rewrite)
    cost = measure.cost_model()

    def predict(rate: float) -> int:
        return cost.macs(tuple(measure.prefix + k for k in measure.passed(rate)))

    rate = measure.largest(predict, measure.before)
    reached = measure.total(rate)
    if reached != predict(rate):
        log.info("FLOP cost model off (%d vs %d MACs); searching on measured counts", predict(rate), reached)
        rate = measure.largest(measure.total, measure.before)
        reached = measure.total(rate)
    return measure.result(rate, reached, measure.chain(rate))
