"""Token pruning on a video ViT: tubelet tokens over time x height x width (UMT / VideoMAE style).

    python examples/video_vit.py                       # 16 frames of 112 px: 8 x 7 x 7 = 392 tokens
    python examples/video_vit.py --frames 4 --size 32 --patch 8 --depth 4 --dim 32 --heads 2   (seconds)

The model is built here from timm's `Block` with random weights: a Conv3d patch embedding cuts
the clip into 2-frame x 16 x 16 tubelets, every tubelet is one token, learned position
embeddings are added, the blocks run, and the head reads the mean of the tokens. The paper's
video results (UMT, 5.5x faster retrieval) prune such tokens across space and time. The script
prints what `repshift_fx.inspect` finds (the tokens' grid among the notes), then how many tokens
each drop keeps in each time step, and the speed of the pruned graph against the model.
"""
from __future__ import annotations

import argparse

import repshift_fx  # noqa: F401  (before timm)
from repshift_fx.compile.timing import time_variants
from repshift_fx.context import inserted, role_of

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn


class VideoViT(nn.Module):
    """(B, 3, T, H, W) clips -> (B, classes): tubelet tokens (B, T/t * H/p * W/p, C), ViT blocks, mean pooling."""

    def __init__(self, frames=16, size=112, patch=16, tubelet=2, dim=192, depth=12, heads=3, classes=400):
        super().__init__()
        self.grid = (frames // tubelet, size // patch, size // patch)
        self.patch_embed = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] * self.grid[2], dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(clip).flatten(2).transpose(1, 2)  # (B, T' H' W', C), time slowest
        x = self.blocks(x + self.pos_embed)
        return self.head(self.fc_norm(x.mean(1)))


def tokens_per_time_step(gm: torch.fx.GraphModule, clip: torch.Tensor, grid: tuple) -> dict[int, list[list[int]]]:
    """{block: kept tokens in each time step, per sample}: where each drop's kept tokens lie in time.

    A drop's indices number the tokens that entered it, so they are composed with the earlier
    drops' to find each kept token's place in the (T', H', W') grid."""
    run = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        run.run(clip)
    found = {}
    place = torch.arange(grid[0] * grid[1] * grid[2]).expand(clip.shape[0], -1)
    for node, value in run.env.items():
        if role_of(node) == "index":
            place = place.gather(1, value)
            time_step = place // (grid[1] * grid[2])
            found[inserted(node).block] = [
                torch.bincount(row, minlength=grid[0]).tolist() for row in time_step]
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = VideoViT(args.frames, args.size, args.patch, 2, args.dim, args.depth, args.heads).eval()
    clip = torch.randn(args.batch, 3, args.frames, args.size, args.size)
    print(repshift_fx.inspect(model, clip, keep=args.keep))

    gm = repshift_fx.compress(model, clip, keep=args.keep, compile=False)
    print("\nkept tokens per time step (sample 0), after each drop:")
    kept = tokens_per_time_step(gm, clip, model.grid)
    for block, rows in kept.items():
        print(f"  block {block}: {rows[0]} of {model.grid[1] * model.grid[2]} per time step")

    times = time_variants({"model": model, "pruned": gm}, (clip,), rounds=args.runs, warmup=0, progress=False)
    best = {name: min(values) for name, values in times.items()}
    print(f"\neager, batch {args.batch}: model {best['model'] * 1e3:.1f} ms, pruned graph {best['pruned'] * 1e3:.1f} ms "
          f"({best['model'] / best['pruned']:.2f}x); torch.compile both for the deployed speed")
    return {"report": gm.report, "kept": kept, "grid": model.grid, "speedup": best["model"] / best["pruned"]}


if __name__ == "__main__":
    main()
