"""Plan: turn the configuration and the analysis into a `PrunePlan` (which block drops how many).

    Config(keep, at, site, distance, ...) + Analysis(blocks, prefix) -> PrunePlan

The budget searches (`target_flops`) that choose `keep` run the whole pipeline: plan/budget.py.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from repshift_fx.config import Config
from repshift_fx.errors import ConfigError, UnsupportedSiteError

log = logging.getLogger("repshift_fx")


@dataclass(frozen=True)
class Drop:
    """After block `block`, keep `prefix` + `keep` of the `prefix` + `before` tokens."""

    block: int
    after: str  # node whose output is gathered: the block's output
    score_inputs: tuple[str, ...]  # (changed, reference) for shift; (tokens,) for norm/random
    prefix: int
    before: int  # non-prefix tokens entering the drop
    keep: int  # non-prefix tokens kept
    fused: int = 0  # 1 when fuse=True folds the dropped tokens into one more token after the kept ones

    @property
    def out(self) -> int:
        """Tokens leaving the drop, prefix and fused token included."""
        return self.prefix + self.keep + self.fused


@dataclass
class PrunePlan:
    config: Config
    drops: list[Drop]
    tokens: list[int]  # tokens entering each block, prefix included
    prefix: int

    @property
    def at(self) -> tuple[int, ...]:
        return tuple(d.block for d in self.drops)


def default_at(depth: int) -> tuple[int, ...]:
    """DeiT-S's 3.0 GFLOPs schedule, generalised: drop after blocks d/4, d/2 and 3d/4."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4} - {depth - 1} - {-1}))


def kept_count(keep: float, n: int) -> int:
    """ceil(keep * n), robust to float noise (0.7 * 196 = 137.19999... -> 138)."""
    return max(1, min(n, math.ceil(round(keep * n, 9))))


def _score_inputs(block, config: Config) -> tuple[str, ...]:
    if config.score != "shift":
        return (block.output,)
    if config.site == "block":
        return (block.output, block.input)
    site = block.mlp if config.site == "mlp" else block.mixer
    if site is None:
        raise UnsupportedSiteError(
            f"site='attn' needs an attention sub-layer in block {block.index} ({block.module}), "
            "but this block has only an MLP; use site='mlp' or site='block'"
        )
    return (site.add if config.residual else site.branch, site.stream)


def check_at(at: tuple[int, ...], depth: int, first: str, kind: str = "blocks") -> None:
    """Refuse block indices outside 0..depth-1, saying how many blocks were found and where."""
    bad = [i for i in at if not 0 <= i < depth]
    if bad:
        raise ConfigError(
            f"at={at} names block(s) {bad}, but {depth} {kind} were found (0..{depth - 1}, first at {first})"
        )


def check_keep_chosen(config: Config) -> None:
    """A plan needs a keep rate: target_flops is turned into one by `plan_for_budget` first."""
    if config.keep is None:
        raise ConfigError(
            f"target_flops={config.target_flops} needs the FLOPs measured on the model: use "
            "repshift_fx.compress()/inspect(), which choose the keep rate, or pass keep="
        )


def make_plan(analysis, config: Config) -> PrunePlan:
    check_keep_chosen(config)
    depth = len(analysis.blocks)
    at = config.at if config.at is not None else default_at(depth)
    if not at:
        raise ConfigError(f"the model has {depth} blocks: too few for the default schedule; pass at=")
    check_at(at, depth, analysis.blocks[0].module or "the root")
    keeps = config.keep if isinstance(config.keep, tuple) else (config.keep,) * len(at)
    if len(keeps) != len(at):
        raise ConfigError(f"keep has {len(keeps)} rates for {len(at)} entries of at={at}")
    prefix = analysis.prefix if config.protect == "auto" else int(config.protect)
    if prefix >= analysis.blocks[0].tokens:
        raise ConfigError(f"protect={prefix} leaves no token to prune of {analysis.blocks[0].tokens}")

    drops, tokens, n = [], [], analysis.blocks[0].tokens - prefix
    schedule = dict(zip(at, keeps))
    for block in analysis.blocks:
        tokens.append(prefix + n)
        if block.index in schedule:
            keep = kept_count(schedule[block.index], n)
            fused = int(config.fuse and keep < n)  # fuse=True: the dropped tokens become one token
            drops.append(Drop(block.index, block.output, _score_inputs(block, config), prefix, n, keep, fused))
            n = keep + fused
    return PrunePlan(config, drops, tokens, prefix)
