"""A Vision Mamba (ViM, Zhu et al. 2024) in plain PyTorch: bidirectional selective-scan blocks.

Plain PyTorch because `mamba-ssm` needs CUDA: this runs on CPU and traces with torch.fx. As
in ViM: a patch embedding, a class token inserted in the MIDDLE of the patch sequence (position
N // 2), learned position embeddings, blocks `x + mixer(norm(x))` (RMSNorm; no MLP), a final norm,
and a head that reads the middle token. The mixer is Mamba's, run in both directions: in_proj ->
(x, z); per direction a depthwise causal conv1d, SiLU, input-dependent dt, B, C (x_proj, dt_proj,
softplus), a diagonal A, the selective scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
y_t = C_t h_t + D u_t; the two directions averaged, gated by SiLU(z), out_proj.

The scan has no Python loop over tokens: `selective_scan` is its parallel form in log space,
h_t = sum_{s<=t} exp(S_t - S_s) v_s with S = cumsum(dt A), the positive and negative parts of v
summed apart by logcumsumexp (Heinsen's trick), so no exp overflows; `sequential_scan` is the
recurrence it is checked against (tests/test_vim.py).

Used by examples/vim.py, tools/bench.py --vim, tools/profile_vim.py and tools/train_fmnist_vim.py.
"""
from __future__ import annotations

import math

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


def scan_gflops(model: VisionMamba, tokens: list[int]) -> float:
    """GFLOPs per sample of the scans' elementwise work, which torch.utils.flop_counter does not count
    (it counts matmuls and convolutions): Mamba's count, as VMamba's and ViM's fvcore handle
    (`flops_selective_scan_fn`) makes it, 9 L d n per scan plus L d for the D skip, per direction,
    for the `tokens` L entering each block (`report.tokens`)."""
    mixer = model.layers[0].mixer
    d, n = mixer.out_proj.in_features, mixer.forward_scan.A_log.shape[1]
    return sum(2 * (9 * length * d * n + length * d) for length in tokens) / 1e9
