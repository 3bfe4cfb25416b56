"""Where a ViM forward spends its time, unpruned and pruned: the selective scan against the linears (docs/vim.md).

    .venv/bin/python tools/profile_vim.py --img-size 224 --batch 8 --keep 0.7 --compiled --out results/profile_vim/x.json

Profiles one forward (torch.profiler, self CPU time) of ViM-T (repshift_fx.apps.models.vim, random
weights) and of repshift_fx.compress(..., keep) of it (traced on two of the images), eager or, with --compiled,
torch.compile'd (after a warm-up, with Inductor's kernel profiling on), and sorts the ops into
- logcumsumexp, and "scan (other ops)": an op with a (batch, tokens, d_inner | 1, d_state | 1)
  operand, the selective scan's 4-D tensors (eager: cumsum, mul, clamp, log, sub, exp, add, the sum
  over the state; compiled: cumsum, the other ATen call Inductor leaves);
- linear (mm, addmm, ...), conv (the depthwise conv1d, the patch embedding);
- fused: Inductor's C++ kernels (compiled only; named after the ops they fuse);
- other: the rest.
Prints the table, the scan's share and `speedup_if_scan_shrank_as_flops` (the speedup had the scan's
time shrunk by the scans' FLOP ratio and the rest stayed as measured); --out keeps every op.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm)
import torch
from repshift_fx.apps.models import vim
from torch.profiler import ProfilerActivity, profile


LINEAR = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn::_linear_pointwise"}
CONV = {"aten::convolution", "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::mkldnn_convolution",
        "aten::_mkldnn_convolution", "mkldnn::_convolution_pointwise"}


def category(event, d_inner: int, d_state: int) -> str:
    name = event.key
    if "logcumsumexp" in name:
        return "logcumsumexp"
    if name in LINEAR:
        return "linear"
    if name in CONV:
        return "conv"
    if name.startswith(("cpp_fused", "graph_", "kernel_cpp")):
        return "fused"
    for shape in event.input_shapes or ():
        if len(shape) == 4 and shape[2] in (d_inner, 1) and shape[3] in (d_state, 1):
            return "scan (other ops)"
    return "other"


def profile_once(fn, img, d_inner: int, d_state: int, warmup: bool) -> dict:
    with torch.inference_mode():
        if warmup:
            fn(img)  # compiles
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn(img)
        wall = time.perf_counter() - start
    totals = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        totals[category(event, d_inner, d_state)] += event.self_cpu_time_total / 1e3  # ms
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"wall_ms": 1e3 * wall, "self_ms": dict(totals),
            "ops": [(e.key, round(e.self_cpu_time_total / 1e3, 1), e.count) for e in ops if e.self_cpu_time_total]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--compiled", action="store_true", help="profile the compiled models (Inductor)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vim.vim_tiny(size=args.img_size, **({"depth": args.depth} if args.depth else {})).eval()
    img = torch.randn(args.batch, 3, args.img_size, args.img_size)
    example = img[:2]  # the pass traces and counts on two images; the graph runs on any batch
    report = repshift_fx.inspect(model, example, keep=args.keep)
    pruned = repshift_fx.compress(model, example, keep=args.keep, compile=False)
    mixer = model.layers[0].mixer
    d_inner, d_state = mixer.out_proj.in_features, mixer.forward_scan.A_log.shape[1]
    scan_flop_ratio = vim.scan_gflops(model, report.tokens) / vim.scan_gflops(model, report.tokens[:1] * len(report.tokens))
    if args.compiled:
        from torch._inductor import config

        config.cpp.enable_kernel_profile = True
        model, pruned = torch.compile(model), torch.compile(pruned)
    found = {"settings": {k: str(v) for k, v in vars(args).items()}, "tokens": report.tokens,
             "flop_ratio": report.gflops_after / report.gflops_before, "scan_flop_ratio": scan_flop_ratio}
    for name, fn in (("unpruned", model), ("pruned", pruned)):
        found[name] = profile_once(fn, img, d_inner, d_state, args.compiled)
    base, cut = found["unpruned"]["self_ms"], found["pruned"]["self_ms"]
    total_u, total_p = sum(base.values()), sum(cut.values())
    print(f"ViM-T {args.img_size} px, batch {args.batch}, {args.threads} threads, "
          f"{'compiled' if args.compiled else 'eager'}, keep {args.keep} (tokens {report.tokens}); "
          f"FLOP ratio {found['flop_ratio']:.3f} (counter), scans {found['scan_flop_ratio']:.3f}")
    print(f"{'category':18} {'unpruned ms':>12} {'share':>6} {'pruned ms':>10} {'share':>6} {'ratio':>6}")
    for key in sorted(set(base) | set(cut), key=lambda k: -base.get(k, 0)):
        u, p = base.get(key, 0.0), cut.get(key, 0.0)
        print(f"{key:18} {u:12.0f} {u / total_u:6.1%} {p:10.0f} {p / total_p:6.1%} {p / u if u else float('nan'):6.3f}")
    print(f"{'total (self)':18} {total_u:12.0f} {'':6} {total_p:10.0f} {'':6} {total_p / total_u:6.3f}")
    print(f"wall of the profiled call: {found['unpruned']['wall_ms']:.0f} -> {found['pruned']['wall_ms']:.0f} ms")
    scan = ("logcumsumexp", "scan (other ops)")
    scan_u, scan_p = sum(base.get(k, 0) for k in scan), sum(cut.get(k, 0) for k in scan)
    ideal = total_u / (total_p - scan_p + scan_u * found["scan_flop_ratio"])
    found["summary"] = {"scan_share_unpruned": scan_u / total_u, "scan_share_pruned": scan_p / total_p,
                        "scan_ratio": scan_p / scan_u, "rest_ratio": (total_p - scan_p) / (total_u - scan_u),
                        "speedup": total_u / total_p, "speedup_if_scan_shrank_as_flops": ideal}
    print(json.dumps(found["summary"], indent=1))
    for name in ("unpruned", "pruned"):
        print(name, "top ops (self ms, calls):", found[name]["ops"][:20])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(found, indent=1))
    return found


if __name__ == "__main__":
    main()
