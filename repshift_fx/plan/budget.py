"""FLOP budgets: the keep rate whose FLOPs are the largest within `target_flops`, searched by
rewriting and counting the model, in either mode (ToMe's r at a budget: plan/tome_budget.py).

    config, result = plan_tokens_for_budget(model, x, config, unpruned, rewrite)   # tokens mode
    config, result = plan_lines_for_budget(model, x, config, unpruned, rewrite)    # lines mode

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
from repshift_fx.errors import ConfigError, TargetOutOfReach
from repshift_fx.plan.line_grids import GridWalk
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


def step_ends(rate: float, before: int) -> tuple[float | None, float | None]:
    """The step ends strictly below and above `rate`: the rates j/m with m <= before, 1/before to 1,
    at which some drop's kept count changes (`largest_rate`); None past either end. A float within
    rounding of an end (1/3) is taken as that end."""
    r = Fraction(rate)
    end = r.limit_denominator(before)
    r = end if abs(end - r) < Fraction(1, 10**12) else r
    below = max(Fraction(math.ceil(r * m) - 1, m) for m in range(1, before + 1))
    above = min(Fraction(math.floor(r * m) + 1, m) for m in range(1, before + 1))
    return (float(below) if below >= Fraction(1, before) else None), (float(above) if above <= 1 else None)


def ends_from(rate: float, before: int, down: bool):
    """`rate`, then each step end below it (`down`) or above it, while there is one."""
    while rate is not None:
        yield rate
        rate = step_ends(rate, before)[0 if down else 1]


def walk_to_largest(cost: Callable[[float], int], limit: Fraction, before: int, rate: float,
                    changes: int = 3) -> float | None:
    """`largest_rate` by steps from a close guess `rate`: up while the next step is within `limit`,
    or down until one is. None where the cost changed more than `changes` times on the way (the
    guess was not close: bisect instead) or where even 1/before is over."""
    seen = {cost(rate)}
    down = cost(rate) > limit
    while len(seen) <= changes + 1:
        step = step_ends(rate, before)[0 if down else 1]
        if step is None:
            return None if down else rate
        seen.add(cost(step))
        within = cost(step) <= limit
        if down and within:
            return step
        if not down and not within:
            return rate
        rate = step
    return None


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
    tokens mode: `TokenSearch`; lines mode: `LineSearch`; ToMe: `tome_budget.TomeSearch`.

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
            self.below_reach(cost(1.0 / before), f"keeping {self.least} at every drop", {"keep": 1.0 / before})
        return rate

    def below_reach(self, lowest: int, what: str, amount: dict) -> None:
        """TargetOutOfReach: the target is below `lowest` MACs, what `what` (the lowest schedule, the
        compress() option `amount`) reaches."""
        ratio = lowest / self.original
        raise TargetOutOfReach(
            f"target_flops={self.config.target_flops} is below what any schedule at at={self.at} reaches: {what} "
            f"gives a FLOP ratio of {ratio:.3f}. Ask for at least {math.ceil(ratio * 1000) / 1000}, "
            "or drop earlier (a smaller first block in at).", lowest=float(ratio), deepest=dict(amount, at=self.at)
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


def plan_tokens_for_budget(model, example_input, config: Config, unpruned, rewrite: Callable
                           ) -> tuple[Config, BudgetResult]:
    """The single keep rate for `config.at` whose FLOPs are the largest <= target * original.

    The FLOPs of each segment are measured at three token counts (a rewrite and a count each),
    the search bisects the rate on that cost model (`largest_rate`; exact for drops), and the result
    is counted again on the rewritten graph; where the two disagree (merges, by a fraction of a
    percent), the search steps from there on measured counts (`walk_to_largest`), or bisects them
    if that takes more than a few steps. Returns the config to compress with (keep=rate) and the result.
    Raises ConfigError if even one token per drop exceeds the budget."""
    measure = TokenSearch(model, example_input, config, unpruned, rewrite)
    cost = measure.cost_model()

    def predict(rate: float) -> int:
        return cost.macs(tuple(measure.prefix + k for k in measure.passed(rate)))

    rate = measure.largest(predict, measure.before)
    reached = measure.total(rate)
    if reached != predict(rate):  # a merge's matching costs (n - k) k C, which the segments cannot hold
        log.info("FLOP cost model off (%d vs %d MACs); stepping from its rate on measured counts", predict(rate),
                 reached)
        rate = walk_to_largest(measure.total, measure.limit, measure.before, rate) or \
            measure.largest(measure.total, measure.before)
        reached = measure.total(rate)
    return measure.result(rate, reached, measure.chain(rate))


class LineSearch(Search):
    """Measured MACs of the single-rate schedules, one rewrite and count per distinct schedule.

    A schedule is the (rows, cols) kept at each drop. The grid that reaches a drop depends on what
    the earlier drops kept (strided convolutions round it): `GridWalk` works it out from the
    unpruned rewrite's shapes, and says which schedules a convolution or pooling after a drop
    refuses (kernel 2 stride 2 on an odd count, ...), before any rewrite. `refused[kept]` holds
    the reason for the counts `kept` fixed up to the refusal."""

    least = "one row and one column"

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        super().__init__(model, example_input, config, unpruned, rewrite)
        gm, ctx = self.unpruned
        self.walk = GridWalk(gm, ctx.plan)
        self.refused: dict[tuple, str] = {}
        self.totals: dict[tuple, int] = {self.schedule(1.0): count_macs(gm, first_sample(ctx.args))}
        # rates step where ceil(rate * m) does, m a side of a grid at a drop: at most the largest unpruned one
        self.before = max(max(d.rows, d.cols) for d in ctx.plan.drops)

    def _walked(self, rate: float) -> tuple[tuple[tuple[int, int], ...], str | None]:
        return self.walk([(rate, rate)] * len(self.at))

    def schedule(self, rate: float) -> tuple[tuple[int, int], ...]:
        """(rows, cols) kept at each drop with `rate` (up to a refusal)."""
        return self._walked(rate)[0]

    def cost(self, rate: float) -> float:
        """Measured MACs at keep=rate, counted on the rewritten graph; infinity (over any budget)
        where a layer after a drop refuses the counts."""
        kept, refusal = self._walked(rate)
        if refusal is not None:
            if kept not in self.refused:
                log.info("target_flops: keep=%.4f refused, counted as over the budget: %s", rate, refusal)
            self.refused[kept] = refusal
            return math.inf
        if kept not in self.totals:
            gm, ctx = self.rewrite(rate)
            self.totals[kept] = count_macs(gm, first_sample(ctx.args))
        return self.totals[kept]

    def allowed(self, rate: float) -> float | None:
        """The largest rate <= `rate` whose schedule is not refused (a step's end), None if none."""
        return next((r for r in ends_from(rate, self.before, down=True) if self.cost(r) != math.inf), None)

    def floor_cost(self, rate: float) -> float:
        """MACs of `allowed(rate)`, 0 if None: non-decreasing in the rate with steps at the step ends,
        refusals or not, which is what `largest_rate` needs."""
        found = self.allowed(rate)
        return 0 if found is None else self.cost(found)


def plan_lines_for_budget(model, example_input, config: Config, unpruned, rewrite: Callable
                          ) -> tuple[Config, BudgetResult]:
    """The single rate, for rows and columns at every drop in `at`, whose FLOPs are the largest
    <= target * original: `largest_rate` bisects on the FLOPs counted on the rewritten graph (a
    CNN has few distinct schedules: one rewrite each). A schedule that a convolution or pooling
    refuses (kernel 2 stride 2 on an odd count, ...) is passed over for the next smaller one.
    Returns the config to compress with (keep=rate) and the result, whose `kept` holds the
    (rows, cols) kept at each drop. Raises ConfigError if the smallest schedule exceeds the budget."""
    search = LineSearch(model, example_input, config, unpruned, rewrite)
    rate = search.allowed(search.largest(search.floor_cost, search.before))
    if rate is None:  # the smallest schedule the strided layers allow is over the budget
        upward = ends_from(1.0 / search.before, search.before, down=False)
        fewest = next(r for r in upward if search.cost(r) != math.inf)
        kept = ", ".join(f"{r}x{c}" for r, c in search.schedule(fewest))
        search.below_reach(search.cost(fewest), f"keeping {kept} rows x columns, the fewest the layers after the "
                                                "drops take,", {"keep": fewest})
    if search.refused:
        log.info("target_flops: %d schedule(s) refused, passed over", len(search.refused))
    return search.result(rate, search.cost(rate), search.schedule(rate))
