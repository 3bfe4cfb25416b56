"""Token pruning on a Vision Mamba (ViM, Zhu et al. 2024): bidirectional selective-scan blocks.

    python examples/vim.py                              # ViM-T-like: 24 blocks, dim 192, 224 px, 197 tokens
    python examples/vim.py --size 32 --patch 8 --depth 4 --dim 32 --batch 2 --runs 1   (seconds)

The model, `repshift_fx.apps.models.vim` (random weights), is ViM in plain PyTorch (`mamba-ssm`
needs CUDA; this runs on CPU and traces with torch.fx): a class token in the MIDDLE of the patch
sequence, blocks `x + mixer(norm(x))` with no MLP, the mixer Mamba's selective scan run in both
directions. The script prints what `repshift_fx.inspect` finds, the FLOPs with the scans'
elementwise work added, and the pruned model's agreement and speed; --compare-sites compares
scoring the block's output with scoring the mixer (docs/vim.md).
"""
from __future__ import annotations

import argparse
import statistics

import repshift_fx
from repshift_fx.apps.models.vim import VisionMamba, scan_gflops
from repshift_fx.compile.timing import time_variants
from repshift_fx.plan.tokens import default_at

import torch


@torch.no_grad()
def compare_sites(model: VisionMamba, img: torch.Tensor, keep: float = 0.7, sites=("block", "attn")) -> dict:
    """What can be measured without trained weights: for each site, the pruned model's top-1
    agreement with the unpruned one and the relative error of its logits, and the Spearman
    correlation of the sites' token rankings at each block of the default schedule."""
    reference = model(img)
    found = {}
    for site in sites:
        out = repshift_fx.compress(model, img, keep=keep, site=site, compile=False)(img)
        found[site] = {"agreement": (out.argmax(-1) == reference.argmax(-1)).float().mean().item(),
                       "relative_error": ((out - reference).norm() / reference.norm()).item()}
    at = default_at(len(model.layers))
    x, correlations = model.embed(img), {}
    for i, layer in enumerate(model.layers):
        branch = layer.mixer(layer.norm(x))
        if i in at:
            ranks = [_ranks(branch.norm(dim=-1)), _ranks((branch - x).norm(dim=-1))]
            per_sample = [torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(*ranks)]
            correlations[i] = torch.stack(per_sample).mean().item()
        x = x + branch
    return {"sites": found, "spearman_block_vs_attn": correlations}


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    return scores.argsort(dim=-1).argsort(dim=-1).float()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--keep", type=float, default=0.7)
    parser.add_argument("--site", default="mlp", help="mlp (the default: the mixer, attn, for mixer-only blocks), attn, block")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare-sites", action="store_true", help="site=block against site=attn (docs/vim.md)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = VisionMamba(args.size, args.patch, args.dim, args.depth, classes=10).eval()
    img = torch.randn(args.batch, 3, args.size, args.size)
    if args.compare_sites:
        found = compare_sites(model, img, args.keep)
        print(found)
        return found
    report = repshift_fx.inspect(model, img, keep=args.keep, site=args.site)
    print(report)
    scans = (scan_gflops(model, report.tokens[:1] * len(report.tokens)), scan_gflops(model, report.tokens))
    print(f"GFLOPs per sample with the scans' elementwise work (9 L d n + L d per scan, not in the table): "
          f"{report.gflops_before + scans[0]:.4g} -> {report.gflops_after + scans[1]:.4g}; the scans alone "
          f"{scans[0]:.4g} -> {scans[1]:.4g}")
    gm = repshift_fx.compress(model, img, keep=args.keep, site=args.site, compile=False)
    with torch.no_grad():
        agree = (gm(img).argmax(-1) == model(img).argmax(-1)).float().mean().item()
    times = time_variants({"model": model, "pruned": gm}, (img,), rounds=args.runs, progress=False)
    print(f"top-1 agreement with the unpruned model: {agree:.2f}; eager ms/batch (median): "
          + ", ".join(f"{name} {statistics.median(t) * 1e3:.1f}" for name, t in times.items()))
    return {"report": report, "agreement": agree, "times": times, "scan_gflops": scans}


if __name__ == "__main__":
    main()
