"""Benchmark: eager baseline, baseline compiled, compressed eager, compressed compiled.

    python tools/bench.py                                   # deit_small, batch 32, 2 threads
    python tools/bench.py --model deit_tiny_patch16_224 --batch 8 --rounds 3 --keep 0.5 --at 4
    python tools/bench.py --torchvision resnet50 --keep 0.7 --at 4          # a CNN: lines mode
    python tools/bench.py --compare                         # shift vs attention vs random, same FLOPs
    python tools/bench.py --compare --docs docs             # ... and copy the table and plot to docs/

Prints a table (img/s, GFLOPs, speedup, speedup divided by the FLOP gain) and the share of
time the scoring and gather nodes take; writes it as Markdown and JSON under --out.
With --compare: the baseline and each of --scores at the same schedule (equal FLOPs), eager and
compiled, interleaved in one run; writes bench_scores.md, bench_scores.json and bench_scores.png
(speedup per variant) under --out, and prints how much faster shift runs than attention compiled.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import repshift_fx  # noqa: F401  (before timm: installs the torchvision guard)
import timm
import torch
from repshift_fx.benchmark import format_table, rows_as_dicts, run_benchmark, run_comparison, score_ratio, scoring_overhead


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--torchvision", default=None, metavar="NAME",
                        help="a torchvision model instead (random weights), e.g. resnet50; CNNs prune rows and columns")
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
    parser.add_argument("--scores", default="shift,attention,random", help="scores for --compare (comma-separated)")
    parser.add_argument("--fuse", action="store_true", help="with --compare: EViT fusion of the dropped tokens")
    parser.add_argument("--docs", default=None, metavar="DIR", help="with --compare: also copy the .md and .png here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = {"depth": args.depth} if args.depth else {}
    if args.torchvision:
        import torchvision

        model = getattr(torchvision.models, args.torchvision)().eval()
        args.model = args.torchvision
    else:
        model = timm.create_model(args.model, img_size=args.img_size, **extra).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    at = tuple(int(i) for i in args.at.split(",")) if args.at else None
    if args.compare:
        return compare(args, model, images, at)
    rows = run_benchmark(model, images, rounds=args.rounds, threads=args.threads, keep=args.keep, at=at,
                         overhead=not args.no_overhead)
    title = (f"{args.model}, batch {args.batch}, {args.img_size} px, fp32, {args.threads} threads, "
             f"keep={args.keep}, at={at or 'default'}, {args.rounds} rounds interleaved, medians")
    print(title)
    print(format_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(f"{title}\n\n{format_table(rows, 'github')}\n")
    record = {"settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows_as_dicts(rows), "scoring_overhead": scoring_overhead(rows)}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out / 'bench.md'} and {out / 'bench.json'}")


def compare(args, model, images, at) -> None:
    scores = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    rows = run_comparison(model, images, scores=scores, rounds=args.rounds, threads=args.threads, keep=args.keep,
                          at=at, fuse=args.fuse)
    title = (f"{args.model}, batch {args.batch}, {args.img_size} px, fp32, {args.threads} threads, keep={args.keep}, "
             f"at={at or 'default'}{', fuse' if args.fuse else ''}, {args.rounds} rounds interleaved, medians")
    ratios = {f"{a} / {b} compiled": score_ratio(rows, a, b) for a in scores[:1] for b in scores[1:]}
    lines = [f"{name}: {value:.3f}x img/s" for name, value in ratios.items() if value is not None]
    print(title, format_table(rows), "", *lines, sep="\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = f"{title}\n\n{format_table(rows, 'github')}\n\n" + "".join(f"- {line}\n" for line in lines)
    (out / "bench_scores.md").write_text(text)
    record = {"settings": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "rows": rows_as_dicts(rows), "ratios": ratios}
    (out / "bench_scores.json").write_text(json.dumps(record, indent=2))
    plot_speedups(rows, out / "bench_scores.png", title)
    print(f"\nwrote {out / 'bench_scores.md'}, {out / 'bench_scores.json'} and {out / 'bench_scores.png'}")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("bench_scores.md", "bench_scores.png"):
            (docs / name).write_bytes((out / name).read_bytes())
        print(f"copied bench_scores.md and bench_scores.png to {docs}")


def plot_speedups(rows, path: Path, title: str) -> None:
    """Bars: speedup over the eager baseline per variant, eager and compiled side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.variant.rsplit(" ", 1)[0] for r in rows))
    by_name = {r.variant: r for r in rows}
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    for shift, kind in ((-0.2, "eager"), (0.2, "compiled")):
        heights = [by_name[f"{n} {kind}"].speedup for n in names]
        bars = ax.bar([i + shift for i in range(len(names))], heights, width=0.4, label=kind)
        ax.bar_label(bars, labels=[f"{h:.2f}x" for h in heights], fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{by_name[n + ' eager'].gflops:.2f} GFLOPs" for n in names])
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("speedup over the eager baseline")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
