"""The GPU run, prepared (issue #29): correctness on the device, then compiled-to-compiled speed,
FLOPs, attention kernels and peak memory of every row, in one unattended command.

    python tools/gpu_bench.py                           # CUDA: DeiT-S and DeiT-B, 224 px, batch 256, fp16 + bf16
    python tools/gpu_bench.py --device cpu --quick      # the same code paths on a CPU in about 2 minutes
    python tools/gpu_bench.py --models deit_small_patch16_224 --dtypes fp16 --rounds 30 --out results/h100

1. Correctness (fp32): keep=1.0 equals the model; the drop equals a short eager re-implementation
   (repshift_fx/apps/device_bench.py); the pass's ToMe equals ToMe's published algorithm with merges in block 0 only; every
   row compiled equals its eager form; fp16 and bf16 agree with fp32; a tiny BertModel with a
   padding mask likewise. A failing check is printed and recorded; the speed part still runs.
2. Speed, per model and dtype, all rows compiled (dynamic=False), warmed up, timed in interleaved
   rounds (repshift_fx.compile.timing), medians: unpruned; drop (the paper: keep 0.7 after blocks
   3, 6, 9); merge; ToMe in the pass at the drop's FLOP ratio; the attention score (EViT); ToMe
   as published (repshift_fx/apps/device_bench.py), r chosen to match the drop's FLOPs. On CUDA
   also mode="max-autotune" and "reduce-overhead" for the unpruned and the fastest reduced row.
3. Per row: img/s, speedup, FLOP ratio (torch.utils.flop_counter), share of the FLOP gain
   (speedup - 1) / (1 / ratio - 1), the attention kernels read from torch.profiler, peak memory.
4. Writes gpu_bench.md, gpu_bench.json and gpu_bench.png (speedup against FLOP ratio) under --out.
docs/gpu_bench.md says what every row and column means and the issue's targets.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import timm
import torch
import transformers
from repshift_fx.apps.device_bench import (PublishedToMe, attention_kernels, eager_drop, kernel_label, min_cosine,
                                           peak_mib, plot_speedups, rel_err, synced, tome_r_for_flops)
from repshift_fx.apps.hf import SentenceEmbedding
from repshift_fx.compile.timing import time_variants
from repshift_fx.flops import per_sample_gmacs
from tabulate import tabulate

log = logging.getLogger("gpu_bench")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE = {"dynamic": False}  # one shape per compiled row: no dynamic-shape kernels after a recompile
TARGETS = (("drop @0.65", "unpruned", 1.9), ("drop", "tome (published)", 1.2), ("drop", "attention (EViT)", 1.15))
TOL = {"exact": 1e-5, "compiled": 1e-4, "cosine": 0.99, "half": 0.05}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="deit_tiny (depth 3, 112 px), batch 8, 3 rounds")
    parser.add_argument("--out", default="gpu_bench_out")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 20, --quick 3)")
    parser.add_argument("--batch", type=int, default=None, help="default 256, --quick 8")
    parser.add_argument("--models", default=None, help="comma-separated timm names (default DeiT-S, DeiT-B)")
    parser.add_argument("--dtypes", default=None, help="of fp32, fp16, bf16 (default fp16,bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--target-flops", type=float, default=None, help="adds a row 'drop @T': the drop at this "
                        "FLOP ratio (the issue's first target; default 0.65, none with --quick)")
    parser.add_argument("--budget", type=float, default=480, help="seconds: later speed sections are skipped "
                        "(with a note) once the run has taken this long")
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models.split(",") if args.models else (
        ["deit_tiny_patch16_224"] if quick else ["deit_small_patch16_224", "deit_base_patch16_224"])
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["fp16", "bf16"] if args.device == "cuda" else ["fp32"])
    args.rounds = args.rounds or (3 if quick else 20)
    args.batch = args.batch or (8 if quick else 256)
    args.img, args.depth = (112, 3) if quick else (224, None)
    args.target_flops = args.target_flops or (None if quick else 0.65)
    args.check_batch = 8
    return args


class Run:
    """What the run found so far, and its clock."""

    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.checks, self.rows, self.notes, self.sections = [], [], [], {}
        self.groups: dict = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextlib.contextmanager
    def section(self, name: str):
        began = time.perf_counter()
        log.info("== %s (at %.0f s)", name, self.elapsed())
        try:
            yield
        finally:
            self.sections[name] = round(time.perf_counter() - began, 1)
            log.info("== %s: %.1f s (total %.1f s)", name, self.sections[name], self.elapsed())
            write(self)  # what is done so far survives a run killed by its time limit

    def check(self, name: str, measure, tolerance: float, larger_is_worse: bool = True) -> None:
        """Record one check; an exception fails it, with the message."""
        try:
            value = float(measure())
            passed = value <= tolerance if larger_is_worse else value >= tolerance
            record = {"name": name, "passed": passed, "value": value, "tolerance": tolerance}
        except Exception as error:  # noqa: BLE001  (a failing check must not stop the run)
            record = {"name": name, "passed": False, "value": None, "tolerance": tolerance, "error": repr(error)}
        self.checks.append(record)
        log.info("%s %s: %s (tolerance %s)", "PASS" if record["passed"] else "FAIL", name,
                 record.get("error", f"{record['value']:.3g}"), tolerance)


def vit(args, name: str, dtype: str):
    torch.manual_seed(0)
    extra = {"depth": args.depth} if args.depth else {}
    return timm.create_model(name, img_size=args.img, **extra).eval().to(args.device, DTYPES[dtype])


def build_group(run: Run, name: str, dtype: str, batch: int) -> dict:
    """The rows of one model and dtype, built once (the checks and the speed share them):
    {"model", "x", "base", "rows": {row: (eager, compiled, GMACs)}, "r": published ToMe's r}."""
    key = (name, dtype, batch)
    if key in run.groups:
        return run.groups[key]
    args = run.args
    model = vit(args, name, dtype)
    x = torch.randn(batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(1)).to(args.device,
                                                                                                DTYPES[dtype])
    base = per_sample_gmacs(model, (x,))
    eager = {"unpruned": model, "drop": repshift_fx.compress(model, x, compile=False, reduce="drop", score="shift")}
    drop_ratio = per_sample_gmacs(eager["drop"], (x,)) / base
    configs = {"merge": {"reduce": "merge"}, "tome (pass)": {"score": "tome", "target_flops": drop_ratio},
               "tome + shift (pass)": {"score": "tome", "target_flops": drop_ratio, "shift_guidance": 0.01},
               "tome on stream (pass)": {"score": "tome", "target_flops": drop_ratio, "merge_metric": "stream"},
               "tome by Ward's cost (pass)": {"score": "tome", "target_flops": drop_ratio, "merge_metric": "ward"},
               "attention (EViT)": {"score": "attention"}}
    if args.target_flops:
        configs[f"drop @{args.target_flops:g}"] = {"score": "shift", "target_flops": args.target_flops}
    for row, config in configs.items():
        try:
            eager[row] = repshift_fx.compress(model, x, compile=False, **config)
        except Exception as error:  # noqa: BLE001
            run.notes.append(f"{name} {dtype}: {row} not built: {error!r}")
    r, ratio = tome_r_for_flops(model, x[:1], drop_ratio)
    eager["tome (published)"] = PublishedToMe(model, r)
    run.notes.append(f"{name} {dtype}: published ToMe merges r={r} per block: FLOP ratio {ratio:.3f}, the drop's "
                     f"{drop_ratio:.3f}")
    rows = {row: (fn, torch.compile(fn, **COMPILE), per_sample_gmacs(fn, (x,))) for row, fn in eager.items()}
    run.groups[key] = {"model": model, "x": x, "base": base, "rows": rows, "r": r}
    return run.groups[key]


def deit_checks(run: Run) -> None:
    args = run.args
    group = build_group(run, args.models[0], "fp32", args.check_batch)
    model, x, rows = group["model"], group["x"], group["rows"]
    name = args.models[0].split("_patch")[0]
    with torch.inference_mode():
        want = model(x)
        run.check(f"{name} keep=1.0 == model", lambda: rel_err(
            repshift_fx.compress(model, x, keep=1.0, compile=False)(x), want), TOL["exact"])
        run.check(f"{name} drop == eager re-implementation", lambda: rel_err(rows["drop"][0](x), eager_drop(model, x)),
                  TOL["exact"])
        tome0 = [4] + [0] * (len(model.blocks) - 1)
        run.check(f"{name} tome (pass) == published ToMe, 4 merges in block 0", lambda: rel_err(
            repshift_fx.compress(model, x, score="tome", r=4, at=(0,), compile=False)(x),
            PublishedToMe(model, tome0)(x)), TOL["exact"])
        for row, (eager, compiled, _) in rows.items():
            run.check(f"{name} {row} compiled == eager", lambda: rel_err(compiled(x), eager(x)), TOL["compiled"])
        dtype_checks(run, name, model, x, {"keep=1.0": {"keep": 1.0}, "drop": {"score": "shift"}},
                     {"keep=1.0": repshift_fx.compress(model, x, keep=1.0, compile=False)(x), "drop": rows["drop"][0](x)})


def call(fn, inputs):
    return fn(**inputs) if isinstance(inputs, dict) else fn(inputs)


def dtype_checks(run: Run, label: str, model, inputs, rows: dict, want: dict) -> None:
    """fp16 and bf16 against fp32 (`want`, per row), each of `rows` (name -> compress options) run
    eagerly: the cosine, and the relative error for keep=1.0 (the arithmetic) but not for a drop:
    where rounding changes which tokens it keeps, that error measures the choice, not the arithmetic."""
    for dtype in ("fp16", "bf16"):
        half = copy.deepcopy(model).to(DTYPES[dtype])
        low = inputs if isinstance(inputs, dict) else inputs.to(DTYPES[dtype])  # token ids stay integers
        for row, c in rows.items():
            agree(run, f"{label} {row} {dtype} vs fp32", lambda: call(
                repshift_fx.compress(half, low, compile=False, **c), low), want[row], relative=row == "keep=1.0")


def agree(run: Run, name: str, low, want, relative: bool) -> None:
    """Low precision against fp32: the smallest cosine over the samples, and the relative error."""
    got = {}

    def cosine():
        got["out"] = low()
        return min_cosine(got["out"], want)

    run.check(f"{name}: min cosine", cosine, TOL["cosine"], larger_is_worse=False)
    if relative:
        run.check(f"{name}: rel err", lambda: rel_err(got["out"], want), TOL["half"])


def tiny_bert(device: str):
    """A BertModel with random weights, drawn wider than BERT's own init (std 0.1, not 0.02): at
    0.02 every token's shift is nearly the same, and fp16 flips which tokens a drop keeps."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(config, attn_implementation="sdpa").eval().to(device)


def bert_checks(run: Run) -> None:
    """Mean-pooled embeddings of 4 sequences of 16 tokens, three padded (after 12, 8 and 4)."""
    device = run.args.device
    bert = tiny_bert(device)
    mask = torch.ones(4, 16, dtype=torch.long)
    for row, length in ((1, 12), (2, 8), (3, 4)):
        mask[row, length:] = 0
    text = {"input_ids": torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(2)).to(device),
            "attention_mask": mask.to(device)}
    encoder = SentenceEmbedding(bert, "mean").eval()
    with torch.inference_mode():
        run.check("bert keep=1.0 == model (last_hidden_state, padded)", lambda: rel_err(
            repshift_fx.compress(bert, text, keep=1.0, at=(0, 1), compile=False)(**text)[0],
            bert(**text).last_hidden_state), TOL["exact"])
        gm = repshift_fx.compress(encoder, text, keep=0.5, at=(0, 2), compile=False)
        compiled = torch.compile(gm, **COMPILE)
        run.check("bert drop compiled == eager (padded)", lambda: rel_err(compiled(**text), gm(**text)), TOL["compiled"])
        dtype_checks(run, "bert", encoder, text, {"drop": {"keep": 0.5, "at": (0, 2)}}, {"drop": gm(**text)})


def speed_group(run: Run, name: str, dtype: str) -> dict:
    """Build, warm up (each row alone: one that fails is noted and left out), time, profile."""
    args, device = run.args, run.args.device
    group = build_group(run, name, dtype, args.batch)
    x = group["x"]
    variants = {}
    for row, (_, compiled, _) in group["rows"].items():
        try:
            with torch.inference_mode():
                compiled(x)
            variants[row] = synced(compiled, device)
        except Exception as error:  # noqa: BLE001
            run.notes.append(f"{name} {dtype}: {row} failed to compile or run: {error!r}")
    times = time_variants(variants, (x,), rounds=args.rounds, warmup=3 if device == "cuda" else 1, progress=False)
    add_rows(run, group, name, dtype, "default", times, {row: group["rows"][row][1] for row in times})
    return group


def add_rows(run: Run, group: dict, name: str, dtype: str, mode: str, times: dict, fns: dict) -> None:
    """One row per timed variant in `fns` (medians, speedup to the "unpruned" times, FLOPs,
    kernels, peak memory)."""
    x, device = group["x"], run.args.device
    rates = {row: x.shape[0] / statistics.median(samples) for row, samples in times.items()}
    for row in fns:
        base_row, rate = row.split(" [")[0], rates[row]
        ratio = group["rows"][base_row][2] / group["base"]
        speedup = rate / rates["unpruned"]
        run.rows.append({
            "model": name, "dtype": dtype, "mode": mode, "row": row, "img_s": rate, "speedup": speedup,
            "gflops": group["rows"][base_row][2], "flop_ratio": ratio,
            "gain_share": (speedup - 1) / (1 / ratio - 1) if ratio < 1 else None,
            "kernels": dict(attention_kernels(fns[row], (x,), device)), "peak_mib": peak_mib(fns[row], (x,), device),
            "tome_r": group["r"] if base_row == "tome (published)" else None})
        run.rows[-1]["kernel"] = kernel_label(run.rows[-1]["kernels"])


def modes_group(run: Run, group: dict, name: str, dtype: str) -> None:
    """max-autotune and reduce-overhead (CUDA graphs) for the unpruned and the fastest reduced row,
    timed with their default-mode selves; speedups to the default-mode unpruned row."""
    done = [r for r in run.rows if r["model"] == name and r["dtype"] == dtype and r["row"] != "unpruned"]
    best = max(done, key=lambda r: r["img_s"])["row"]
    fns = {row: group["rows"][row][1] for row in ("unpruned", best)}
    for mode in ("max-autotune", "reduce-overhead"):
        for row in ("unpruned", best):
            fns[f"{row} [{mode}]"] = torch.compile(group["rows"][row][0], mode=mode, **COMPILE)
    times = time_variants({row: synced(fn, "cuda") for row, fn in fns.items()}, (group["x"],), rounds=run.args.rounds,
                          warmup=3, progress=False)
    add_rows(run, group, name, dtype, "modes", times, {row: fn for row, fn in fns.items() if "[" in row})


def speed(run: Run) -> None:
    args = run.args
    for i, (name, dtype) in enumerate((n, d) for n in args.models for d in args.dtypes):
        if i and run.elapsed() > args.budget:
            run.notes.append(f"{name} {dtype}: skipped, the run had taken {run.elapsed():.0f} s (--budget {args.budget:g})")
            continue
        with run.section(f"speed {name} {dtype}"):
            try:
                group = speed_group(run, name, dtype)
            except Exception as error:  # noqa: BLE001  (the next model or dtype still runs)
                log.exception("speed %s %s failed", name, dtype)
                run.notes.append(f"{name} {dtype}: failed: {error!r}")
                group = None
        if group is not None and i == 0 and args.device == "cuda":
            with run.section(f"modes {name} {dtype}"):
                try:
                    modes_group(run, group, name, dtype)
                except Exception as error:  # noqa: BLE001
                    log.exception("modes failed")
                    run.notes.append(f"{name} {dtype}: modes failed: {error!r}")
        run.groups.pop((name, dtype, args.batch), None)  # free the device memory: the rows, their compiled
        torch._dynamo.reset()  # code and CUDA graphs (Inductor's caches on disk stay)
    if args.device != "cuda":
        run.notes.append("mode='max-autotune' and 'reduce-overhead' (CUDA graphs): CUDA only, skipped")


def header(args) -> dict:
    device = torch.cuda.get_device_name() if args.device == "cuda" else (platform.processor() or platform.machine())
    versions = {"torch": torch.__version__, "timm": timm.__version__, "transformers": transformers.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
                "triton": triton_version()}
    return {"device": f"{args.device}: {device}", "threads": torch.get_num_threads(), "versions": versions,
            "settings": vars(args)}


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def targets(run: Run) -> list[dict]:
    """The issue's targets, per model and dtype: img/s of a row over img/s of another (default mode),
    where both were timed: drop @0.65 over unpruned >= 1.9; the drop (the shift) over published ToMe
    at equal FLOPs >= 1.2, over the attention score >= 1.15."""
    rates = {(r["model"], r["dtype"], r["row"]): r["img_s"] for r in run.rows if r["mode"] == "default"}
    found = []
    for model, dtype in dict.fromkeys((m, d) for m, d, _ in rates):
        for faster, slower, goal in TARGETS:
            if (model, dtype, faster) in rates and (model, dtype, slower) in rates:
                ratio = rates[model, dtype, faster] / rates[model, dtype, slower]
                found.append({"model": model, "dtype": dtype, "target": f"{faster} / {slower} >= {goal}",
                              "value": ratio, "met": ratio >= goal})
    return found


def markdown(run: Run, head: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in head["versions"].items() if v)
    a = run.args
    lines = [f"# gpu_bench: {head['device']}", "", f"{versions}; {head['threads']} CPU threads", "",
             f"{', '.join(a.models)} at {a.img} px{f', depth {a.depth}' if a.depth else ''}, batch {a.batch}, "
             f"{a.rounds} interleaved rounds after warm-up, medians, compiled against compiled", ""]
    passed = sum(c["passed"] for c in run.checks)
    lines += [f"## Checks: {passed} of {len(run.checks)} passed", ""]
    lines += [f"- {'PASS' if c['passed'] else 'FAIL'} {c['name']}: "
              f"{c.get('error') or format(c['value'], '.3g')} (tolerance {c['tolerance']})" for c in run.checks]
    table = [(r["model"].split("_patch")[0], r["dtype"], r["row"], f"{r['img_s']:.1f}", f"{r['speedup']:.2f}x",
              f"{r['gflops']:.3f}", f"{r['flop_ratio']:.3f}", "-" if r["gain_share"] is None else f"{r['gain_share']:.2f}",
              r["kernel"], "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}") for r in run.rows]
    headers = ("model", "dtype", "row", "img/s", "speedup", "GFLOPs", "FLOP ratio", "share of FLOP gain",
               "attention kernels (per call)", "peak MiB")
    lines += ["", "## Speed", "", tabulate(table, headers=headers, tablefmt="github"), ""]
    lines += [f"- {note}" for note in run.notes]
    lines += ["", "## The issue's targets (img/s over img/s)", ""]
    lines += [f"- {t['model']} {t['dtype']}: {t['target']}: {t['value']:.2f} ({'met' if t['met'] else 'not met'})"
              for t in targets(run)]
    lines += ["", "Seconds per section: " + ", ".join(f"{k} {v}" for k, v in run.sections.items())]
    return "\n".join(lines) + "\n"


def write(run: Run) -> tuple[Path, str]:
    """<--out>/gpu_bench.md, .json and .png, from what the run has found so far; -> (folder, markdown)."""
    out = Path(run.args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = header(run.args)
    text = markdown(run, head)
    (out / "gpu_bench.md").write_text(text)
    record = {"header": head, "checks": run.checks, "rows": run.rows, "targets": targets(run), "notes": run.notes,
              "sections": run.sections, "total_s": round(run.elapsed(), 1)}
    (out / "gpu_bench.json").write_text(json.dumps(record, indent=2, default=str))
    plot_speedups(run.rows, out / "gpu_bench.png", head["device"])
    return out, text


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("repshift_fx").setLevel(logging.WARNING)  # its per-block lines, for every row built
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if args.device == "cuda":  # fp32 checks in full fp32: no TF32 (the speed rows are fp16 / bf16)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    else:  # compiled C++ kernels by name in torch.profiler: how a softmax (explicit attention) is seen
        torch._inductor.config.cpp.enable_kernel_profile = True
    run = Run(args)
    for name, part in (("checks: deit", deit_checks), ("checks: bert", bert_checks), ("speed", speed)):
        with run.section(name):
            try:
                part(run)
            except Exception as error:  # noqa: BLE001  (the next part still runs)
                log.exception("%s failed", name)
                run.notes.append(f"{name} failed: {error!r}")
                run.checks.append({"name": f"{name}: the section ran", "passed": False, "value": None,
                                   "tolerance": None, "error": repr(error)})
    out, text = write(run)
    print(text)
    log.info("wrote %s/gpu_bench.md, .json, .png in %.0f s", out, run.elapsed())
    return json.loads((out / "gpu_bench.json").read_text())


if __name__ == "__main__":
    main()
