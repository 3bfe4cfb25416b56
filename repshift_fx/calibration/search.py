"""The search: coordinate descent from the paper's rule, one dimension at a time, and the speed
check of the finalists.

    found = descend(measure, space, base, depth, max_candidates)   # every Candidate measured
    time_finalists(model, batch, finalists)                        # .speedup, compiled to compiled

Each dimension (reduce, score, distance, site, ..., at) in turn: every alternative value is
measured with the rest of the current best fixed, and the best of them is kept if it beats the
current one. Rounds repeat while one improves, within `max_candidates`; `at` moves to the
neighbouring schedules of the current one (space.at_moves), so the search walks, never enumerates.
Then the best of each score is a seed of its own descent, the score held: a score that loses at
the paper's schedule may win at its own.
"""
from __future__ import annotations

import functools
import logging
import statistics

import torch
from tqdm.auto import tqdm

from repshift_fx.api import compress
from repshift_fx.calibration.measure import Candidate, Measure
from repshift_fx.calibration.objective import call
from repshift_fx.calibration.space import DEFAULTS, NOT_FOR_TOME, SHIFT_ONLY, TOME_ONLY, Space, merges
from repshift_fx.compile.timing import time_variants
from repshift_fx.config import Config
from repshift_fx.errors import ConfigError

log = logging.getLogger("repshift_fx")


def options_for(current: dict, dimension: str, value) -> dict:
    """`current` with `dimension` set to `value`, without the options the new score ignores."""
    options = dict(current, **{dimension: value})
    if options.get("score", "shift") != "shift":
        for name in SHIFT_ONLY:
            options.pop(name, None)
    if options.get("score") == "tome":
        for name in NOT_FOR_TOME:
            options.pop(name, None)
    else:
        for name in TOME_ONLY:
            options.pop(name, None)
    if not merges(options):
        options.pop("merge_metric", None)
    return {k: v for k, v in options.items() if k == "target_flops" or v != DEFAULTS.get(k, object())}


def _key(options: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in options.items()))


class Descent:
    """The candidates measured so far (by options), the current best, and the progress bar."""

    def __init__(self, measure: Measure, space: Space, depth: int, max_candidates: int, progress: bool,
                 fixed: dict | None = None):
        self.measure, self.space, self.depth, self.max = measure, space, depth, max_candidates
        self.fixed = fixed or {}  # options the user holds: no candidate drops or changes them
        self.seen: dict[tuple, Candidate] = {}
        self.default_at = None  # what the seed's at=None resolved to
        self.bar = tqdm(total=max_candidates, desc="calibrate", unit="candidate", disable=not progress)

    def try_options(self, options: dict) -> Candidate | None:
        if self.seen and options.get("at") == self.default_at:
            options = {k: v for k, v in options.items() if k != "at"}  # the default schedule, named
        key = _key(options)
        if key in self.seen:
            return self.seen[key]
        if len(self.seen) >= self.max:
            return None
        candidate = self.measure(Candidate(options))
        self.seen[key] = candidate
        self.bar.update(1)
        if candidate.error is None:
            self.bar.set_postfix_str(f"{candidate.value:.3f} at FLOPs {candidate.flops:.3f}")
        return candidate

    def holds_fixed(self, options: dict) -> bool:
        return all(options.get(name, DEFAULTS.get(name)) == value for name, value in self.fixed.items())

    def best(self) -> Candidate:
        return max(self.seen.values(), key=Candidate.rank)

    def step(self, current: Candidate, dimension: str) -> Candidate:
        """The best of `current` and every alternative value of `dimension`."""
        options = dict(current.options)
        if dimension == "at" and options.get("at") is None and current.at is not None:
            options["at"] = current.at  # moves start from the schedule the default resolved to
        tried = [current]
        for value in self.space.alternatives(dimension, options, self.depth):
            candidate = options_for(options, dimension, value)
            if not self.holds_fixed(candidate):  # e.g. score="tome", which takes no reduce=, with reduce held
                continue
            found = self.try_options(candidate)
            if found is not None:
                tried.append(found)
        return max(tried, key=Candidate.rank)

    def run(self, seed: Candidate, held=()) -> Candidate:
        """Rounds over every dimension but `held`, from `seed`, while one improves."""
        current = seed
        while len(self.seen) < self.max:
            start = current
            for dimension in self.space.dimensions():
                if dimension not in held:
                    current = self.step(current, dimension)
            if current is start:
                break
        return current

    def family_bests(self) -> list[Candidate]:
        """The best candidate of each score, best first."""
        best: dict[str, Candidate] = {}
        for c in self.seen.values():
            score = c.options.get("score", "shift")
            if c.error is None and (score not in best or c.rank() > best[score].rank()):
                best[score] = c
        return sorted(best.values(), key=Candidate.rank, reverse=True)


def descend(measure: Measure, space: Space, base: dict, depth: int, max_candidates: int = 40,
            progress: bool = True) -> tuple[Candidate, list[Candidate]]:
    """(the paper's rule measured, every candidate measured), starting from the paper's rule with
    the options in `base` (the FLOP target, options the user fixed)."""
    fixed = {k: v for k, v in base.items() if k != "target_flops"}
    descent = Descent(measure, space, depth, max_candidates, progress, fixed)
    seed = descent.try_options(dict(base))
    descent.default_at = seed.at
    seed.role.append("paper")
    if isinstance(seed.refusal, ConfigError):  # the target itself: no other candidate fares better
        raise ConfigError(f"calibrate(): {seed.error}") from None
    if seed.error is not None:
        log.warning("calibrate: the paper's rule is refused for this model: %s", seed.error)
    descent.run(seed)
    for best in descent.family_bests():  # each score's own schedule, not only the winner's
        descent.run(best, held=("score",))
    descent.bar.close()
    return seed, list(descent.seen.values())


def time_finalists(model, batch, finalists: list[Candidate], rounds: int = 5, progress: bool = True) -> None:
    """Compile each finalist and the original for `batch`, time them interleaved (medians) and set
    each finalist's `.speedup` (compiled original / compiled finalist)."""
    variants = {"original": functools.partial(call, torch.compile(model), batch)}
    for i, candidate in enumerate(finalists):
        pruned = torch.compile(compress(model, batch, compile=False, **candidate.config))
        variants[i] = functools.partial(call, pruned, batch)
    times = time_variants(variants, (), rounds=rounds, progress=progress)
    original = statistics.median(times["original"])
    for i, candidate in enumerate(finalists):
        candidate.speedup = original / statistics.median(times[i])
        log.info("calibrate: %s runs %.2fx the original, compiled", candidate.label, candidate.speedup)
