"""The choice among candidates a few hundred samples cannot tell apart.

    mean, low, high = paired_interval(values, reference)   # per-sample differences, 95% normal interval
    chosen, notes = most_faithful_within_noise(ranked)     # with labels
    chosen, notes = within_noise_of(ranked)                # without: the leader, and what ties with it

Calibration ranks candidates by a mean over its samples; the leader of a few hundred is often ahead
by noise. With labels, candidates are ranked by their expected accuracy (the mean probability of
the true class, labels.py), and of those within half a standard error of the most accurate one
(the paired difference) the most faithful is chosen. Wider guards were measured and left out:
replayed on 200 draws of 256 labelled images of the real ViT (tools/label_selection.py,
docs/results/label_selection.md), a 95% interval fell back on the most faithful candidate in most draws and the
labels gained +0.1 points where the most accurate reduction was 2.1 points above ToMe; one
standard error gained +0.9, half of one +1.4, the leader alone +1.8. Without labels the most
faithful is chosen, and the note names the candidates the samples cannot tell from it. (Choosing
the one with the fewest options among those, the "one standard error" rule, was measured on the
real ViT and left out: at 0.70 it chose ToMe over ToMe on the stream, 1.8 points of test agreement
lower; docs/calibrate.md.)
"""
from __future__ import annotations

import math

import torch

Z95 = 1.96
GUARD = 0.5  # standard errors of the expected accuracy's paired difference within which fidelity decides


def paired_interval(values, reference, z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of the per-sample difference values - reference (bools or floats), a normal
    interval of z standard errors (95% by default)."""
    diff = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    half = z * diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    mean = diff.mean().item()
    return mean, mean - half, mean + half


def _tied(ranked: list, per_sample, z: float = Z95) -> list:
    """The candidates measured on the leader's samples whose paired interval to it reaches 0."""
    best = ranked[0]
    return [c for c in ranked if c.samples == best.samples and per_sample(c) is not None
            and paired_interval(per_sample(c), per_sample(best), z)[2] >= 0]


def most_faithful_within_noise(ranked: list) -> tuple[object, list[str]]:
    """Among candidates ranked by expected accuracy (each with `.p_true`, `.correct`, `.value`), the
    most faithful within GUARD standard errors of the most accurate one; and a note saying so, with
    the 95% interval of the accuracy difference."""
    best = ranked[0]
    chosen = max(_tied(ranked, lambda c: c.p_true, GUARD), key=lambda c: c.fidelity())
    if chosen is best:
        return best, []
    expected = paired_interval(chosen.p_true, best.p_true)[0]
    mean, low, high = paired_interval(chosen.correct, best.correct)
    return chosen, [f"{chosen.label} is chosen over the most accurate, {best.label}: its expected accuracy is within "
                    f"half a standard error ({100 * expected:+.1f} points; accuracy {100 * mean:+.1f}, 95% interval "
                    f"{100 * low:+.1f} to {100 * high:+.1f}, on {best.samples} labelled samples), and it follows the "
                    f"unpruned model more closely ({chosen.value:.4f} against {best.value:.4f})"]


def within_noise_of(ranked: list) -> tuple[object, list[str]]:
    """Without labels: the most faithful candidate (each with `.per_sample`, the objective of each
    sample), and a note naming the others the samples cannot tell from it, if any (none when the
    objective has no per-sample values: a custom one)."""
    best = ranked[0]
    if best.per_sample is None:
        return best, []
    others = [c for c in _tied(ranked, lambda c: c.per_sample) if c is not best]
    if not others:
        return best, []
    shown = "; ".join(f"{c.label} ({paired_interval(c.per_sample, best.per_sample)[0]:+.4f})" for c in others[:3])
    return best, [f"{best.samples} samples cannot tell {best.label} from {len(others)} other candidate(s) (paired 95% "
                  f"interval of the fidelity difference reaches 0): {shown}; more samples would tell them apart"]
