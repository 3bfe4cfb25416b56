"""The user's configuration, checked before anything is traced, and the state passes share."""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

SITES = ("mlp", "attn", "block")
DISTANCES = ("l2", "l1", "cosine")
SCORES = ("shift", "norm", "random")


@dataclass(frozen=True)
class Config:
    """What to prune and how to score (see `repshift_fx.compress` for each field)."""

    keep: float | tuple[float, ...] = 0.7
    at: tuple[int, ...] | None = None
    site: str = "mlp"
    distance: str = "l2"
    residual: bool = False
    score: str = "shift"
    protect: str | int = "auto"
    sdpa: bool = True

    def __post_init__(self):
        if self.at is not None:
            if isinstance(self.at, numbers.Integral):
                object.__setattr__(self, "at", (int(self.at),))
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in self.at):
                raise ConfigError(f"at must be a sequence of block indices (ints), got {self.at!r}")
            at = tuple(int(i) for i in self.at)
            if list(at) != sorted(set(at)):
                raise ConfigError(
                    f"at={at} must be strictly increasing with no repeats, e.g. {tuple(sorted(set(at)))}"
                )
            object.__setattr__(self, "at", at)
        keeps = self.keep if isinstance(self.keep, (tuple, list)) else (self.keep,)
        for k in keeps:
            if not isinstance(k, numbers.Real) or isinstance(k, bool) or not 0 < k <= 1:
                raise ConfigError(f"keep must be a float in (0, 1] (the fraction of tokens kept), got {k!r}")
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(self.keep))
        if isinstance(self.keep, tuple) and self.at is not None and len(self.keep) != len(self.at):
            raise ConfigError(
                f"keep has {len(self.keep)} rates but at has {len(self.at)} blocks; give one rate per "
                "entry of at, or a single float"
            )
        _choose("site", self.site, SITES)
        _choose("distance", self.distance, DISTANCES)
        _choose("score", self.score, SCORES)
        if self.protect != "auto" and (
            not isinstance(self.protect, numbers.Integral) or isinstance(self.protect, bool) or self.protect < 0
        ):
            raise ConfigError(f"protect must be 'auto' or a number of prefix tokens >= 0, got {self.protect!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; the options are {sorted(names)}")
        return cls(**kwargs)


def _choose(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class PassContext:
    """What the passes share: the config, the example args, and what earlier passes found."""

    config: Config
    args: tuple
    model_name: str = "model"
    weight_placeholders: frozenset[str] = frozenset()  # dynamo lifts parameters to placeholders
    analysis: Any = None  # passes.find_sites.Analysis
    plan: Any = None  # repshift_fx.plan.PrunePlan
    attention: list = field(default_factory=list)  # passes.attention_to_sdpa.AttentionRecord
    notes: list[str] = field(default_factory=list)
