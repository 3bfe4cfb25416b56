"""The main job: compress a timm DeiT (random weights), say what was done, and how much faster it runs.

    python examples/compress_deit.py                       # DeiT-S, batch 32, 2 threads (about 3 min)
    python examples/compress_deit.py --model deit_tiny_patch16_224 --batch 8
"""
import argparse
import logging

import repshift_fx  # before timm: installs the torchvision guard
import timm
import torch
from repshift_fx.apps.bench import format_table, run_benchmark

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="deit_small_patch16_224")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--img-size", type=int, default=224)
parser.add_argument("--depth", type=int, default=None, help="fewer blocks, for a quick run")
parser.add_argument("--keep", type=float, default=0.7)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
extra = {"depth": args.depth} if args.depth else {}
model = timm.create_model(args.model, img_size=args.img_size, **extra).eval()
images = torch.randn(args.batch, 3, args.img_size, args.img_size)

print(repshift_fx.inspect(model, images, keep=args.keep))
print()
rows = run_benchmark(model, images, keep=args.keep, rounds=args.rounds, threads=args.threads, overhead=False)
print(f"\n{args.model}, batch {args.batch}, {args.threads} threads, {args.rounds} rounds interleaved, medians:")
print(format_table(rows))
compiled = next(r for r in rows if r.variant == "compressed compiled")
print(f"\ncompressed + compiled runs {compiled.speedup:.2f}x the compiled baseline ({compiled.speedup_to_eager:.2f}x the "
      f"eager one) at {compiled.flop_ratio:.2f} of its FLOPs")
