"""Calibration: choose the schedule for the user's model and budget from unlabelled batches.

    cal = repshift_fx.calibrate(model, batches, target_flops=0.7)
    compressed = repshift_fx.compress(model, x, **cal.config)

The objective is how closely the reduced model's outputs follow the original's on `batches`
(objective.py), or, given `labels`, how often it is right (labels.py: the model's head, or a probe
fitted on the unpruned outputs), the most faithful winning among candidates the labels cannot tell
apart (choice.py); the search walks from the paper's rule one dimension at a time (search.py, over
space.py's dimensions); each candidate runs eagerly, with FLOPs counted on its rewritten graphs
(measure.py); with `target_speedup` the finalists alone are compiled and timed (search.py).
"""
from __future__ import annotations

import logging
import math
import numbers

from torch import nn

from repshift_fx.calibration.choice import most_faithful_within_noise, within_noise_of
from repshift_fx.calibration.measure import Candidate, Measure, padding_share
from repshift_fx.calibration.result import Calibration
from repshift_fx.calibration.search import descend, time_finalists
from repshift_fx.calibration.space import Space
from repshift_fx.capture import reuse_traces
from repshift_fx.capture.inputs import check_model
from repshift_fx.config import Config, config_from, inference_only
from repshift_fx.errors import ConfigError
from repshift_fx.pipeline import rewrite_unpruned

log = logging.getLogger("repshift_fx")
SCREEN = 64  # samples the search screens on without labels (screen="auto")
PADDED = 0.25  # above this share of padding the calibration batches are noted as unlike length-sorted ones
__all__ = ["calibrate", "Calibration", "Candidate"]


def calibrate(model: nn.Module, batches, *, target_flops: float | None = None, target_speedup: float | None = None,
              labels=None, space: dict | None = None, objective=None, max_candidates: int = 40,
              screen: int | str | None = "auto", refine: int = 4, finalists: int = 3, progress: bool = True,
              **fixed) -> Calibration:
    """Choose compress() options for `model` under a FLOP or speed target, on unlabelled `batches`.

    Args:
        model: the model, in eval mode; it is never changed.
        batches: example inputs: a list of tensors (or tuples, or dicts of tensors, e.g. tokenized
            text), a few hundred samples in all; the same inputs the model takes. Text batched as it
            will run: padding counts in the FLOPs, so on batches mostly padding (texts of mixed length)
            a reduction that drops it wins for free; `.notes` says so above 25% padding.
        target_flops: the FLOP budget, compressed / original, in (0, 1]; every candidate meets it
            over every batch. The planner sets its keep rate, or ToMe's r, on the batch of the median
            length (`.config`); on texts of several lengths each length resolves the target for itself
            (`.budget_config`), the deepest schedule a short text allows where it is out of reach there,
            and the finalists' target is lowered until the FLOPs over every batch meet it.
        labels: the task's class indices for `batches` (one int tensor per batch, or one over every
            sample): the search then maximises accuracy, by the model's classifier head when it has
            one, else by a linear probe fitted on the unpruned model's outputs of these samples
            (cross-fitted, in torch). Candidates are ranked by expected accuracy (the mean
            probability of the true class: resolved on fewer labels than the 0/1 count); of those
            within half a standard error of the most accurate one (paired), the most faithful is
            chosen, and `.notes` says so, with the 95% interval of the accuracy difference.
            Without labels the objective is fidelity; `.notes` names the candidates the samples
            cannot tell from the most faithful one.
        target_speedup: a speed target (> 1, compiled to compiled on the median batch): the
            finalists are compiled and timed; the best that reaches it is chosen, else the fastest,
            with a note. Without target_flops the search starts at 1/target_speedup of the FLOPs.
        space: option -> values to try, e.g. {"reduce": ["drop", "merge"], "at": [(2, 5, 8)]}
            ("at": "auto" walks to neighbouring schedules); default: space.TOKEN_SPACE or
            LINE_SPACE by the model's mode.
        objective: None (top-1 agreement for a classifier's logits, cosine similarity for
            features), "agreement", "cosine", or a callable (outputs, reference) -> float, higher
            better, applied per batch to the main output tensors.
        max_candidates: at most this many candidates are measured.
        screen: the search measures each candidate on the fewest batches, evenly spaced over
            them all, that hold this many samples (None: all); then the `refine` best (with
            labels, also the `refine` most faithful), and the paper's rule, are measured on all
            of them, and the choice is made among those. "auto": 64 without labels (fidelity is
            measured on every token of every sample); with labels all of them (64 labels resolve
            nothing finer than about 12 points of accuracy, so a search led by them follows noise).
        finalists: with target_speedup, how many of the best are compiled and timed.
        **fixed: compress() options (fields of `repshift_fx.Config`) held fixed in every candidate
            (e.g. protect=1, mode="tokens").

    Returns:
        A `Calibration`: `.config` (compress() options), `.table`, `.plot(path)`, `.save(path)`.
    """
    target_flops, target_speedup = _check_targets(target_flops, target_speedup)
    _check_counts(max_candidates=max_candidates, refine=refine, finalists=finalists)
    screen = _screen(screen, labels)
    _check_fixed(fixed)
    checked, _ = config_from(dict(fixed, target_flops=target_flops or 1.0), calibrate)  # unknown or bad options
    inference_only(checked, "calibrate()", "measures the reduced model's inference outputs")
    check_model(model)
    with reuse_traces():
        measure = Measure(model, batches, objective, screen, labels)
        budget = target_flops or min(1.0, 1.0 / target_speedup)
        unpruned = rewrite_unpruned(model, measure.batches[measure.home], Config(**fixed, target_flops=budget))[1]
        mode = unpruned.mode.name
        depth = len(unpruned.analysis.blocks if mode == "tokens" else unpruned.analysis.sites)
        search_space = Space.for_mode(mode, space).without(fixed)
        base = dict(fixed, target_flops=budget)
        paper, table = descend(measure, search_space, base, depth, max_candidates, progress)
        measured, refined = [c for c in table if c.error is None], {}
        _refine(measure, sorted(measured, key=Candidate.rank, reverse=True), refine, target_flops, refined)
        if labels is not None:  # the most faithful too: the choice among what the labels cannot tell apart
            _refine(measure, sorted(measured, key=Candidate.fidelity, reverse=True), refine, target_flops, refined)
        _refine(measure, [c for c in (paper,) if c.error is None], 1, target_flops, refined)
        notes = _padding_notes(measure.batches) + (measure.task.notes() if measure.task is not None else [])
        if target_speedup is not None:
            table, speed_notes = _speed(model, measure, table, target_speedup, target_flops is None, finalists,
                                        progress)
            notes += speed_notes
    ranked = sorted((c for c in table if c.error is None), key=Candidate.rank, reverse=True)
    if not ranked:
        raise ConfigError(f"every candidate was refused for {type(model).__name__}: {paper.error}")
    if target_speedup is not None:
        chosen = next((c for c in ranked if c.speedup is not None and c.speedup >= target_speedup), None) or \
            max((c for c in ranked if c.speedup is not None), key=lambda c: c.speedup)
    elif labels is not None:
        chosen, noted = most_faithful_within_noise(ranked)
        notes += noted
    else:
        chosen, noted = within_noise_of(ranked)
        notes += noted
    chosen.role.append("chosen")
    calibration = Calibration(dict(chosen.config), table, measure.objective_name, measure.samples, target_flops,
                              target_speedup, notes, labelled=labels is not None)
    log.info("%s", calibration.summary())
    return calibration


def _refine(measure: Measure, candidates: list[Candidate], count: int, target_flops: float | None,
            refined: dict) -> None:
    """Measure on every sample, and fit within `target_flops` over every batch, the first `count` of
    `candidates` that fit: where one does not, the next in line takes its place (else the paper's
    rule, always measured in full, could win by being measured on more samples).
    `refined`: id -> candidate, those already done."""
    fitted = 0
    for candidate in candidates:
        if fitted == count:
            return
        if id(candidate) not in refined:
            refined[id(candidate)] = candidate
            if measure.screening != measure.everything:
                measure(candidate, full=True)
            if target_flops is not None:
                measure.fit(candidate, target_flops)
        fitted += candidate.error is None


def _screen(screen, labels) -> int | None:
    if screen == "auto":
        return None if labels is not None else SCREEN
    if screen is not None and (not isinstance(screen, numbers.Integral) or isinstance(screen, bool) or screen < 1):
        raise ConfigError(f"screen must be a whole number of samples >= 1, None (all of them) or 'auto', got {screen!r}")
    return screen


def _padding_notes(batches: list) -> list[str]:
    """A note where the batches are mostly padding: every position counts in the FLOPs, so a
    reduction that drops the padding meets the target for free on them, and calibration favours
    it; on batches of texts of like length (as one deploys) it has to drop words instead."""
    share = padding_share(batches)
    if share <= PADDED:
        return []
    note = (f"the batches are {100 * share:.0f}% padding (zeros of their attention_mask): a reduction that drops "
            f"padding meets the FLOP target for free on them, so calibration favours it; batch texts of like length "
            f"together (sorted by length), as you will run them")
    log.warning("calibrate: %s", note)
    return [note]


def _check_targets(target_flops, target_speedup):
    if target_flops is None and target_speedup is None:
        raise ConfigError("calibrate() needs a target: target_flops= (a FLOP ratio in (0, 1], e.g. 0.7) or "
                          "target_speedup= (compiled to compiled, > 1, e.g. 1.4)")
    for name, value in (("target_flops", target_flops), ("target_speedup", target_speedup)):
        if value is not None and (not isinstance(value, numbers.Real) or isinstance(value, bool) or
                                  not 0 < value < math.inf):
            raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    if target_flops is not None and target_flops > 1:
        raise ConfigError(f"target_flops={target_flops} is above 1, but it is a FLOP ratio (compressed / original, "
                          f"e.g. 0.7); for {target_flops}x faster pass target_speedup={target_flops}")
    if target_speedup is not None and target_speedup <= 1:
        raise ConfigError(f"target_speedup={target_speedup} is at most 1, but it is a speedup (e.g. 1.4 = 40% "
                          f"faster); for {target_speedup} of the FLOPs pass target_flops={target_speedup}")
    return target_flops, target_speedup


def _check_fixed(fixed: dict) -> None:
    """The amount is calibrate()'s to choose, to meet its target."""
    amounts = [name for name in ("keep", "r") if name in fixed]
    if amounts:
        raise ConfigError(f"calibrate() sets the amount of reduction itself (keep, or ToMe's r) to meet target_flops= "
                          f"or target_speedup=; leave {', '.join(f'{n}=' for n in amounts)} out (the other compress() "
                          "options may be held fixed)")


def _check_counts(**counts) -> None:
    for name, value in counts.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _speed(model, measure: Measure, table: list[Candidate], target: float, free_flops: bool, count: int,
           progress: bool) -> tuple[list[Candidate], list[str]]:
    """Time the best `count`; while none reaches `target` and the FLOP target is the search's own,
    lower it by the shortfall (twice at most) and time the same settings again."""
    finalists = sorted((c for c in table if c.error is None), key=Candidate.rank, reverse=True)[:count]
    for attempt in range(3):
        for c in finalists:
            c.role.append("finalist")
        time_finalists(model, measure.batches[measure.home], finalists, progress=progress)
        fastest = max(finalists, key=lambda c: c.speedup)
        if fastest.speedup >= target or not free_flops or attempt == 2:
            break
        budget = fastest.options["target_flops"] * fastest.speedup / target
        log.info("calibrate: the fastest finalist runs %.2fx; trying FLOP ratio %.3f", fastest.speedup, budget)
        finalists = [measure(Candidate(dict(c.options, target_flops=round(budget, 4))), full=True) for c in finalists]
        finalists = [c for c in finalists if c.error is None]
        table = table + finalists
        if not finalists:
            break
    timed = [c for c in table if c.speedup is not None]
    best = max(timed, key=lambda c: c.speedup)
    notes = [] if best.speedup >= target else [
        f"no candidate reached {target}x: the fastest, {best.label} at FLOP ratio {best.flops:.3f}, runs "
        f"{best.speedup:.2f}x compiled to compiled on a batch of {measure.sizes[measure.home]}"]
    for note in notes:
        log.warning("calibrate: %s", note)
    return table, notes

