"""Benchmark: eager baseline, baseline compiled, compressed eager, compressed compiled.

    python tools/bench.py                                   # deit_small, batch 32, 2 threads
    python tools/bench.py --model deit_tiny_patch16_224 --batch 8 --rounds 3 --keep 0.5 --at 4

Prints a table (img/s, GFLOPs, speedup, speedup divided by the FLOP gain) and the share of
time the scoring and gather nodes take; writes it as Markdown and JSON under --out.
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
from repshift_fx.benchmark import format_table, rows_as_dicts, run_benchmark, scoring_overhead


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--at", default=None, help="comma-separated block indices; default d/4, d/2, 3d/4")
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (tiny runs)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the fixed-token variant")
    parser.add_argument("--out", default="results", help="folder for bench.md and bench.json")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    extra = {"depth": args.depth} if args.depth else {}
    model = timm.create_model(args.model, img_size=args.img_size, **extra).eval()
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    at = tuple(int(i) for i in args.at.split(",")) if args.at else None
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


if __name__ == "__main__":
    main()
