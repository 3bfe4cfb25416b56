"""The user's configuration, checked before anything is traced, and the state passes share."""
from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

from repshift_fx.errors import ConfigError

SITES = ("mlp", "attn", "block")
DISTANCES = ("l2", "l1", "cosine")
SCORES = ("shift", "norm", "random", "attention", "tome")  # attention: EViT-style CLS attention (explicit there)
REDUCES = ("drop", "merge")  # merge: the leaving tokens fold into their most similar kept token
MERGE_METRICS = ("keys", "stream")  # what "most similar" compares: the attention keys, or the stream
SIZE_ATTENTIONS = ("mask", "qk")  # proportional attention as an SDPA attn_mask, or an extra q/k column
MODES = ("auto", "tokens", "lines")  # lines: rows and columns of CNN maps (repshift_fx/plan/lines.py)
CHOICES = {"site": SITES, "distance": DISTANCES, "score": SCORES, "mode": MODES, "reduce": REDUCES,
           "merge_metric": MERGE_METRICS, "size_attention": SIZE_ATTENTIONS}  # the options that name a choice
SWITCHES = ("residual", "sdpa", "fuse")  # the options that are booleans (restore: True, False or "auto")


@dataclass(frozen=True)
class Config:
    """What to prune and how to score (see `repshift_fx.compress` for each field)."""

    keep: float | tuple[float, ...] | None = None  # None: 0.7, or chosen by target_flops
    at: tuple[int, ...] | None = None
    site: str = "mlp"
    distance: str = "l2"
    residual: bool = False
    score: str = "shift"
    protect: str | int = "auto"
    sdpa: bool = True
    target_flops: float | None = None  # FLOPs after / before; the planner chooses keep
    mode: str = "auto"  # "auto" (from the graph), "tokens" (ViTs) or "lines" (CNNs)
    fuse: bool = False  # EViT fusion: the dropped tokens folded into one extra token
    reduce: str = "drop"  # "drop", or "merge": the leaving tokens fold into their most similar kept token
    restore: bool | str = "auto"  # put every token back where the graph needs them all ("auto": where needed)
    r: int | tuple[int, ...] | None = None  # score="tome": tokens merged away in each block of `at`
    merge_metric: str = "keys"  # reduce="merge": similarity of the attention keys, or of the stream
    size_attention: str = "mask"  # proportional attention: SDPA attn_mask, or "qk" (no mask: flash on GPU)
    shift_guidance: float = 0.0  # score="tome": how much the block before's shift keeps a token from merging

    def __post_init__(self):
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} is a boolean: pass True or False, got {getattr(self, name)!r}")
        for name, allowed in CHOICES.items():
            if not _is_text(getattr(self, name), *allowed):
                raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, "
                                  f"got {getattr(self, name)!r}")
        _check_merging(self)
        _check_guidance(self)
        if self.target_flops is not None:
            _check_target_flops(self.target_flops, self.keep)
        elif self.keep is None and self.score != "tome":
            object.__setattr__(self, "keep", 0.7)
        if self.at is not None:
            at = (self.at,) if isinstance(self.at, numbers.Integral) else self.at
            at = tuple(at) if isinstance(at, Iterable) and not isinstance(at, (str, bytes)) else None
            if at is None or not all(_is_int(i) for i in at):
                raise ConfigError(f"at must be a sequence of block indices (ints), got {self.at!r}")
            at = tuple(int(i) for i in at)
            if not at:
                raise ConfigError("at=() names no block: give the indices of the blocks to drop after, e.g. at=(3, 6), "
                                  "or at=None for the default schedule")
            if list(at) != sorted(set(at)):
                raise ConfigError(
                    f"at={at} must be strictly increasing with no repeats, e.g. {tuple(sorted(set(at)))}"
                )
            object.__setattr__(self, "at", at)
        keeps = self.keep if isinstance(self.keep, (tuple, list)) else (self.keep,) if self.keep is not None else ()
        if isinstance(self.keep, (tuple, list)) and not self.keep:
            raise ConfigError("keep=() holds no rate: give a float in (0, 1], or one rate per entry of at")
        for k in _line_rates(keeps, self.mode):
            if not isinstance(k, numbers.Real) or isinstance(k, bool) or not 0 < k <= 1:
                raise ConfigError(f"keep must be a float in (0, 1] (the fraction of tokens kept), got {k!r}")
        if isinstance(self.keep, list):
            object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "keep", _nested_tuples(self.keep))
        if isinstance(self.keep, tuple) and self.at is not None and len(self.keep) != len(self.at) \
                and not _is_line_pair(self.keep, self.mode):
            raise ConfigError(
                f"keep has {len(self.keep)} rates but at has {len(self.at)} blocks; give one rate per "
                "entry of at, or a single float"
            )
        if not (isinstance(self.restore, bool) or _is_text(self.restore, "auto")):
            raise ConfigError(f"restore must be 'auto', True or False, got {self.restore!r}")
        if self.restore is True and self.fuse:
            raise ConfigError("restore=True cannot put back tokens that fuse=True folded into one; use "
                              "reduce='merge' (restore then unmerges), or fuse=False")
        if not _is_text(self.protect, "auto") and not (_is_int(self.protect) and self.protect >= 0):
            raise ConfigError(f"protect must be 'auto' or a number of prefix tokens >= 0, got {self.protect!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Config":
        check_names(kwargs, option_names())
        return cls(**kwargs)


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def check_names(given, valid, what: str = "option") -> None:
    """ConfigError for the first unknown name, naming the nearest valid one."""
    for name in given:
        if name not in valid:
            near = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the {what}s are {sorted(valid)}"
            raise ConfigError(f"unknown {what} {name!r}{hint}")


def _check_merging(config: Config) -> None:
    """The options of merging and of the ToMe baseline, which exclude some others."""
    if config.score == "tome":
        if config.reduce == "merge":
            raise ConfigError("score='tome' chooses its own merges (bipartite matching); reduce='merge' folds the "
                              "tokens a per-token score ranks last: use one of them")
        if config.r is None and config.target_flops is None:
            raise ConfigError("score='tome' merges r tokens away in each block of at: pass r= (an int, or one per "
                              "entry of at), e.g. r=8, or target_flops= (the planner chooses one r)")
        if config.keep is not None:
            raise ConfigError("score='tome' sets the amount of merging with r= (or target_flops=), not keep=")
        if config.r is not None and config.target_flops is not None:
            raise ConfigError(f"r={config.r!r} and target_flops={config.target_flops!r} both set the amount of "
                              "ToMe's merging; give one")
        if config.r is None:
            return
        rs = config.r if isinstance(config.r, (tuple, list)) else (config.r,)
        if not rs or not all(_is_int(r) and r >= 0 for r in rs):
            raise ConfigError(f"r must be a number of tokens >= 0, or one per entry of at, got {config.r!r}")
        object.__setattr__(config, "r", tuple(int(r) for r in config.r) if isinstance(config.r, (tuple, list))
                           else int(config.r))
    elif config.r is not None:
        raise ConfigError(f"r={config.r!r} is the number of tokens ToMe merges per block: it needs score='tome'")
    if config.fuse and (config.reduce == "merge" or config.score == "tome"):
        raise ConfigError("fuse=True folds the dropped tokens into one extra token; with reduce='merge' each leaving "
                          "token folds into its most similar kept token already: use one of them")


def _check_guidance(config: Config) -> None:
    weight = config.shift_guidance
    if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not 0 <= weight < float("inf"):
        raise ConfigError(f"shift_guidance must be a number >= 0 (0: ToMe's own matching; e.g. 0.02), got {weight!r}")
    if weight and config.score != "tome":
        raise ConfigError(f"shift_guidance={weight!r} weighs the shift inside ToMe's matching: it needs score='tome'")
    object.__setattr__(config, "shift_guidance", float(weight))


def _check_target_flops(target, keep) -> None:
    if keep is not None:
        raise ConfigError(
            f"keep={keep!r} and target_flops={target!r} both set the amount of pruning; give one: "
            "keep (the fraction of tokens kept) or target_flops (the planner chooses keep)"
        )
    if not isinstance(target, numbers.Real) or isinstance(target, bool) or not 0 < target <= 1:
        raise ConfigError(
            f"target_flops must be a float in (0, 1] (compressed FLOPs / original FLOPs), got {target!r}"
        )


def _is_line_pair(keep, mode: str) -> bool:
    """keep=(rows, cols): two rates, for line-wise pruning (not in mode='tokens')."""
    return mode != "tokens" and len(keep) == 2 and not any(isinstance(k, (tuple, list)) for k in keep)


def _line_rates(keeps, mode: str) -> list:
    """The rates to range-check: (rows, cols) pairs inside keep are flattened unless mode='tokens'."""
    if mode == "tokens":
        return list(keeps)
    return [r for k in keeps for r in (k if isinstance(k, (tuple, list)) and len(k) == 2 else (k,))]


def _nested_tuples(keep):
    return tuple(_nested_tuples(k) for k in keep) if isinstance(keep, (tuple, list)) else keep


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_text(value, *allowed: str) -> bool:
    """`value` is one of the strings `allowed` (never compared otherwise: a tensor's == is elementwise)."""
    return isinstance(value, str) and value in allowed
