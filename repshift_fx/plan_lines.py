"""Plan (lines mode): which residual blocks drop how many rows and columns.

    Config(keep, at, distance, score) + LineAnalysis(sites, stages) -> LinePlan
    Config(target_flops=R, at, ...) + model -> Config(keep=rate, at, ...)   (`plan_lines_for_budget`)

`keep` is a rate in (0, 1] for rows and columns alike, a pair `(rows, cols)`, or one of either per
entry of `at`. A drop keeps ceil(rate * H) rows and ceil(rate * W) columns of the grid that
reaches it; since earlier drops and strided convolutions change that grid, the counts are
filled in by `passes/line_shapes.py`, which runs the rewritten graph on the example input.
"""
from __future__ import annotations

import bisect
import logging
import math
import numbers
from dataclasses import dataclass, field

from .config import Config
from .errors import ConfigError, UnsupportedSiteError
from .flops import count_macs, first_sample
from .plan import BudgetResult, Search, check_at, check_keep_chosen, kept_count

log = logging.getLogger("repshift_fx")


@dataclass
class LineDrop:
    """After block `block`, keep `keep_rows` of `rows` rows and `keep_cols` of `cols` columns."""

    block: int
    after: str  # node whose output is gathered: the block output
    score_inputs: tuple[str, ...]  # (block output, shortcut) for shift; (block output,) for norm/random
    rates: tuple[float, float]  # (rows, cols)
    rows: int = 0  # filled by line_shapes
    cols: int = 0
    keep_rows: int = 0
    keep_cols: int = 0


@dataclass
class LinePlan:
    config: Config
    drops: list[LineDrop]
    grids_in: list[tuple[int, int]] = field(default_factory=list)  # (H, W) entering each block, after pruning
    grids_out: list[tuple[int, int]] = field(default_factory=list)  # (H, W) leaving each block (after its drop)
    prefix: int = 0  # a grid has no prefix tokens

    @property
    def at(self) -> tuple[int, ...]:
        return tuple(d.block for d in self.drops)

    @property
    def tokens(self) -> list[int]:
        """Positions (H * W) entering each block."""
        return [h * w for h, w in self.grids_in]


def _is_rate(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1


def _is_pair(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_rate(v) for v in value)


def line_rates(keep, count: int) -> list[tuple[float, float]]:
    """(rows, cols) rate for each of `count` drops from `keep` (see the module docstring)."""
    if _is_rate(keep):
        return [(float(keep), float(keep))] * count
    if _is_pair(keep):
        return [(float(keep[0]), float(keep[1]))] * count
    if isinstance(keep, (tuple, list)) and len(keep) == count and all(_is_rate(k) or _is_pair(k) for k in keep):
        return [(float(k), float(k)) if _is_rate(k) else (float(k[0]), float(k[1])) for k in keep]
    raise ConfigError(
        f"keep={keep!r} does not fit {count} drop(s): give a rate in (0, 1], a pair (rows, cols), or one "
        "rate or pair per entry of at"
    )


def check_line_config(config: Config) -> None:
    """Options that have no meaning on a grid."""
    if config.site == "attn":
        raise ConfigError("site='attn' needs an attention sub-layer; a CNN block has one site, scored across "
                          "the whole block: use the default site")
    if config.residual:
        raise ConfigError("residual=True has no other form in lines mode: the score is already across the "
                          "whole block, D(block(x), shortcut(x)); drop residual=True")
    if config.score == "attention" or config.fuse:  # token-mode baselines (passes/attention_scores.py)
        raise ConfigError(f"{'score=' + repr(config.score) if config.score == 'attention' else 'fuse=True'} works "
                          "on tokens (ViTs), not on the rows and columns of a CNN; use score='shift', 'norm' or "
                          "'random' without fuse")
    if config.protect not in ("auto", 0):
        raise ConfigError(f"protect={config.protect!r}: a (B, C, H, W) grid has no prefix tokens to protect")
    check_keep_chosen(config)


def default_line_at(analysis) -> tuple[int, ...]:
    """One drop, after the middle block (rounding down) of the second stage, among the blocks
    with nothing downstream that needs the full grid. With keep=0.7 this is ResNet-34's
    3.7 -> 2.5 GFLOPs of the paper (block 4, layer2.1: 3.66 -> 2.47); ResNet-50: block 4,
    4.09 -> 2.76. The paper's exact schedule is not stated; see docs/lines.md."""
    safe = {s.index for s in analysis.sites if not s.hazards}
    stages = [[i for i in stage if i in safe] for stage in analysis.stages]
    stages = [stage for stage in stages if stage]
    if not stages:
        return ()
    stage = stages[1] if len(stages) > 1 else stages[0]
    return (stage[(len(stage) - 1) // 2],)


def _check_hazards(analysis, at: tuple[int, ...]) -> None:
    safe = [s.index for s in analysis.sites if not s.hazards]
    for i in at:
        site = analysis.sites[i]
        if site.hazards:
            allowed = f"blocks {safe} have nothing of the kind after them" if safe else "no block can be pruned"
            raise UnsupportedSiteError(
                f"a drop after block {i} ({site.module or site.add}) is refused: {site.hazards[0]}; it needs "
                f"the full grid. Prune a block after it ({allowed}), or only the backbone."
            )


def _score_inputs(site, config: Config) -> tuple[str, ...]:
    return (site.output, site.shortcut) if config.score == "shift" else (site.output,)


def make_line_plan(analysis, config: Config) -> LinePlan:
    check_line_config(config)
    depth = len(analysis.sites)
    at = config.at if config.at is not None else default_line_at(analysis)
    if not at:
        first = next((h for s in analysis.sites for h in s.hazards), None)
        raise UnsupportedSiteError(f"no block of the {depth} found can be pruned: after each, {first}")
    check_at(at, depth, analysis.sites[0].module or analysis.sites[0].add, "residual blocks")
    _check_hazards(analysis, at)
    rates = line_rates(config.keep, len(at))
    sites = analysis.sites
    drops = [LineDrop(i, sites[i].output, _score_inputs(sites[i], config), r) for i, r in zip(at, rates)]
    return LinePlan(config, drops)


# --- FLOP budget: one rate for rows and columns at every drop, FLOPs <= target * original ---


class LineSearch(Search):
    """Measured MACs of the single-rate schedules, one rewrite and count per distinct schedule.

    A schedule is the (rows, cols) kept at each drop. The grid that reaches a drop depends on
    what the earlier drops kept (strided convolutions round it), so it is learnt from the
    rewrites: `grids[kept before drop i]` is the (H, W) that reaches drop i. A rate whose schedule
    follows from known grids costs a lookup; any other, one rewrite. `line_shapes` may refuse
    some counts (kernel 2 stride 2 on an odd count, ...): `refused[kept]` holds its error for
    every schedule that starts with the counts `kept` (those fixed before the refusal)."""

    least = "one row and one column"

    def __init__(self, model, example_input, config: Config, unpruned=None):
        super().__init__(model, example_input, config, unpruned)
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


def plan_lines_for_budget(model, example_input, config: Config, unpruned=None) -> tuple[Config, BudgetResult]:
    """The single rate, for rows and columns at every drop in `at`, whose FLOPs are the largest
    <= target * original: `largest_rate` bisects on the FLOPs counted on the rewritten graph (a
    CNN has few distinct schedules: one rewrite each). A schedule that a convolution or pooling
    refuses (kernel 2 stride 2 on an odd count, ...) is passed over for the next smaller one.
    Returns the config to compress with (keep=rate) and the result, whose `kept` holds the
    (rows, cols) kept at each drop. Raises ConfigError if the smallest schedule exceeds the budget."""
    search = LineSearch(model, example_input, config, unpruned)
    rate = search.allowed(search.largest(search.floor_cost, search.before))
    if rate is None:  # the smallest schedule the strided layers allow is over the budget
        fewest = next(r for r in search.ends if search.cost(r) != math.inf)
        kept = ", ".join(f"{r}x{c}" for r, c in search.schedule(fewest))
        search.below_reach(search.cost(fewest), f"keeping {kept} rows x columns, the fewest the layers after the "
                                                "drops take,")
    if search.refused:
        log.info("target_flops: %d schedule(s) refused, passed over", len(search.refused))
    return search.result(rate, search.cost(rate), search.schedule(rate))
