"""The search space of calibration, and the moves of its coordinate descent.

    space = Space.for_mode("tokens", user_space)     # dimension -> values to try
    space.alternatives("score", current)             # the values of one dimension to try next

Dimensions: where the drops go (`at`), the score (shift, attention, norm, ToMe), the weight of
the shift inside ToMe's matching (`shift_guidance`), what a merge compares (`merge_metric`: the
attention keys, the stream, or the stream by Ward's cost), the shift's distance and site, and drop
or merge (`reduce`). The amount (keep, or ToMe's r) is never a dimension: the FLOP target sets it,
through the planner (`target_flops`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from repshift_fx.config import Config, check_names
from repshift_fx.config import merges as merges_tokens
from repshift_fx.errors import ConfigError

TOKEN_SPACE = {"reduce": ("drop", "merge"), "score": ("shift", "attention", "tome"), "shift_guidance": (0.01, 0.02, 0.05),
               "merge_metric": ("keys", "stream", "ward"), "distance": ("l2", "cosine"), "site": ("mlp", "attn"), "at": "auto"}
LINE_SPACE = {"score": ("shift", "norm"), "distance": ("l2", "l1", "cosine"), "at": "auto"}
DIMENSIONS = ("reduce", "score", "shift_guidance", "distance", "site", "merge_metric", "residual", "size_attention", "at")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}  # the paper's rule; at None: the default at
SHIFT_ONLY = ("distance", "site", "residual")  # meaningless for other scores
NOT_FOR_TOME = ("reduce", "at")  # ToMe merges by its own matching, in every block
TOME_ONLY = ("shift_guidance",)  # the shift inside ToMe's matching


def merges(options: dict) -> bool:
    """Whether the options merge tokens, so that `merge_metric` means something."""
    return merges_tokens(options.get("reduce"), options.get("score"))


@dataclass
class Space:
    """Dimension -> the values to try; "at": "auto" (moves around the current schedule) or a list."""

    values: dict

    @classmethod
    def for_mode(cls, mode: str, space: dict | None = None) -> "Space":
        if space is None:
            return cls(dict(LINE_SPACE if mode == "lines" else TOKEN_SPACE))
        if not isinstance(space, dict) or not space:
            raise ConfigError(f"space must be a dict of option -> values to try, e.g. {{'reduce': ['drop', "
                              f"'merge']}}, got {space!r}")
        check_names(space, DIMENSIONS, "space option")
        checked = {}
        for name, values in space.items():
            if name == "at":
                checked[name] = values if values == "auto" else _schedules(values)
                continue
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if not values:
                raise ConfigError(f"space[{name!r}] is empty: give the values to try, e.g. "
                                  f"{{{name!r}: {list(TOKEN_SPACE.get(name, LINE_SPACE.get(name, ())))!r}}}, "
                                  f"or leave it out to hold it at its default, {DEFAULTS.get(name)!r}")
            for value in values:
                _check_value(name, value)
            checked[name] = tuple(values)
        return cls(checked)

    def without(self, fixed: dict) -> "Space":
        """The space less the options the user holds fixed."""
        return Space({k: v for k, v in self.values.items() if k not in fixed})

    def dimensions(self) -> list[str]:
        return [d for d in DIMENSIONS if d in self.values]

    def alternatives(self, dimension: str, current: dict, depth: int) -> list:
        """Values of `dimension` other than the current one that make sense with the rest of it."""
        if dimension in SHIFT_ONLY and current.get("score", "shift") != "shift":
            return []
        if dimension in NOT_FOR_TOME and current.get("score") == "tome":
            return []
        if dimension in TOME_ONLY and current.get("score") != "tome":
            return []
        if dimension == "merge_metric" and not merges(current):
            return []
        if dimension == "at" and self.values["at"] == "auto":
            # no schedule resolved (the candidate was refused): nowhere to move from
            found = [] if current.get("at") is None else at_moves(current["at"], depth)
        elif dimension == "at":
            found = self.values["at"]
        else:
            found = self.values[dimension]
        return [v for v in found if v != current.get(dimension, DEFAULTS.get(dimension))]


def _schedules(values) -> list:
    """space["at"]: "auto", or a list of schedules (each None or a sequence of block indices)."""
    bad = ConfigError(f"space['at'] must be 'auto' or a list of schedules, each a tuple of block indices or None, "
                      f"e.g. [(2, 5, 8), (3, 6, 9)]; got {values!r}")
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise bad
    for schedule in values:
        if schedule is not None and (isinstance(schedule, str) or not isinstance(schedule, (list, tuple))):
            raise bad
        if schedule is not None:
            try:
                Config(keep=0.5, at=schedule)  # the schedule's own checks: ints, increasing
            except ConfigError as error:
                raise ConfigError(f"space['at'] holds {schedule!r}: {error}") from None
    return [None if a is None else tuple(a) for a in values]


def _check_value(name: str, value) -> None:
    base = dict(target_flops=0.5, score="shift")
    base.update({name: value})
    if name == "reduce" and value == "merge":
        base["score"] = "shift"
    if name in TOME_ONLY:
        base["score"] = "tome"
    try:
        Config(**base)
    except ConfigError as error:
        raise ConfigError(f"space[{name!r}] holds {value!r}: {error}") from None


def at_moves(at: tuple[int, ...], depth: int) -> list[tuple[int, ...]]:
    """Schedules next to `at` among blocks 0..depth-2 (a drop after the last block saves nothing):
    all drops one block earlier or later, each drop alone one block earlier or later, one drop
    fewer, one drop more (in the middle of the widest gap), and a drop after every block from the
    first on (gradual reduction, as ToMe merges a few tokens in every block)."""
    last = depth - 2
    moves = [tuple(a + s for a in at) for s in (-1, 1)]
    for i in range(len(at)):
        for s in (-1, 1):
            moves.append(at[:i] + (at[i] + s,) + at[i + 1:])
    if len(at) > 1:
        moves += [at[:i] + at[i + 1:] for i in range(len(at))]
    bounds = (-1,) + tuple(at) + (last + 1,)
    gap = max(range(len(bounds) - 1), key=lambda i: bounds[i + 1] - bounds[i])
    moves.append(tuple(sorted(set(at) | {(bounds[gap] + bounds[gap + 1] + 1) // 2})))
    moves.append(tuple(range(at[0], last + 1)))  # gradual: a small drop after every block from the first on
    valid = []
    for move in moves:
        if move and list(move) == sorted(set(move)) and 0 <= move[0] and move[-1] <= last and move != tuple(at) \
                and move not in valid:
            valid.append(move)
    return valid
