"""Token pruning on a Vision Mamba (ViM, Zhu et al. 2024): bidirectional selective-scan blocks.

    python examples/vim.py                              # ViM-T-like: 24 blocks, dim 192, 224 px, 197 tokens
    python examples/vim.py --size 32 --patch 8 --depth 4 --dim 32 --batch 2 --runs 1   (seconds)

The model is written here in plain PyTorch with random weights (`mamba-ssm` needs CUDA; this runs
on CPU and traces with torch.fx). As in ViM: a patch embedding, a class token inserted in the
MIDDLE of the patch sequence (position N // 2), learned position embeddings, blocks
`x + mixer(norm(x))` (RMSNorm; no MLP), a final norm, and a head that reads the middle token.
The mixer is Mamba's, run in both directions: in_proj -> (x, z); per direction a depthwise causal
conv1d, SiLU, input-dependent dt, B, C (x_proj, dt_proj, softplus), a diagonal A, the selective
scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t; the two directions averaged,
gated by SiLU(z), out_proj.

The scan has no Python loop over tokens: `selective_scan` is its parallel form in log space,
h_t = sum_{s<=t} exp(S_t - S_s) v_s with S = cumsum(dt A), the positive and negative parts of v
summed apart by logcumsumexp (Heinsen's trick), so no exp overflows; `sequential_scan` is the
recurrence it is checked against (tests/test_vim.py).
"""
from __future__ import annotations

import argparse
import math
import statistics

import repshift_fx
from repshift_fx.compile.timing import time_variants
from repshift_fx.plan.tokens import default_at

import torch
import torch.nn.functional as F
from torch import nn


def selective_scan(u, dt, A, B, C, D):
    """y_t = C_t h_t + D u_t, h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, h_0 = 0, over axis 1.

    u, dt: (batch, L, d); A: (d, n), negative; B, C: (batch, L, n); D: (d,) -> (batch, L, d).
    Parallel and exact: with S_t = sum_{s<=t} dt_s A, h_t = sum_{s<=t} exp(S_t - S_s) v_s. The
    positive and negative parts of v are each summed by logcumsumexp(log v - S), then S is added
    back: every exponent stays <= the largest term's, so nothing overflows in fp32."""
    log_decay = (dt.unsqueeze(-1) * A).cumsum(dim=1)  # S: (batch, L, d, n), decreasing
    v = (dt * u).unsqueeze(-1) * B.unsqueeze(2)  # dt_s B_s u_s: (batch, L, d, n)
    positive = torch.logcumsumexp(torch.log(v.clamp(min=0)) - log_decay, dim=1)
    negative = torch.logcumsumexp(torch.log((-v).clamp(min=0)) - log_decay, dim=1)
    h = torch.exp(log_decay + positive) - torch.exp(log_decay + negative)
    return (h * C.unsqueeze(2)).sum(-1) + D * u


def sequential_scan(u, dt, A, B, C, D):
    """The recurrence itself, one token at a time: the reference for `selective_scan`."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    out = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        out.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(out, dim=1)


class ScanDirection(nn.Module):
    """One direction of ViM's bidirectional mixer: conv1d, SiLU, dt/B/C from the tokens, the scan."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, scan=selective_scan):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.split = (dt_rank, d_state, d_state)
        self.scan = scan
        with torch.no_grad():  # Mamba's dt initialisation: softplus(bias) in [1e-3, 1e-1]
            dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x):  # (batch, L, d_inner)
        length = x.shape[1]
        u = F.silu(self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: the first L outputs
        dt, B, C = self.x_proj(u).split(self.split, dim=-1)
        dt = F.softplus(self.dt_proj(dt))
        return self.scan(u, dt, -torch.exp(self.A_log), B, C, self.D)


class BiMamba(nn.Module):
    """ViM's mixer ("v2"): both directions share in_proj and out_proj; their outputs are averaged."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, scan=selective_scan):
        super().__init__()
        d_inner, dt_rank = expand * dim, math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_scan = ScanDirection(d_inner, d_state, d_conv, dt_rank, scan)
        self.backward_scan = ScanDirection(d_inner, d_state, d_conv, dt_rank, scan)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x):
        x, z = self.in_proj(x).chunk(2, dim=-1)
        y = self.forward_scan(x) + self.backward_scan(x.flip(1)).flip(1)
        return self.out_proj(y / 2 * F.silu(z))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class VimBlock(nn.Module):
    """x + mixer(norm(x)): ViM's fused add-norm written as the plain pre-norm residual."""

    def __init__(self, dim: int, d_state: int, scan=selective_scan):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMamba(dim, d_state, scan=scan)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class VisionMamba(nn.Module):
    """(B, 3, H, W) -> (B, classes); the class token sits in the middle of the sequence."""

    def __init__(self, size=224, patch=16, dim=192, depth=24, d_state=16, classes=1000, scan=selective_scan):
        super().__init__()
        patches = (size // patch) ** 2
        self.token_position = patches // 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.layers = nn.ModuleList(VimBlock(dim, d_state, scan) for _ in range(depth))
        self.norm_f = RMSNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        middle = self.token_position
        return torch.cat([x[:, :middle], cls, x[:, middle:]], dim=1) + self.pos_embed

    def forward(self, img):
        x = self.embed(img)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm_f(x)[:, self.token_position])


def vim_tiny(**overrides) -> VisionMamba:
    """ViM-T's shape: 24 blocks, dim 192, d_state 16, 16 px patches of 224 px images (197 tokens)."""
    return VisionMamba(**{"size": 224, "patch": 16, "dim": 192, "depth": 24, "d_state": 16, **overrides})


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


def scan_gflops(model: VisionMamba, tokens: list[int]) -> float:
    """GFLOPs per sample of the scans' elementwise work, which torch.utils.flop_counter does not count
    (it counts matmuls and convolutions): Mamba's count, as VMamba's and ViM's fvcore handle
    (`flops_selective_scan_fn`) makes it, 9 L d n per scan plus L d for the D skip, per direction,
    for the `tokens` L entering each block (`report.tokens`)."""
    mixer = model.layers[0].mixer
    d, n = mixer.out_proj.in_features, mixer.forward_scan.A_log.shape[1]
    return sum(2 * (9 * length * d * n + length * d) for length in tokens) / 1e9


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
