"""Benchmark: eager baseline, baseline compiled, compressed eager, compressed compiled.

    python tools/bench.py                                   # deit_small, batch 32, 2 threads
    python tools/bench.py --model deit_tiny_patch16_224 --batch 8 --rounds 3 --keep 0.5 --at 4
    python tools/bench.py --torchvision resnet50 --keep 0.7 --at 4 --channels-last --freezing   # a CNN: lines mode
    python tools/bench.py --compare                         # shift vs attention vs random, same FLOPs
    python tools/bench.py --compare --out results/bench_scores --docs docs    # ... copied to docs/bench_scores.*
    python tools/bench.py --torchvision resnet50 --channels-last --at 4 --sweep 0.85,0.75,0.7 --compiled-only
    python tools/bench.py --vim --batch 8 --sweep 0.7 --compiled-only   # ViM-T: examples/vim.py's model (docs/vim.md)

Prints a table (img/s, GFLOPs, speedup to the baseline of the same kind, eager or compiled, that
speedup divided by the FLOP gain, speedup to the eager baseline) and the share of
time the scoring and gather nodes take; writes it as Markdown and JSON under --out.
With --compare: the baseline and each of --scores at the same schedule (equal FLOPs), eager and
compiled, interleaved in one run; writes bench_scores.md, bench_scores.json and bench_scores.png
(speedup per variant) under --out, and prints how much faster shift runs than attention compiled.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import timm
import torch
from repshift_fx.apps.bench import (attention_cost, format_table, rows_as_dicts, run_benchmark, run_comparison,
                                   run_sweep, score_ratio, scoring_overhead)
from tabulate import tabulate


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--torchvision", default=None, metavar="NAME",
                        help="a torchvision model instead (random weights), e.g. resnet50; CNNs prune rows and columns")
    parser.add_argument("--vim", action="store_true", help="the Vision Mamba of examples/vim.py "
                        "(repshift_fx.apps.models.vim) instead, ViM-T's size (random weights)")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and images in channels-last memory format (CNNs: far faster convolutions on CPU)")
    parser.add_argument("--freezing", action="store_true", help="Inductor freezing for every compiled variant "
                        "(weights as constants: BN folded into convs, weights prepacked; PyTorch's advice for CPU "
                        "inference)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--at", default=None, help="comma-separated block indices; default d/4, d/2, 3d/4")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (tiny runs)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the fixed-token variant")
    parser.add_argument("--out", default="results", help="folder for bench.md and bench.json")
    parser.add_argument("--compare", action="store_true", help="compare the scores at one schedule instead")
    parser.add_argument("--sweep", default=None, metavar="K1,K2,...", help="time the compressed model at each of "
                        "these keep rates (same --at) against the baseline instead, in one run (--compiled-only: "
                        "the compiled models alone)")
    parser.add_argument("--scores", default="shift,attention,random", help="scores for --compare (comma-separated)")
    parser.add_argument("--fuse", action="store_true", help="with --compare: EViT fusion of the dropped tokens")
    parser.add_argument("--docs", default=None, metavar="DIR", help="with --compare: also copy the .md and .png here")
    parser.add_argument("--compiled-only", action="store_true", help="with --compare: time the compiled models only")
    parser.add_argument("--attention-cost", action="store_true", help="with --compare (timm): time SDPA against "
                        "explicit attention at every block's shape and predict the shift / attention ratios")
    parser.add_argument("--all-explicit", action="store_true", help="with --compare (timm): add attention with "
                        "explicit attention in every block, as EViT-style code runs")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.freezing:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    extra = {"depth": args.depth} if args.depth else {}
    if args.torchvision:
        import torchvision

        model = getattr(torchvision.models, args.torchvision)().eval()
        args.model = args.torchvision
    elif args.vim:
        from repshift_fx.apps.models.vim import vim_tiny

        model = vim_tiny(size=args.img_size, **extra).eval()
        args.model = "ViM-T (repshift_fx.apps.models.vim)"
    else:
        model = timm.create_model(args.model, img_size=args.img_size, **extra).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    if args.channels_last:  # the model was built here: converting it changes no user's model
        model, images = model.to(memory_format=torch.channels_last), images.to(memory_format=torch.channels_last)
    at = tuple(int(i) for i in args.at.split(",")) if args.at else None
    if args.compare:
        return compare(args, model, images, at)
    if args.sweep:
        return sweep(args, model, images, at)
    rows = run_benchmark(model, images, rounds=args.rounds, threads=args.threads, keep=args.keep, at=at,
                         overhead=not args.no_overhead)
    title = run_title(args, f"keep={args.keep}, at={at or 'default'}")
    print(title, format_table(rows), sep="\n")
    out = write_results(args, "bench", f"{title}\n\n{format_table(rows, 'github')}\n", rows,
                        scoring_overhead=scoring_overhead(rows))
    print(f"\nwrote {out / 'bench.md'} and {out / 'bench.json'}")


def run_title(args, schedule: str) -> str:
    """One line that says what was timed: model, batch, size, format, threads, `schedule`, rounds."""
    return (f"{args.model}, batch {args.batch}, {args.img_size} px, fp32{', channels-last' * args.channels_last}, "
            f"{'Inductor freezing, ' * args.freezing}{args.threads} threads, {schedule}, "
            f"{args.rounds} rounds interleaved, medians")


def write_results(args, stem: str, markdown: str, rows, **extra) -> Path:
    """<--out>/<stem>.md (`markdown`) and <stem>.json (settings, versions, rows, `extra`); -> the folder."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown)
    record = {"settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows_as_dicts(rows), **extra}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
    return out


def sweep(args, model, images, at) -> None:
    keeps = [float(k) for k in args.sweep.split(",")]
    rows = run_sweep(model, images, keeps, rounds=args.rounds, threads=args.threads, at=at,
                     kinds=("compiled",) if args.compiled_only else ("eager", "compiled"))
    title = run_title(args, f"keep in {keeps}, at={at or 'default'}")
    print(title, format_table(rows), sep="\n")
    out = write_results(args, "bench_sweep", f"{title}\n\n{format_table(rows, 'github')}\n", rows)
    print(f"\nwrote {out / 'bench_sweep.md'} and {out / 'bench_sweep.json'}")


def compare(args, model, images, at) -> None:
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    explicit = None
    if args.all_explicit:  # a copy whose timm Attention modules compute softmax(q k^T) v explicitly
        explicit = copy.deepcopy(model)
        for module in explicit.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
    rows = run_comparison(model, images, scores=scores, rounds=args.rounds, threads=args.threads, keep=args.keep,
                          at=at, fuse=args.fuse, explicit_model=explicit,
                          kinds=("compiled",) if args.compiled_only else ("eager", "compiled"))
    title = run_title(args, f"keep={args.keep}, at={at or 'default'}{', fuse' if args.fuse else ''}")
    others = list(scores[1:]) + (["attention (all explicit)"] if explicit is not None else [])
    ratios = {f"{scores[0]} / {b} compiled, {stat}": score_ratio(rows, scores[0], b, stat=stat)
              for b in others for stat in ("median", "min")}
    lines = [f"{name.rsplit(',', 1)[0]}: {value:.3f}x img/s (medians)" for name, value in ratios.items()
             if value is not None and name.endswith("median")]  # the JSON has the fastest-round ratios too
    print(title, format_table(rows), "", *lines, sep="\n")
    cost = attention_analysis(args, model, images, at, rows) if args.attention_cost else None
    text = f"{title}\n\n{format_table(rows, 'github')}\n\n" + "".join(f"- {line}\n" for line in lines)
    if cost is not None:
        print(cost["text"])
        text += "\n" + cost["markdown"]
    out = write_results(args, "bench_scores", text, rows, ratios=ratios, attention_cost=cost and cost["data"])
    plot_speedups(rows, out / "bench_scores.png", title)
    print(f"\nwrote {out / 'bench_scores.md'}, {out / 'bench_scores.json'} and {out / 'bench_scores.png'}")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for suffix in ("md", "png"):  # named after --out: results/bench_scores -> docs/results/bench_scores.md
            (docs / f"{out.name}.{suffix}").write_bytes((out / f"bench_scores.{suffix}").read_bytes())
        print(f"copied to {docs / out.name}.md and .png")


def attention_analysis(args, model, images, at, rows) -> dict:
    """Explicit attention against SDPA at each block's shape (compiled), and the ratios it predicts:
    shift time + the extra of the scoring blocks (attention), or of every block (all explicit)."""
    report = repshift_fx.inspect(model, images[:1], keep=args.keep, at=at)
    shapes = [(args.batch, b.attn.num_heads, n, b.attn.head_dim) for b, n in zip(model.blocks, report.tokens)]
    cost = attention_cost(shapes, threads=args.threads)
    extra = {c["shape"]: c["extra_ms"] for c in cost}
    scoring = sum(extra[shapes[r.index]] for r in report.blocks if r.scored)
    every = sum(extra[s] for s in shapes)
    shift_ms = next(r.ms_per_batch for r in rows if r.variant == "shift compiled")
    table = tabulate([(f"{c['shape'][2]}", f"{c['sdpa_ms']:.1f}", f"{c['explicit_ms']:.1f}", f"{c['extra_ms']:.1f}")
                      for c in cost],
                     headers=("tokens", "SDPA ms", "explicit ms", "extra ms"), tablefmt="github")
    summary = (f"explicit attention costs {scoring:.0f} ms more in the scoring blocks and {every:.0f} ms more in "
               f"all blocks (batch {args.batch}); on shift compiled's {shift_ms:.0f} ms that predicts shift / "
               f"attention = {(shift_ms + scoring) / shift_ms:.3f}x and shift / attention (all explicit) = "
               f"{(shift_ms + every) / shift_ms:.3f}x")
    markdown = f"Attention alone, compiled, batch {args.batch}, medians:\n\n{table}\n\n{summary}\n"
    return {"text": f"\n{table}\n{summary}", "markdown": markdown,
            "data": {"blocks": cost, "scoring_extra_ms": scoring, "all_extra_ms": every, "shift_ms": shift_ms}}


def plot_speedups(rows, path: Path, title: str) -> None:
    """Bars: speedup over the baseline per variant, eager and compiled side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.variant.rsplit(" ", 1)[0] for r in rows))
    kinds = list(dict.fromkeys(r.variant.rsplit(" ", 1)[1] for r in rows))
    by_name = {r.variant: r for r in rows}
    width = 0.8 / len(kinds)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for j, kind in enumerate(kinds):
        heights = [by_name[f"{n} {kind}"].speedup_to_eager for n in names]
        offsets = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(offsets, heights, width=width, label=kind)
        ax.bar_label(bars, labels=[f"{h:.2f}x" for h in heights], fontsize=8)
    labels = [f"{n}\n{by_name[f'{n} {kinds[0]}'].gflops:.3g} GFLOPs" for n in names]
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel(f"img/s over the baseline ({rows[0].variant})")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
