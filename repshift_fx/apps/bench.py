"""Side-by-side speed measurement: baseline and compressed, eager and compiled.

    rows = run_benchmark(model, images, rounds=5, threads=2, keep=0.7)
    print(format_table(rows))

One run, all variants built first (compiles included), then timed interleaved round by round
so that a noisy neighbour hits every variant alike; the figures are medians and ratios to the
eager baseline. The "fixed tokens" variant keeps the same number of tokens by slicing, with no
scoring, top-k or gather: the gap between it and the compressed model is what the inserted
nodes cost. Merges (ToMe, reduce="merge") have none: their sizes feed the later attention.

    rows = run_comparison(model, images, scores=("shift", "attention", "random"), keep=0.7)

compares the scores at one schedule (so at equal FLOPs): the baseline and, per score, the pruned
model eager and compiled. `score_ratio(rows, "shift", "attention")` is how much faster the first
runs compiled.

    rows = run_sweep(model, images, keeps=(0.85, 0.75, 0.7), at=(4,), kinds=("compiled",))

times the compressed model at several keep rates against the baseline in one run.

    rows = run_onnx_benchmark(model, images, rounds=5, threads=2, keep=0.7)

exports the compressed and the unpruned model to ONNX and times both in onnxruntime
(CPUExecutionProvider, `threads` intra-op threads), interleaved: rows "baseline onnx" and
"compressed onnx".
"""
from __future__ import annotations

import copy
import functools
import inspect
import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.fx
from tabulate import tabulate
from tqdm.auto import tqdm

from repshift_fx.context import Role, role_of
from repshift_fx.fx.nodes import is_impure
from repshift_fx.flops import per_sample_gmacs
from repshift_fx.method.lines import gather_lines
from repshift_fx.method.tokens import fuse_dropped
from repshift_fx.api import compress
from repshift_fx.compile.timing import time_variants
from repshift_fx.capture.inputs import as_args
from repshift_fx.export.onnx import export, export_unpruned
from repshift_fx.export.runtime import PROVIDER, feed, session


@dataclass
class BenchRow:
    variant: str
    ms_per_batch: float
    images_per_s: float
    gflops: float
    flop_ratio: float  # GFLOPs / baseline GFLOPs
    speedup: float  # images_per_s / images_per_s of the baseline of the same kind (eager or compiled)
    speedup_per_flop_gain: float  # speedup / (baseline GFLOPs / GFLOPs)
    ms_min: float  # the fastest round: the one a noisy neighbour disturbed least
    speedup_to_eager: float  # images_per_s / eager baseline images_per_s


def fixed_token_variant(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a compressed graph whose drops keep the first tokens (in lines mode the first
    rows and columns) by slicing: same counts and FLOPs, no scoring, top-k or gather."""
    fixed = copy.deepcopy(gm)
    graph = fixed.graph
    for node in list(graph.nodes):
        if role_of(node) != "keep":
            continue
        tokens, index = node.args[0], node.args[-1]
        with graph.inserting_before(node):
            if node.target is gather_lines:  # lines mode: select_grid(scores, rows, cols) -> the first ones
                rows = graph.call_function(torch.narrow, (tokens, 2, 0, index.args[1]))
                narrow = graph.call_function(torch.narrow, (rows, 3, 0, index.args[2]))
            else:
                index = node.args[-1]  # gather_tokens(tokens, index) | fuse_dropped(tokens, scores, index)
                count = index.args[1] + index.args[2] + (node.target is fuse_dropped)  # select_tokens(s, prefix, keep)
                narrow = graph.call_function(torch.narrow, (tokens, 1, 0, count))
        node.replace_all_uses_with(narrow)
    graph.eliminate_dead_code(is_impure_node=is_impure)  # in-place calls stay
    fixed.recompile()
    return fixed


def build_variants(model, example_input, *, compile_options=None, overhead=True, **config) -> dict:
    """name -> callable, for the baseline and the compressed model, eager and compiled."""
    compile_options = compile_options or {}
    gm = compress(model, example_input, compile=False, **config)
    variants = {
        "baseline eager": model,
        "baseline compiled": torch.compile(model, **compile_options),
        "compressed eager": gm,
        "compressed compiled": torch.compile(gm, **compile_options),
    }
    if overhead and not any(role_of(n) == Role.MERGE for n in gm.graph.nodes):  # a merge's sizes feed attention
        variants["fixed tokens compiled"] = torch.compile(fixed_token_variant(gm), **compile_options)
    return variants


def run_benchmark(model, example_input, *, rounds: int = 5, threads: int | None = 2, warmup: int = 1,
                  progress: bool = True, overhead: bool = True, compile_options=None, **config) -> list[BenchRow]:
    """Time every variant `rounds` times, interleaved; one row per variant (medians)."""
    if threads:
        torch.set_num_threads(threads)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    variants = build_variants(model, args, compile_options=compile_options, overhead=overhead, **config)
    times = time_variants(variants, args, rounds=rounds, warmup=warmup, progress=progress)
    pruned_gflops = per_sample_gmacs(variants["compressed eager"], args)
    gflops = {name: None if name.startswith("baseline") else pruned_gflops for name in variants}
    return bench_rows(model, args, times, gflops)


def run_onnx_benchmark(model, example_input, *, rounds: int = 5, threads: int | None = 2, warmup: int = 1,
                       progress: bool = True, overhead: bool = False, **config) -> list[BenchRow]:
    """The compressed and the unpruned model exported to ONNX (repshift_fx.export) and timed in
    onnxruntime, interleaved: rows "baseline onnx" and "compressed onnx" (medians; the speedup is
    the compressed model's over the unpruned one). `overhead` is ignored (no fixed-token variant)."""
    if threads:
        torch.set_num_threads(threads)
    args = as_args(example_input, model)
    with tempfile.TemporaryDirectory(prefix="repshift_onnx_") as folder:
        baseline = export_unpruned(model, example_input, Path(folder) / "unpruned.onnx")
        pruned = export(model, example_input, Path(folder) / "compressed.onnx", **config)
        sessions = {"baseline onnx": session(baseline.path, threads=threads),
                    "compressed onnx": session(pruned.path, threads=threads)}
    variants = {name: functools.partial(s.run, None, feed(s, args)) for name, s in sessions.items()}
    times = time_variants(variants, (), rounds=rounds, warmup=warmup, progress=progress)
    gflops = {"baseline onnx": None, "compressed onnx": per_sample_gmacs(pruned.module, args)}
    return bench_rows(model, args, times, gflops)


def bench_rows(model, args: tuple, times: dict[str, list[float]], gflops: dict[str, float | None]) -> list[BenchRow]:
    """One row per variant from its times (medians); gflops None means the model's own.

    A variant's speedup is to the baseline of its own kind ("... compiled" to "baseline
    compiled", the rest to "baseline eager"; the first baseline timed where that one is missing):
    compiled against compiled is what the pruning gains, free of what compiling alone gains."""
    batch = args[0].shape[0]
    base_gflops = per_sample_gmacs(model, args)
    rates = {name: batch / statistics.median(samples) for name, samples in times.items()}
    baselines = [n for n in times if n.startswith("baseline")]
    rows = []
    for name, samples in times.items():
        kind = "compiled" if name.endswith("compiled") else "eager"
        base = f"baseline {kind}" if f"baseline {kind}" in times else baselines[0]
        flops = base_gflops if gflops.get(name) is None else gflops[name]
        ratio = flops / base_gflops
        speedup = rates[name] / rates[base]
        rows.append(BenchRow(name, 1e3 * statistics.median(samples), rates[name], flops, ratio, speedup, speedup * ratio,
                             min(samples) * 1e3, rates[name] / rates[baselines[0]]))
    return rows


def run_comparison(model, example_input, *, scores=("shift", "attention", "random"), explicit_model=None,
                   **options) -> list[BenchRow]:
    """The baseline and every score at one schedule (`config`: keep, at, site, fuse, ...), eager
    and compiled, timed interleaved in one run: rows "baseline eager", "baseline compiled",
    "<score> eager", "<score> compiled" (medians; speedups to the baseline of the same kind).

    `explicit_model`: the same model with explicit attention in every block (timm: fused_attn
    off); adds "attention (all explicit)": score="attention" with sdpa=False, the way EViT-style
    code runs when every block computes its attention map. Other options: `run_variants`'s."""
    config, timing = _split_options(options)
    variants = {score: (model, variant_config(score, config)) for score in scores}
    if explicit_model is not None:
        variants["attention (all explicit)"] = (explicit_model, {**config, "score": "attention", "sdpa": False})
    return run_variants(model, example_input, variants, **timing)


def variant_config(name: str, config: dict) -> dict:
    """compress() options of a named variant: a score ("shift", "attention", ...), "SCORE+merge"
    (reduce="merge"), or "tome:R" (ToMe, R tokens per block, in place of keep and at)."""
    if name.startswith("tome:"):
        rest = {k: v for k, v in config.items() if k not in ("keep", "at", "fuse")}
        return {**rest, "score": "tome", "r": int(name.split(":", 1)[1])}
    if name.endswith("+merge"):
        return {**config, "score": name[: -len("+merge")], "reduce": "merge"}
    return {**config, "score": name}


def run_sweep(model, example_input, keeps, **options) -> list[BenchRow]:
    """The baseline and the compressed model at every keep rate in `keeps` (the rest of the
    schedule, e.g. `at`, from `options`), timed interleaved in one run: rows "keep <k> compiled", ..., so that
    the speedup can be read against the FLOP ratio over a range of schedules."""
    config, timing = _split_options(options)
    variants = {f"keep {keep:g}": (model, {**config, "keep": keep}) for keep in keeps}
    return run_variants(model, example_input, variants, **timing)


def _split_options(options: dict) -> tuple[dict, dict]:
    """(compress config, run_variants' timing options) from one set of keyword arguments."""
    return ({k: v for k, v in options.items() if k not in _TIMING_OPTIONS},
            {k: v for k, v in options.items() if k in _TIMING_OPTIONS})


def run_variants(model, example_input, variants: dict, *, rounds: int = 5, threads: int | None = 2, warmup: int = 1,
                 progress: bool = True, compile_options=None, kinds=("eager", "compiled")) -> list[BenchRow]:
    """The baseline and every named variant `name -> (model, compress config)`, eager and compiled
    (`kinds`: which of the two to time), timed interleaved in one run: rows "baseline <kind>" and
    "<name> <kind>" (medians; speedups to the baseline of the same kind)."""
    if threads:
        torch.set_num_threads(threads)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    compile_options = compile_options or {}
    compiled = {"baseline eager": model, "baseline compiled": torch.compile(model, **compile_options)}
    gflops: dict[str, float | None] = {}
    for name, (source, config) in variants.items():
        gm = compress(source, args, compile=False, **config)
        compiled[f"{name} eager"], compiled[f"{name} compiled"] = gm, torch.compile(gm, **compile_options)
        gflops[f"{name} eager"] = gflops[f"{name} compiled"] = per_sample_gmacs(gm, args)
    compiled = {name: fn for name, fn in compiled.items() if name.rsplit(" ", 1)[-1] in kinds}
    times = time_variants(compiled, args, rounds=rounds, warmup=warmup, progress=progress)
    return bench_rows(model, args, times, gflops)


# run_variants' keyword-only parameters: the timing options `_split_options` passes on to it
_TIMING_OPTIONS = frozenset(name for name, p in inspect.signature(run_variants).parameters.items()
                            if p.kind is inspect.Parameter.KEYWORD_ONLY)


def score_ratio(rows: list[BenchRow], faster: str, slower: str, kind: str = "compiled",
                stat: str = "median") -> float | None:
    """img/s of `faster` over img/s of `slower` (e.g. "shift" over "attention"), both `kind`;
    stat "median" (the table's figures) or "min" (the fastest rounds)."""
    by_name = {row.variant: row for row in rows}
    a, b = by_name.get(f"{faster} {kind}"), by_name.get(f"{slower} {kind}")
    if not (a and b):
        return None
    return b.ms_per_batch / a.ms_per_batch if stat == "median" else b.ms_min / a.ms_min


def attention_cost(shapes, *, rounds: int = 15, threads: int | None = 2, progress: bool = True) -> list[dict]:
    """What explicit attention costs against SDPA, compiled, at each (B, H, N, D) in `shapes`:
    one dict per shape with "sdpa_ms", "explicit_ms" (attention.explicit_attention, which also
    returns the CLS importance) and "extra_ms", medians of `rounds` interleaved rounds."""
    from repshift_fx.method.tokens import explicit_attention

    if threads:
        torch.set_num_threads(threads)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def explicit(q, k, v):
        return explicit_attention(q, k, v, prefix=1)

    found = []
    for shape in tqdm(list(dict.fromkeys(shapes)), desc="attention cost", disable=not progress):
        q, k, v = (torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(3))
        variants = {"sdpa": torch.compile(sdpa), "explicit": torch.compile(explicit)}
        times = time_variants(variants, (q, k, v), rounds=rounds, warmup=2, progress=False)
        sdpa_ms, explicit_ms = (1e3 * statistics.median(times[n]) for n in ("sdpa", "explicit"))
        found.append({"shape": tuple(shape), "sdpa_ms": sdpa_ms, "explicit_ms": explicit_ms,
                      "extra_ms": explicit_ms - sdpa_ms})
    return found


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
         f"{r.speedup:.2f}x", f"{r.speedup_per_flop_gain:.2f}", f"{r.speedup_to_eager:.2f}x")
        for r in rows
    ]
    headers = ("variant", "img/s", "ms/batch", "GFLOPs", "FLOP ratio", "speedup (same kind)", "speedup / FLOP gain",
               "to eager baseline")
    text = tabulate(table, headers=headers, tablefmt=fmt)
    if any(r.variant.endswith(" onnx") for r in rows):
        text += f"\n\nonnxruntime {PROVIDER}, intra-op threads = --threads; speedup = unpruned / compressed time"
    share = scoring_overhead(rows)
    if share is not None:
        text += f"\n\nscoring + top-k + gather: {100 * share:.1f}% of the compressed compiled time"
    return text


def rows_as_dicts(rows: list[BenchRow]) -> list[dict]:
    return [asdict(row) for row in rows]
