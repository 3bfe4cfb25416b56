"""Plan: turn the configuration and the analysis into a `PrunePlan` (which block drops how many).

    Config(keep, at, site, distance, ...) + Analysis(blocks, prefix) -> PrunePlan
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config
from .errors import ConfigError, UnsupportedSiteError


@dataclass(frozen=True)
class Drop:
    """After block `block`, keep `prefix` + `keep` of the `prefix` + `before` tokens."""

    block: int
    after: str  # node whose output is gathered: the block's output
    score_inputs: tuple[str, ...]  # (changed, reference) for shift; (tokens,) for norm/random
    prefix: int
    before: int  # non-prefix tokens entering the drop
    keep: int  # non-prefix tokens kept


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


def _check_side_inputs(analysis, first_drop: int) -> None:
    for block in analysis.blocks[first_drop + 1 :]:
        for site in (block.mixer, block.mlp):
            if site is not None and site.side_inputs:
                raise UnsupportedSiteError(
                    f"block {block.index} ({site.module}) reads {', '.join(site.side_inputs)}, "
                    "tensors that carry the token axis (rotary tables, masks or position biases) "
                    "and would keep their full length after a drop. Prune only after the last "
                    f"such block (at >= {block.index}), or choose another model."
                )


def make_plan(analysis, config: Config) -> PrunePlan:
    depth = len(analysis.blocks)
    at = config.at if config.at is not None else default_at(depth)
    if not at:
        raise ConfigError(f"the model has {depth} blocks: too few for the default schedule; pass at=")
    bad = [i for i in at if not 0 <= i < depth]
    if bad:
        raise ConfigError(
            f"at={at} names block(s) {bad}, but {depth} blocks were found "
            f"(0..{depth - 1}, first at {analysis.blocks[0].module or 'the root'})"
        )
    keeps = config.keep if isinstance(config.keep, tuple) else (config.keep,) * len(at)
    if len(keeps) != len(at):
        raise ConfigError(f"keep has {len(keeps)} rates for {len(at)} entries of at={at}")
    prefix = analysis.prefix if config.protect == "auto" else int(config.protect)
    if prefix >= analysis.blocks[0].tokens:
        raise ConfigError(f"protect={prefix} leaves no token to prune of {analysis.blocks[0].tokens}")
    _check_side_inputs(analysis, at[0])

    drops, tokens, n = [], [], analysis.blocks[0].tokens - prefix
    schedule = dict(zip(at, keeps))
    for block in analysis.blocks:
        tokens.append(prefix + n)
        if block.index in schedule:
            keep = kept_count(schedule[block.index], n)
            drops.append(Drop(block.index, block.output, _score_inputs(block, config), prefix, n, keep))
            n = keep
    return PrunePlan(config, drops, tokens, prefix)
