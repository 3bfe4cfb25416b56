"""Representation Shift pruning inside an existing torch.compile pipeline.

    python examples/torch_compile_backend.py                 # deit_small, 224 px, batch 8
    python examples/torch_compile_backend.py --tiny          # 4 blocks at 64 px (what the tests run)

Two ways in, both on the passes `repshift_fx.compress()` uses:

1. the entry point: after `pip install repshift-fx`, `torch.compile(model, backend="repshift")`
   works in any process, without importing repshift_fx (the defaults of compress());
2. `repshift_fx.backend(keep=..., at=..., inner=...)`: a configured backend, passed where the
   pipeline already calls torch.compile (`dynamic=`, `inner="inductor"` or `"eager"`).

What it did is logged by the logger `repshift_fx` at INFO (the blocks that drop, the tokens kept,
the graphs left alone), and each backend keeps one `Report` per graph it pruned.
"""
from __future__ import annotations

import argparse
import logging

import repshift_fx  # before timm: its torchvision guard must come first on this machine
import timm
import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--tiny", action="store_true", help="deit_tiny with 4 blocks at 64 px: seconds, not minutes")
    parser.add_argument("--batch", type=int, default=8, help="at least 7")
    parser.add_argument("--inner", default="inductor", help="the backend that compiles the pruned graph")
    return parser.parse_args(argv)


def build(args) -> tuple[torch.nn.Module, int]:
    if args.tiny:
        return timm.create_model("deit_tiny_patch16_224", depth=4, img_size=64).eval(), 64
    return timm.create_model(args.model).eval(), 224


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("repshift_fx").setLevel(logging.INFO)  # how to read what the backend did
    torch.manual_seed(0)
    model, size = build(args)
    images = torch.randn(args.batch, 3, size, size)
    errors = {}

    # 1. One argument changed: backend="repshift" (registered as an entry point at install time).
    compiled = torch.compile(model, backend="repshift")
    # the backend's default is the paper's rule (it sees one graph at a time: no FLOP target for ToMe)
    reference = repshift_fx.compress(model, images, score="shift", compile=False)  # keep 0.7 after d/4, d/2, 3d/4
    with torch.no_grad():
        errors["entry point"] = (compiled(images) - reference(images)).abs().max().item()

    # 2. A configured backend inside an existing pipeline: dynamic batch, another backend underneath.
    backend = repshift_fx.backend(keep=0.5, at=(1,), inner=args.inner)
    pipeline = torch.compile(model, backend=backend, dynamic=None)  # batch goes dynamic on the 2nd size
    reference = repshift_fx.compress(model, images, keep=0.5, at=(1,), compile=False)
    with torch.no_grad():
        for batch in (1, 2, 7):  # 1 compiles static, 2 makes the batch dynamic, 7 reuses it
            x = images[:batch]
            errors[f"backend(...) batch {batch}"] = (pipeline(x) - reference(x)).abs().max().item()
    print(backend.reports[-1])  # blocks, tokens in and out, where attention is fused

    for name, error in errors.items():
        print(f"{name}: max |torch.compile - compress(compile=False)| = {error:.2e}")
    return errors


if __name__ == "__main__":
    main()
