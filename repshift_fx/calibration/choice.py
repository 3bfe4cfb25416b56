"""The choice among candidates a few hundred samples cannot tell apart.

    mean, low, high = paired_interval(values, reference)   # per-sample differences, 95% normal interval
    chosen, notes = most_faithful_within_noise(ranked)     # with labels
    chosen, notes = within_noise_of(ranked)                # without: the leader, and what ties with it

Calibration ranks candidates by a mean over its samples; the leader of a few hundred is often ahead
by noise. With labels, of the candidates whose accuracy the labels cannot tell from the most
accurate one's, the most faithful is chosen (fidelity is measured on every sample, accuracy is
noisier). Without labels the most faithful is chosen, and the note names the candidates the
samples cannot tell from it. (Choosing the one with the fewest options among those, the "one
standard error" rule, was measured on the real ViT and left out: at 0.70 it chose ToMe over ToMe
on the stream, 1.8 points of test agreement lower; docs/calibrate.md.)
"""
from __future__ import annotations

import math

import torch

Z95 = 1.96


def paired_interval(values, reference) -> tuple[float, float, float]:
    """(mean, low, high) of the per-sample difference values - reference (bools or floats), a 95%
    normal interval."""
    diff = torch.tensor(values, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    half = Z95 * diff.std().item() / math.sqrt(len(diff)) if len(diff) > 1 else float("inf")
    mean = diff.mean().item()
    return mean, mean - half, mean + half


def _tied(ranked: list, per_sample) -> list:
    """The candidates measured on the leader's samples whose paired interval to it reaches 0."""
    best = ranked[0]
    return [c for c in ranked if c.samples == best.samples and per_sample(c) is not None
            and paired_interval(per_sample(c), per_sample(best))[2] >= 0]


def most_faithful_within_noise(ranked: list) -> tuple[object, list[str]]:
    """Among candidates ranked by accuracy (each with `.correct`, `.value`), the most faithful whose
    accuracy the labels cannot tell from the most accurate one's; and a note saying so."""
    best = ranked[0]
    chosen = max(_tied(ranked, lambda c: c.correct), key=lambda c: c.fidelity())
    if chosen is best:
        return best, []
    mean, low, high = paired_interval(chosen.correct, best.correct)
    return chosen, [f"{chosen.label} is chosen over the most accurate, {best.label}: accuracy {100 * mean:+.1f} points "
                    f"(95% interval {100 * low:+.1f} to {100 * high:+.1f}) on {best.samples} labelled samples cannot "
                    f"tell them apart, and it follows the unpruned model more closely ({chosen.value:.4f} against "
                    f"{best.value:.4f})"]


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
