"""Side-by-side speed measurement: baseline and compressed, eager and compiled.

    rows = run_benchmark(model, images, rounds=5, threads=2, keep=0.7)
    print(format_table(rows))

One run, all variants built first (compiles included), then timed interleaved round by round
so that a noisy neighbour hits every variant alike; the figures are medians and ratios to the
eager baseline. The "fixed tokens" variant keeps the same number of tokens by slicing, with no
scoring, top-k or gather: the gap between it and the compressed model is what the inserted
nodes cost.
"""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.fx
from tabulate import tabulate
from tqdm.auto import tqdm

from .flops import per_sample_gmacs


@dataclass
class BenchRow:
    variant: str
    ms_per_batch: float
    images_per_s: float
    gflops: float
    flop_ratio: float  # GFLOPs / baseline GFLOPs
    speedup: float  # images_per_s / eager baseline images_per_s
    speedup_per_flop_gain: float  # speedup / (baseline GFLOPs / GFLOPs)


def fixed_token_variant(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a compressed graph whose drops keep the first tokens by slicing: same token
    counts and FLOPs, no scoring, top-k or gather."""
    fixed = copy.deepcopy(gm)
    graph = fixed.graph
    for node in list(graph.nodes):
        if node.meta.get("repshift", {}).get("role") != "keep":
            continue
        tokens, index = node.args
        count = index.args[1] + index.args[2]  # select_tokens(scores, prefix, keep)
        with graph.inserting_before(node):
            narrow = graph.call_function(torch.narrow, (tokens, 1, 0, count))
        node.replace_all_uses_with(narrow)
    graph.eliminate_dead_code()
    fixed.recompile()
    return fixed


def _time_once(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def build_variants(model, example_input, *, compile_options=None, overhead=True, **config) -> dict:
    """name -> callable, for the baseline and the compressed model, eager and compiled."""
    from . import compress  # the public API; imported here to avoid a cycle

    compile_options = compile_options or {}
    gm = compress(model, example_input, compile=False, **config)
    variants = {
        "baseline eager": model,
        "baseline compiled": torch.compile(model, **compile_options),
        "compressed eager": gm,
        "compressed compiled": torch.compile(gm, **compile_options),
    }
    if overhead:
        variants["fixed tokens compiled"] = torch.compile(fixed_token_variant(gm), **compile_options)
    return variants


def run_benchmark(model, example_input, *, rounds: int = 5, threads: int | None = 2, warmup: int = 1,
                  progress: bool = True, overhead: bool = True, compile_options=None, **config) -> list[BenchRow]:
    """Time every variant `rounds` times, interleaved; one row per variant (medians)."""
    if threads:
        torch.set_num_threads(threads)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    batch = args[0].shape[0]
    variants = build_variants(model, args, compile_options=compile_options, overhead=overhead, **config)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in tqdm(variants.items(), desc="compile + warm up", disable=not progress):
            for _ in range(warmup):
                fn(*args)
        for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress):
            for name, fn in variants.items():
                times[name].append(_time_once(fn, args))
    base_gflops = per_sample_gmacs(model, args)
    gflops = {name: base_gflops if name.startswith("baseline") else per_sample_gmacs(variants["compressed eager"], args)
              for name in variants}
    base_rate = batch / statistics.median(times["baseline eager"])
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        rate = batch / median
        ratio = gflops[name] / base_gflops
        rows.append(BenchRow(name, median * 1e3, rate, gflops[name], ratio, rate / base_rate, rate / base_rate * ratio))
    return rows


def scoring_overhead(rows: list[BenchRow]) -> float | None:
    """Share of the compressed compiled model's time spent in scoring, top-k and gather."""
    by_name = {row.variant: row for row in rows}
    if "fixed tokens compiled" not in by_name:
        return None
    full, fixed = by_name["compressed compiled"].ms_per_batch, by_name["fixed tokens compiled"].ms_per_batch
    return (full - fixed) / full


def format_table(rows: list[BenchRow], fmt: str = "simple") -> str:
    table = [
        (r.variant, f"{r.images_per_s:.1f}", f"{r.ms_per_batch:.1f}", f"{r.gflops:.3f}", f"{r.flop_ratio:.3f}",
         f"{r.speedup:.2f}x", f"{r.speedup_per_flop_gain:.2f}")
        for r in rows
    ]
    headers = ("variant", "img/s", "ms/batch", "GFLOPs", "FLOP ratio", "speedup", "speedup / FLOP gain")
    text = tabulate(table, headers=headers, tablefmt=fmt)
    share = scoring_overhead(rows)
    if share is not None:
        text += f"\n\nscoring + top-k + gather: {100 * share:.1f}% of the compressed compiled time"
    return text


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(row) for row in rows]
