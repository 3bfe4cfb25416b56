"""MLP-only drops: a stage whose windowed attention needs every token still runs its MLPs on fewer.

The model is a Swin-like stack (attention inside 2 x 2 windows of a 4 x 4 grid, written with the
grid's sizes as literals), checked against an eager reference written from the method: the stream
keeps every token, each drop picks the tokens of highest MLP shift, and the later blocks' MLPs run
on those alone while the others pass unchanged.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import repshift_fx
from repshift_fx.errors import RepShiftError


class WindowAttention(nn.Module):
    def __init__(self, dim: int, grid: int, window: int, heads: int = 2):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.grid, self.window, self.heads = grid, window, heads

    def forward(self, x):  # (B, N, C), N = grid * grid
        b, n, c = x.shape
        g, w = self.grid, self.window
        windows = x.view(b, g // w, w, g // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        q, k, v = self.qkv(windows).reshape(-1, w * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, w * w, c)
        y = self.proj(y).view(b, g // w, g // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(b, n, c)


class Block(nn.Module):
    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, grid, 2)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WindowViT(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(Block(dim, 4) for _ in range(depth))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t)
        return self.head(t.mean(1))


def reference(model: WindowViT, x: torch.Tensor, at: tuple[int, ...], keep: float) -> torch.Tensor:
    """The method by hand: drops after `at` choose who runs the later MLPs (shift 0 for the others)."""
    t = model.embed(x).flatten(2).transpose(1, 2)
    index, count = None, t.shape[1]
    for i, block in enumerate(model.blocks):
        t = t + block.attn(block.norm1(t))
        if index is None:
            branch = block.mlp(block.norm2(t))
            shift, new = (branch - t).norm(dim=-1), t + branch
        else:
            rows = index.unsqueeze(-1).expand(-1, -1, t.shape[-1])
            kept = t.gather(1, rows)
            branch = block.mlp(block.norm2(kept))
            new = t.scatter(1, rows, kept + branch)
            shift = torch.zeros(t.shape[:2]).scatter(1, index, (branch - kept).norm(dim=-1))
        if i in at and i < len(model.blocks) - 1:
            count = math.ceil(keep * count)
            index = shift.topk(count, dim=1).indices.sort(dim=1).values
        t = new
    return model.head(t.mean(1))


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    return WindowViT().eval(), torch.randn(3, 3, 16, 16)


def test_matches_the_eager_reference(model_and_input):
    model, x = model_and_input
    compressed = repshift_fx.compress(model, x, keep=0.7, at=(0, 1), compile=False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), reference(model, x, (0, 1), 0.7), rtol=1e-5, atol=1e-5)


def test_keep_one_is_the_model_and_flops_fall(model_and_input):
    model, x = model_and_input
    with torch.no_grad():
        torch.testing.assert_close(repshift_fx.compress(model, x, keep=1.0, at=(0, 1), compile=False)(x), model(x),
                                   rtol=1e-5, atol=1e-6)
    report = repshift_fx.inspect(model, x, keep=0.7, at=(0, 1))
    assert report.flop_ratio < 0.95
    assert [row.tokens_in for row in report.blocks] == [16] * 4  # the stream keeps every token
    assert [row.mlp_tokens for row in report.blocks] == [None, 12, 9, 9]
    assert any("MLP-only" in note for note in report.notes)


def test_merge_is_not_turned_into_a_drop(model_and_input):
    model, x = model_and_input
    with pytest.raises(RepShiftError) as refusal:
        repshift_fx.compress(model, x, keep=0.7, at=(0, 1), reduce="merge", compile=False)
    assert "reduce='drop'" in str(refusal.value) and "repshift_" not in str(refusal.value)


def test_timm_swin_prunes_its_mlps():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", depths=(2, 4), num_heads=(2, 4), embed_dim=32,
                              img_size=112, num_classes=10).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(repshift_fx.compress(model, x, keep=1.0, compile=False)(x), model(x),
                                   rtol=1e-5, atol=1e-5)
    report = repshift_fx.inspect(model, x, keep=0.7)
    assert report.flop_ratio < 0.99
    assert any(row.mlp_tokens for row in report.blocks)


def test_restore_true_also_drops_for_the_mlps(model_and_input):
    model, x = model_and_input
    compressed = repshift_fx.compress(model, x, keep=0.7, at=(0, 1), restore=True, compile=False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), reference(model, x, (0, 1), 0.7), rtol=1e-5, atol=1e-5)


def test_tome_between_attention_and_mlp_counts_as_pruning(model_and_input):
    """ToMe merges before the MLP of its own block and restores right after it here (the next block's
    windows need every token): that block's MLP runs on fewer tokens, which the report shows, and
    no 'nothing is pruned' warning is given."""
    model, x = model_and_input
    report = repshift_fx.inspect(model, x, at=(0, 1), score="tome", r=2)
    assert report.flop_ratio < 1 and [row.mlp_tokens for row in report.blocks[:2]] == [14, 14]
    assert not any("nothing is pruned" in note for note in report.notes)
