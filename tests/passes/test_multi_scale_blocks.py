"""A block is an MLP with the mixer before it on its own stream, never another scale's.

CoaT's parallel blocks run two scales side by side (a fine grid and a coarse one) and mix them by
interpolation. Pairing sites by graph order alone put the coarse stream's attention with the fine
stream's MLP: the block entered on 5 tokens and left on 17, and a restore after it scattered the
coarse tokens into the fine stream ("restore_dropped ... fails on fewer tokens", an op the pass
inserted blamed on the model). Now the coarse attention stays apart and every block keeps one count.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
from conftest import assert_close

DIM, HEADS = 32, 4


class Block(nn.Module):
    """A pre-norm ViT block on (B, N, DIM)."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def attention(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, DIM))

    def forward(self, x):
        x = x + self.attention(self.n1(x))
        return x + self.mlp(self.n2(x))


def _grid(x, side: int):
    """(B, 1 + side^2, C) -> its patches as (B, C, side, side)."""
    return x[:, 1:].transpose(1, 2).reshape(x.shape[0], DIM, side, side)


class Parallel(nn.Module):
    """CoaT's parallel block, two scales: attention on the coarse stream, which the fine stream
    takes in upsampled (cross-scale mixing), then an MLP on the fine stream.
    fine (B, 1 + 16, C), coarse (B, 1 + 4, C) -> the same two."""

    def __init__(self):
        super().__init__()
        self.coarse = Block()
        self.n, self.mlp = nn.LayerNorm(DIM), nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))

    def forward(self, fine, coarse):
        coarse = coarse + self.coarse.attention(self.coarse.n1(coarse))
        up = F.interpolate(_grid(coarse, 2), scale_factor=2.0, mode="bilinear", align_corners=False)
        fine = fine + torch.cat([coarse[:, :1], up.flatten(2).transpose(1, 2)], dim=1)
        return fine + self.mlp(self.n(fine)), coarse


class TwoScales(nn.Module):
    """A fine 4 x 4 and a coarse 2 x 2 grid of an 8 x 8 image, each with a class token; two
    serial blocks on the coarse grid, then a parallel block (or none), then a block on the fine
    grid alone. (B, 3, 8, 8) -> (B, 10)."""

    def __init__(self, parallel: bool = True):
        super().__init__()
        self.with_parallel = parallel
        self.embed_fine, self.embed_coarse = nn.Conv2d(3, DIM, 2, 2), nn.Conv2d(3, DIM, 4, 4)
        self.cls_fine, self.cls_coarse = nn.Parameter(torch.randn(1, 1, DIM)), nn.Parameter(torch.randn(1, 1, DIM))
        self.serial = nn.Sequential(Block(), Block())
        self.parallel = Parallel()
        self.fine_mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, DIM))
        self.head = nn.Linear(2 * DIM, 10)

    def _tokens(self, conv, cls, x):
        patches = conv(x).flatten(2).transpose(1, 2)
        return torch.cat([cls.expand(x.shape[0], -1, -1), patches], dim=1)

    def forward(self, x):
        fine = self._tokens(self.embed_fine, self.cls_fine, x)
        coarse = self._tokens(self.embed_coarse, self.cls_coarse, x)
        coarse = self.serial(coarse)
        if self.with_parallel:
            fine, coarse = self.parallel(fine, coarse)
        fine = fine + self.fine_mlp(fine)
        return self.head(torch.cat([fine[:, 0], coarse[:, 0]], dim=-1))


@pytest.fixture
def two_scales():
    torch.manual_seed(0)
    return TwoScales().eval(), torch.randn(2, 3, 8, 8)


def test_each_mlp_pairs_with_the_mixer_of_its_own_stream(two_scales):
    model, x = two_scales
    report = repshift_fx.inspect(model, x, keep=1.0, at=(0,))
    assert report.tokens == [5, 5, 17, 17], report.tokens
    assert [row.site for row in report.blocks] == ["attention + MLP", "attention + MLP", "MLP", "MLP"]
    assert any("attention branch" in item and "not part of a block" in item for item in report.refused)


def test_a_drop_in_the_coarse_run_is_restored_onto_the_coarse_stream(two_scales):
    """The drop after block 0 runs block 1 on fewer coarse tokens and is restored after it, before
    the parallel block's attention reads the coarse grid: exact at keep=1.0, fewer FLOPs at 0.5."""
    model, x = two_scales
    with torch.no_grad():
        want = model(x)
        got = repshift_fx.compress(model, x, keep=1.0, at=(0,), compile=False)(x)
    assert_close(got, want)
    report = repshift_fx.inspect(model, x, keep=0.5, at=(0,))
    assert report.tokens == [5, 3, 17, 17] and report.flop_ratio < 1, (report.tokens, report.flop_ratio)
    assert [row.restored for row in report.blocks] == [False, True, False, False]


def test_timm_coat_tiny_prunes_and_matches_at_keep_one():
    """The real model at 128 px: keep=1.0 is the model, keep=0.7 prunes (before: refused as
    "restore_dropped in the model's top-level forward fails on fewer tokens")."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("coat_tiny", img_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert_close(repshift_fx.compress(model, x, keep=1.0, compile=False)(x), model(x))
    assert repshift_fx.inspect(model, x, keep=0.7).flop_ratio < 1
