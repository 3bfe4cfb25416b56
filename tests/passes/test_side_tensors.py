"""Side tensors that carry the token axis (rotary tables, relative-position biases, masks) are
gathered with the kept tokens (passes/gather_side_tensors.py), or refused by name."""
import pytest
import torch
from torch import nn

import repshift_fx
from conftest import assert_close, assert_compiled_matches_eager, tiny_timm
from reference_hf import beit_reference, eva_reference
from repshift_fx import UnsupportedSiteError
from repshift_fx.passes.gather_side_tensors import gather_side
from repshift_fx.passes.padding_scores import padding_last



def test_gather_side_aligns_batch_axes_and_the_prefix_offset():
    index = torch.tensor([[0, 2, 3], [0, 1, 4]])  # prefix token 0, then two of four patch tokens
    rope = torch.arange(4.0)[:, None].expand(4, 3)  # (N - 1, D): no row for the prefix token
    got = gather_side(rope, index, (2,), 4, offset=1)
    assert got.shape == (2, 1, 2, 3)
    assert got[:, 0, :, 0].tolist() == [[1.0, 2.0], [0.0, 3.0]]
    bias = torch.arange(25.0).reshape(1, 1, 5, 5)  # (1, H, N, N)
    both = gather_side(bias, index, (2, 3), 4)
    assert both.shape == (2, 1, 3, 3) and both[1, 0].tolist() == [[0, 1, 4], [5, 6, 9], [20, 21, 24]]
    scores = padding_last(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([[1, 0, 1]]))
    assert scores.argsort(descending=True).tolist() == [[0, 2, 1]]


@pytest.mark.parametrize("fused", (True, False))
def test_eva02_keep_one_is_the_original(fused):
    model = tiny_timm("eva02_tiny_patch14_224", img_size=56, fused=fused)
    x = torch.randn(2, 3, 56, 56)
    gm = repshift_fx.compress(model, x, keep=1.0, at=(0, 1, 2), compile=False)
    with torch.no_grad():
        assert_close(gm(x), model(x))


@pytest.mark.parametrize("fused", (True, False))
def test_eva02_rotary_tables_follow_the_kept_tokens(fused):
    model = tiny_timm("eva02_tiny_patch14_224", img_size=56, fused=fused)
    x = torch.randn(2, 3, 56, 56)
    gm = repshift_fx.compress(model, x, keep=0.7, at=(0, 2), compile=False)
    assert gm.report.tokens == [17, 13, 13, 10]
    assert len(gm.report.side_tensors) == 12  # blocks 1-3 read 4 rope tables each: sin/cos for q and k
    assert not any(row.refused for row in gm.report.blocks)
    with torch.no_grad():
        assert_close(gm(x), eva_reference(model, x, (0, 2), 0.7))


def test_eva02_compiled_matches_eager():
    model = tiny_timm("eva02_tiny_patch14_224", img_size=56, depth=2)
    assert_compiled_matches_eager(model, (3, 56, 56), (2, 3), keep=0.7, at=(0,))


def test_eva02_through_the_dynamo_backend_matches_the_reference():
    model = tiny_timm("eva02_tiny_patch14_224", img_size=56)
    x = torch.randn(2, 3, 56, 56)
    backend = repshift_fx.backend(keep=0.7, at=(0, 2), inner="eager")
    with torch.no_grad():
        assert_close(torch.compile(model, backend=backend)(x), eva_reference(model, x, (0, 2), 0.7))
    assert backend.reports[0].tokens == [17, 13, 13, 10]


@pytest.mark.parametrize("fused", (True, False))
def test_relative_position_bias_follows_the_kept_tokens(fused):
    model = tiny_timm("beit_base_patch16_224", depth=3, img_size=32, fused=fused, patch_size=8, embed_dim=32,
                      num_heads=2, num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    same = repshift_fx.compress(model, x, keep=1.0, at=(0, 1), compile=False)
    gm = repshift_fx.compress(model, x, keep=0.5, at=(0, 1), compile=False)
    with torch.no_grad():
        assert_close(same(x), model(x))
        assert_close(gm(x), beit_reference(model, x, (0, 1), 0.5))
    assert len(gm.report.side_tensors) == 2  # the (1, H, N, N) biases of blocks 1 and 2


class _SequenceFirst(nn.Module):
    """Blocks over (B, N, C) whose attention runs sequence-first and adds a (N, 1, C) table there."""

    def __init__(self, tokens=8, dim=16):
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.mlp = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(2))
        self.table = nn.Parameter(torch.randn(tokens, 1, dim))

    def forward(self, x):
        for attn, mlp in zip(self.attn, self.mlp):
            y = attn(x).transpose(0, 1) + self.table  # (N, B, C) + (N, 1, C)
            x = x + (y.softmax(0) * y).transpose(0, 1)
            x = x + mlp(x)
        return x.mean(1)


def test_side_tensor_on_a_sequence_first_axis_is_refused_by_name():
    model = _SequenceFirst().eval()
    words = r"add in the model's top-level forward reads the model's tensor 'table'"
    with pytest.raises(UnsupportedSiteError, match=words) as caught:
        repshift_fx.compress(model, torch.randn(2, 8, 16), keep=0.5, at=(0,), compile=False)
    assert "batch-first" in str(caught.value) and "later `at`" in str(caught.value)


def test_fused_token_with_side_tensors_is_refused_by_name():
    model = tiny_timm("eva02_tiny_patch14_224", img_size=56)
    with pytest.raises(UnsupportedSiteError, match="fuse=True") as caught:
        repshift_fx.compress(model, torch.randn(1, 3, 56, 56), keep=0.5, at=(0,), fuse=True, compile=False)
    assert "mul in module" in str(caught.value) and "module 'blocks.1.attn'" in str(caught.value)
