"""FLOP budgets in lines mode: one rate for rows and columns at every drop, FLOPs <= target * original.

    config, result = plan_lines_for_budget(model, x, config, unpruned, rewrite)
"""
from __future__ import annotations

import bisect
import logging
import math
from typing import Callable

from repshift_fx.config import Config
from repshift_fx.errors import UnsupportedSiteError
from repshift_fx.plan.budget import BudgetResult, Search
from repshift_fx.plan.tokens import kept_count
from repshift_fx.flops import count_macs, first_sample

log = logging.getLogger("repshift_fx")


class LineSearch(Search):
    """Measured MACs of the single-rate schedules, one rewrite and count per distinct schedule.

    A schedule is the (rows, cols) kept at each drop. The grid that reaches a drop depends on
    what the earlier drops kept (strided convolutions round it), so it is learnt from the
    rewrites: `grids[kept before drop i]` is the (H, W) that reaches drop i. A rate whose schedule
    follows from known grids costs a lookup; any other, one rewrite. `line_shapes` may refuse
    some counts (kernel 2 stride 2 on an odd count, ...): `refused[kept]` holds its error for
    every schedule that starts with the counts `kept` (those fixed before the refusal)."""

    least = "one row and one column"

    def __init__(self, model, example_input, config: Config, unpruned, rewrite: Callable):
        super().__init__(model, example_input, config, unpruned, rewrite)
        self.grids: dict[tuple, tuple[int, int]] = {}
        self.totals: dict[tuple, int] = {}
        self.refused: dict[tuple, UnsupportedSiteError] = {}
        gm, ctx = self.unpruned
        self.totals[self._learn(ctx.plan)] = count_macs(gm, first_sample(ctx.args))
        # rates step where ceil(rate * m) does, m a side of a grid at a drop: at most the largest unpruned one
        self.before = max(max(d.rows, d.cols) for d in ctx.plan.drops)
        self.ends = sorted({j / m for m in range(1, self.before + 1) for j in range(1, m + 1)})  # the steps' ends

    def _learn(self, plan) -> tuple[tuple[int, int], ...]:
        """Note the grid that reached each drop `line_shapes` reached; the counts kept there."""
        kept = ()
        for drop in plan.drops:
            if not drop.rows:  # refused before this drop
                break
            self.grids[kept] = (drop.rows, drop.cols)
            kept += ((drop.keep_rows, drop.keep_cols),)
        return kept

    def schedule(self, rate: float) -> tuple[tuple[int, int], ...]:
        """(rows, cols) kept at each drop with `rate`, as `line_shapes` counts them, as far as the
        grids learnt so far tell (up to a refused prefix, or the first drop with an unknown grid)."""
        kept = ()
        for _ in self.at:
            grid = self.grids.get(kept)
            if kept in self.refused or grid is None:
                break
            kept += ((kept_count(rate, grid[0]), kept_count(rate, grid[1])),)
        return kept

    def cost(self, rate: float) -> float:
        """Measured MACs at keep=rate, counted on the rewritten graph; infinity (over any budget)
        where `line_shapes` refuses the counts."""
        kept = self.schedule(rate)
        if kept in self.refused:
            return math.inf
        if kept not in self.totals:
            try:
                gm, ctx = self.rewrite(rate)
            except UnsupportedSiteError as error:
                if getattr(error, "plan", None) is None:
                    raise
                self.refused[self._learn(error.plan)] = error
                log.info("target_flops: keep=%.4f refused, counted as over the budget: %s", rate, error.message)
                return math.inf
            kept = self._learn(ctx.plan)
            self.totals[kept] = count_macs(gm, first_sample(ctx.args))
        return self.totals[kept]

    def allowed(self, rate: float) -> float | None:
        """The largest rate <= `rate` whose schedule is not refused (a step's end), None if none."""
        below = self.ends[:bisect.bisect_left(self.ends, rate)]
        return next((r for r in [rate, *reversed(below)] if self.cost(r) != math.inf), None)

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
        fewest = next(r for r in search.ends if search.cost(r) != math.inf)
        kept = ", ".join(f"{r}x{c}" for r, c in search.schedule(fewest))
        search.below_reach(search.cost(fewest), f"keeping {kept} rows x columns, the fewest the layers after the "
                                                "drops take,")
    if search.refused:
        log.info("target_flops: %d schedule(s) refused, passed over", len(search.refused))
    return search.result(rate, search.cost(rate), search.schedule(rate))
