"""Timing on shared, noisy machines: every variant warmed up first, then timed interleaved.

    times = time_variants({"original": compiled, "pruned": pruned}, (x,), rounds=5)
    statistics.median(times["original"]) / statistics.median(times["pruned"])   # the speedup

Used by the benchmarks (repshift_fx/apps/bench.py) and by calibration's speed target.
"""
from __future__ import annotations

import random
import time

import torch
from tqdm.auto import tqdm


def _time_once(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_variants(variants: dict, args: tuple, *, rounds: int = 5, warmup: int = 1,
                  progress: bool = True, grad: bool = False) -> dict[str, list[float]]:
    """Seconds per call of every variant: all warmed up (compiled) first, then `rounds` rounds
    in which each variant runs once, in an order shuffled per round (seeded), so that a noisy
    neighbour, periodic or not, hits all alike. `grad`: with autograd on (training steps), else
    in inference mode."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    order, shuffle = list(variants), random.Random(0).shuffle
    with torch.enable_grad() if grad else torch.inference_mode():
        for name, fn in tqdm(variants.items(), desc="compile + warm up", disable=not progress):
            for _ in range(warmup):
                fn(*args)
        for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress):
            shuffle(order)
            for name in order:
                times[name].append(_time_once(variants[name], args))
    return times
