"""The user's configuration: `Config` is the one list of options every entry point takes (compress,
inspect, backend, export, calibrate, the command's flags), checked here before anything is traced."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from repshift_fx.errors import ConfigError

Auto = Literal["auto"]
Site = Literal["mlp", "attn", "block"]
Distance = Literal["l2", "l1", "cosine"]
Score = Literal["shift", "norm", "random", "attention", "tome"]
Mode = Literal["auto", "tokens", "lines"]
Reduce = Literal["drop", "merge"]
MergeMetric = Literal["keys", "stream", "ward"]
SizeAttention = Literal["mask", "qk"]


def _option(default, doc: str):
    """A field of Config: its default and what it means (help(Config) and `repshift-fx inspect --help` show it)."""
    return dataclasses.field(default=default, metadata={"doc": " ".join(doc.split())})


@dataclass(frozen=True)
class Config:
    """What to prune and how to score: the options of `repshift_fx.compress`, `inspect`, `backend`,
    `export` and `calibrate`, each checked once, here (a `ConfigError` says what was wrong)."""

    keep: float | tuple[float, ...] | None = _option(None, """
        fraction of the non-prefix tokens kept at each drop, in (0, 1], or one per `at`. A drop keeps
        ceil(keep * n) of n tokens, the best-scored, in their original order. Default 0.7 (unless
        target_flops is given; the two exclude each other). Where compress() is given none of the options
        that choose a reduction (keep, at, score, r, reduce, fuse, merge_metric, shift_guidance, site,
        distance, residual), it runs the default reduction: ToMe by Ward's cost at target_flops (0.70 unless
        given) where the planner reaches it, else this paper's rule (repshift_fx/plan/default.py).""")
    at: tuple[int, ...] | None = _option(None, """
        0-based indices of the blocks whose shift is measured; the tokens are dropped from the next block
        on. None: (d//4, d//2, 3d//4) for d blocks, (3, 6, 9) for DeiT.""")
    site: Site = _option("mlp", """
        "mlp" scores D(MLP(LN(x')), x') at the MLP sub-layer (the paper's default); "attn" the same at the
        attention sub-layer; "block" D(block(x), x).""")
    distance: Distance = _option("l2", """"l2", "l1" or "cosine" (1 - cosine similarity), over channels.""")
    residual: bool = _option(False, "score D(x' + branch(x'), x') instead of D(branch(x'), x').")
    score: Score = _option("shift", """
        "shift" (the method; score="shift" alone is the paper's rule, keep 0.7 at the default `at`), or the
        baselines "norm" (token L2 norm), "random", "attention" (EViT: the CLS token's attention to each
        token, averaged over heads, in the scoring block; without prefix tokens, the mean attention each
        token receives; those blocks run explicit attention) and "tome" (ToMe's bipartite merging, sized
        by r).""")
    protect: Auto | int = _option("auto", """
        "auto" finds the prefix tokens (CLS, distillation, registers) in the graph; an int sets their
        number. They are never dropped.""")
    sdpa: bool = _option(True, "rewrite explicit softmax attention to F.scaled_dot_product_attention.")
    target_flops: float | None = _option(None, """
        a FLOP budget in (0, 1], compressed / original: the planner chooses the one keep rate for every drop
        in `at` whose FLOPs are the largest at most this fraction (counted by torch.utils.flop_counter);
        `.report.budget` says the ratio reached.""")
    mode: Mode = _option("auto", """
        "auto" picks from the graph: "tokens" for residual MLPs over (B, N, C) tokens (ViTs), else "lines"
        for residual blocks over (B, C, H, W) maps (CNNs: ResNet, EfficientNet), which drops whole rows and
        columns, scored by D(block(x), shortcut(x)) averaged along each line; there `keep` may also be a
        pair (rows, cols), or one rate or pair per `at`, and `at` counts the residual adds in the order the
        stream meets them (docs/lines.md).""")
    fuse: bool = _option(False, """
        EViT fusion: the dropped tokens of each drop are folded into one extra token (their average weighted
        by the softmax of their scores), placed after the kept tokens; later drops score it like any other
        token. Tokens mode only.""")
    reduce: Reduce = _option("drop", """
        "drop" (the paper), or "merge": each leaving token is added into its most similar kept token (by
        merge_metric), a size-weighted mean; every token carries its size, and later attention weighs keys
        by it (proportional attention, kept fused, by size_attention).""")
    restore: Auto | bool = _option("auto", """
        "auto" puts every token back where the graph needs them all (a per-token output such as BertModel's
        last_hidden_state, a stage that reshapes tokens to a grid): a kept token takes its value, a merged
        one the value of the token it went into, a dropped one its value when dropped. True always restores
        at the end of each run of blocks; False refuses such models.""")
    r: int | tuple[int, ...] | None = _option(None, """
        score="tome" (ToMe, the baseline, on any graph): tokens merged away in each block of `at` (all
        blocks by default), or one number per block, by bipartite soft matching between attention and
        MLP.""")
    merge_metric: MergeMetric = _option("keys", """
        reduce="merge" and score="tome": "most similar" compares the attention keys of the block that merges,
        averaged over heads (cosine; ToMe's metric), "stream", the tokens themselves, the values the merge
        averages (cosine), or "ward": the stream by Ward's cost, the squared error a size-weighted merge adds,
        s_a s_b / (s_a + s_b) ||x_a - x_b||^2: a token that holds many pays more to absorb another (docs/merge.md).""")
    size_attention: SizeAttention = _option("mask", """
        proportional attention (reduce="merge") as an SDPA attn_mask, or "qk": an extra q/k column that
        needs no mask (flash attention on GPU).""")
    shift_guidance: float = _option(0.0, """
        score="tome": a weight >= 0 on the representation shift inside ToMe's matching. ToMe merges the
        tokens of set A most similar to set B; with a weight w each A token's similarity is lowered by w
        times its shift in the block before, the residual form D(x' + MLP(LN(x')), x') at `site` with
        `distance` (over the mean of A), so that of equally redundant tokens those the layers still change
        stay. 0: ToMe's own matching.""")

    train: bool = _option(False, """
        compress a training graph: the model must be in training mode (model.train()), and the
        reduction runs in training too; gradients flow through the gathers, merges, restores and
        proportional attention to the model's own parameters (the choice of tokens is not
        differentiated), so an optimizer on model.parameters() trains through it. Dropout,
        drop-path and BatchNorm statistics work as in the model. compress() and backend(); the
        graph refuses to run once put in eval mode (compress the eval model for inference).""")

    def __post_init__(self):
        for name, allowed in FIXED.items():
            if not _is_one_of(getattr(self, name), allowed):
                raise ConfigError(f"{name} {_must_be(allowed)}, got {getattr(self, name)!r}")
        _check_merging(self)
        _check_guidance(self)
        if self.target_flops is not None:
            _check_target_flops(self.target_flops, self.keep)
        elif self.keep is None and self.score != "tome":
            object.__setattr__(self, "keep", 0.7)
        if self.at is not None:
            at = (self.at,) if isinstance(self.at, numbers.Integral) else self.at
            ordered = isinstance(at, Iterable) and not isinstance(at, (str, bytes, set, frozenset, dict))
            at = tuple(at) if ordered else None  # a set has no order to pair with per-drop amounts
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
        if self.restore is True and self.fuse:
            raise ConfigError("restore=True cannot put back tokens that fuse=True folded into one; use "
                              "reduce='merge' (restore then unmerges), or fuse=False")
        if not _is_one_of(self.protect, ("auto",)) and not (_is_int(self.protect) and self.protect >= 0):
            raise ConfigError(f"protect must be 'auto' or a number of prefix tokens >= 0, got {self.protect!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "Config":
        return config_from(kwargs)[0]


def inference_only(config: Config, entry: str, why: str) -> None:
    """ConfigError for train=True at an entry point that works on inference graphs."""
    if config.train:
        raise ConfigError(f"train=True is for compress() and backend(): {entry} {why}; compress the model in "
                          "training mode with compress(model.train(), x, train=True, ...)")


def unreduced(config: Config) -> Config:
    """`config` reducing nothing, the same drops or merges planned: keep=1.0, or r=0 for ToMe."""
    nothing = {"r": 0} if config.score == "tome" else {"keep": 1.0}
    return dataclasses.replace(config, target_flops=None, **nothing)


TYPES = typing.get_type_hints(Config)  # name -> the field's type, the Literals resolved


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def allowed_values(hint) -> tuple | None:
    """The values a field of type `hint` takes when they are a fixed set (its Literal's words, True and
    False for a bool), else None."""
    if not all(m is bool or typing.get_origin(m) is Literal for m in members(hint)):
        return None
    return tuple(v for m in members(hint) for v in ((True, False) if m is bool else typing.get_args(m)))


def members(hint) -> tuple:
    """The types a union joins (int | None -> (int, NoneType)), or (hint,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


FIXED = {name: v for name, hint in TYPES.items() if (v := allowed_values(hint)) is not None}  # checked in one place
CHOICES = {name: v for name, v in FIXED.items() if True not in v}  # the options that name a choice
SWITCHES = tuple(name for name, v in FIXED.items() if v == (True, False))  # the options that are booleans
SITES, DISTANCES = typing.get_args(Site), typing.get_args(Distance)
Config.__doc__ = (Config.__doc__ or "") + "\n\n    Fields:\n" + "\n".join(
    textwrap.fill(f"{f.name} (default {f.default!r}): {f.metadata['doc']}", 100, initial_indent=" " * 8,
                  subsequent_indent=" " * 12, break_on_hyphens=False) for f in dataclasses.fields(Config))


def config_from(options: Mapping, entry: Callable | None = None, passed_on: Iterable[str] = ()) -> tuple[Config, dict]:
    """The options an entry point was given, checked in one place: (the `Config` of those that are its
    fields, the others, which must be named in `passed_on`, e.g. torch.compile's keywords for compress).

    Any other name is a ConfigError naming the nearest field, name of `passed_on` or keyword of `entry`
    (the function the user called): "unknown option 'kepe'; did you mean 'keep'?"."""
    own = [p.name for p in inspect.signature(entry).parameters.values() if p.kind is p.KEYWORD_ONLY] if entry else []
    fields = option_names()
    check_names(options, fields + list(passed_on) + own)
    config = Config(**{name: value for name, value in options.items() if name in fields})
    return config, {name: value for name, value in options.items() if name not in fields}


def check_names(given, valid, what: str = "option") -> None:
    """ConfigError for the first unknown name, naming the nearest valid one."""
    for name in given:
        if name not in valid:
            near = difflib.get_close_matches(name, list(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the {what}s are {sorted(valid)}"
            raise ConfigError(f"unknown {what} {name!r}{hint}")


def _is_one_of(value, allowed: tuple) -> bool:
    """`value` is one of `allowed` (strings and booleans; never compared otherwise: a tensor's == is
    elementwise, and 1 == True)."""
    return isinstance(value, (str, bool)) and any(isinstance(value, bool) is isinstance(a, bool) and value == a
                                                  for a in allowed)


def _must_be(allowed: tuple) -> str:
    words = [repr(a) for a in allowed if not isinstance(a, bool)]
    if not words:
        return "is a boolean: pass True or False"
    if len(words) == len(allowed):
        return f"must be one of {', '.join(words)}"
    return f"must be {', '.join(words)}, True or False"


def merges(reduce, score) -> bool:
    """Whether these options merge tokens (reduce="merge", or ToMe's matching), so that
    `merge_metric` means something."""
    return reduce == "merge" or score == "tome"


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
    if config.merge_metric != "keys" and not merges(config.reduce, config.score):
        raise ConfigError(f"merge_metric={config.merge_metric!r} says what a merge compares, but a drop merges "
                          "nothing: add reduce='merge' (or score='tome', ToMe's matching)")
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
