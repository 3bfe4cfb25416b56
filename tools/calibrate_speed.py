"""calibrate(target_speedup=...) and a re-measurement: does the chosen configuration reach the speed
target when timed again, in a fresh compile?

    python tools/calibrate_speed.py timm:deit_small_patch16_224 --target-speedup 1.4 --batch 32

Calibration batches are random images (speed does not depend on them; agreement is then only a
tie-break). The re-measurement compiles the original and `compress(model, x, **cal.config)` again and
times them interleaved (`--rounds`, medians), on the same batch size.
"""
from __future__ import annotations

import argparse
import statistics
import time

import repshift_fx  # noqa: F401  (before timm)
import torch

from repshift_fx.apps import specs
from repshift_fx.compile.timing import time_variants


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--target-speedup", type=float, default=1.4)
    parser.add_argument("--target-flops", type=float, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the table as markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = specs.load_model(args.spec, batch=args.batch)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(loaded.input_shape, generator=generator) for _ in range(args.samples // args.batch)]
    start = time.time()
    cal = repshift_fx.calibrate(loaded.model, batches, target_speedup=args.target_speedup,
                                target_flops=args.target_flops)
    seconds = time.time() - start
    x = batches[0]
    pruned = torch.compile(repshift_fx.compress(loaded.model, x, compile=False, **cal.config))
    times = time_variants({"original": torch.compile(loaded.model), "chosen": pruned}, (x,), rounds=args.rounds)
    again = statistics.median(times["original"]) / statistics.median(times["chosen"])
    lines = [f"{args.spec}, batch {args.batch}, {args.threads} threads, target {args.target_speedup}x",
             "", cal.format_table("github"), "", *cal.notes,
             f"calibration took {seconds:.0f} s; chosen: {cal.chosen.label} at FLOP ratio {cal.chosen.flops:.3f}: "
             f"{cal.chosen.speedup:.3f}x in calibration, {again:.3f}x re-measured ({args.rounds} rounds interleaved, "
             f"medians; {100 * (again / cal.chosen.speedup - 1):+.1f}%)"]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
