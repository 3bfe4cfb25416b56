"""Plan (lines mode): which residual blocks drop how many rows and columns.

    Config(keep, at, distance, score) + LineAnalysis(sites, stages) -> LinePlan

`keep` is a rate in (0, 1] for rows and columns alike, a pair `(rows, cols)`, or one of either per
entry of `at`. A drop keeps ceil(rate * H) rows and ceil(rate * W) columns of the grid that
reaches it; since earlier drops and strided convolutions change that grid, the counts are
filled in by `passes/line_shapes.py`, which runs the rewritten graph on the example input.
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

from repshift_fx.config import Config
from repshift_fx.errors import ConfigError, UnsupportedSiteError
from repshift_fx.plan.tokens import check_at, check_keep_chosen

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
    notes: list[str] = field(default_factory=list)

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
    token_only = f"score={config.score!r}" if config.score in ("attention", "tome") else "fuse=True" if config.fuse \
        else "reduce='merge'" if config.reduce == "merge" else None  # token-mode options (merging, attention maps)
    if token_only:
        raise ConfigError(f"{token_only} works on tokens (ViTs), not on the rows and columns of a CNN; use "
                          "score='shift', 'norm' or 'random', dropping lines, without fuse")
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
                f"a drop after block {i} ({site.module or 'the top level'}) is refused: {site.hazards[0]}; it needs "
                f"the full grid. Prune a block after it ({allowed}), or only the backbone."
            )


def _score_inputs(site, config: Config) -> tuple[str, ...]:
    return (site.output, site.shortcut) if config.score == "shift" else (site.output,)


def make_line_plan(analysis, config: Config) -> LinePlan:
    """The line drops of `at`."""
    check_line_config(config)
    depth = len(analysis.sites)
    at = config.at if config.at is not None else default_line_at(analysis)
    if not at:
        first = next((h for s in analysis.sites for h in s.hazards), None)
        raise UnsupportedSiteError(f"no block of the {depth} found can be pruned: after each, {first}. Line-wise "
                                   "pruning needs the full grid nowhere after a drop: compress a part of the model "
                                   "that holds no such op (its backbone alone), or use the model as it is")
    check_at(at, depth, analysis.sites[0].module or "the top level", "residual blocks")
    _check_hazards(analysis, at)
    rates = line_rates(config.keep, len(at))
    sites = analysis.sites
    drops = [LineDrop(i, sites[i].output, _score_inputs(sites[i], config), r) for i, r in zip(at, rates)]
    return LinePlan(config, drops)
