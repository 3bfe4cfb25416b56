"""What cannot be pruned is refused by name (node and module, and what to do), and `inspect` of such
a model still returns its table with the refused block marked: Swin, ConvNeXt in tokens mode, a
ViTDet-style neck, a segmentation head, causal attention."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import repshift_fx
from conftest import assert_close, assert_refused, tiny_timm
from repshift_fx import NoSiteError, UnsupportedSiteError


def _marked(report, block: int, *patterns):
    """The inspect report shows every block, nothing pruned, and `block` marked with the reason."""
    assert [row.index for row in report.blocks if row.refused] == [block]
    assert "[refused]" in str(report) and report.refused and all(p in report.refused[0] for p in patterns)
    assert report.tokens == [row.tokens_out for row in report.blocks]


def test_swin_windows_refuse_a_merge_and_inspect_marks_them():
    """A drop right before Swin's windows becomes an MLP-only drop (tests/passes/test_mlp_only_drops.py);
    a merge cannot, so it is refused, saying what would work."""
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=112, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32).eval()
    x = torch.randn(1, 3, 112, 112)
    message = assert_refused(model, x, UnsupportedSiteError, "block 0 (layers.0.blocks.0)",
                             "reshapes its 784 tokens into a 28 x 28 grid", "cannot help", "mode='lines'",
                             "reduce='drop'", at=(0,), reduce="merge")
    assert "node" not in message
    _marked(repshift_fx.inspect(model, x, at=(0,), reduce="merge"), 0, "layers.0.blocks.0")


def test_convnext_in_tokens_mode_is_refused_naming_its_grid():
    model = timm.create_model("convnext_atto", num_classes=10).eval()
    assert_refused(model, torch.randn(1, 3, 64, 64), NoSiteError, "grid model", "first add in",
                   "module 'stages.0.blocks.0'", "mode='lines'", mode="tokens")


class _Neck(nn.Module):
    """ViTDet-style: the tokens back to an H x W grid, then a convolution."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid, self.conv = grid, nn.Conv2d(dim, 8, 1)

    def forward(self, x):
        batch, _, channels = x.shape
        return self.conv(x.transpose(1, 2).reshape(batch, channels, self.grid, self.grid))


class _Dense(nn.Module):
    """A plain ViT (no class token) with a neck, or with a per-token segmentation head."""

    def __init__(self, neck: bool):
        super().__init__()
        self.backbone = tiny_timm("vit_tiny_patch16_224", class_token=False, global_pool="", num_classes=0)
        self.neck = _Neck(192, 4) if neck else None
        self.head = nn.Linear(192, 3)

    def forward(self, x):
        tokens = self.backbone.forward_features(x)
        return self.neck(tokens) if self.neck is not None else self.head(tokens)


@pytest.mark.parametrize("neck", (True, False))
def test_a_dense_head_without_restore_is_refused(neck):
    model, x = _Dense(neck=neck).eval(), torch.randn(2, 3, 64, 64)
    words = ("module 'neck'", "reshapes its 16 tokens into a 4 x 4 grid", "after block 3") if neck else \
        ("output of module 'head'", "dense-prediction")
    assert_refused(model, x, UnsupportedSiteError, *words, "restore=True", at=(1,), restore=False)
    report = repshift_fx.inspect(model, x, at=(1,), restore=False)
    assert report.refused[0].startswith("module 'neck'" if neck else "outside the blocks") and len(report.blocks) == 4 and report.tokens == [16] * 4


@pytest.mark.parametrize("neck", (True, False))
@pytest.mark.parametrize("reduce", ("drop", "merge"))
def test_a_dense_head_prunes_with_every_token_restored_before_it(neck, reduce):
    model, x = _Dense(neck=neck).eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        original = model(x)
    pruned = repshift_fx.compress(model, x, at=(1,), reduce=reduce, compile=False)
    assert pruned(x).shape == original.shape and pruned.report.blocks[-1].restored
    assert repshift_fx.inspect(model, x, at=(1,), reduce=reduce).flop_ratio < 0.95
    assert_close(repshift_fx.compress(model, x, keep=1.0, at=(1,), reduce=reduce, compile=False)(x), original)


class _CausalBlock(nn.Module):
    """A pre-norm block whose attention is causal (`is_causal=True`)."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, tokens, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class _CausalNet(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.blocks = nn.Sequential(*[_CausalBlock() for _ in range(depth)])

    def forward(self, x):
        return self.blocks(x).mean(1)


def test_causal_sdpa_is_refused_and_inspect_marks_it():
    model, x = _CausalNet().eval(), torch.randn(2, 10, 16)
    assert_refused(model, x, UnsupportedSiteError, "scaled_dot_product_attention in module 'blocks.1", "module 'blocks.1'",
                   "is_causal=True", "causal decoders are not pruned", keep=0.5, at=(0,))
    _marked(repshift_fx.inspect(model, x, keep=0.5, at=(0,)), 1, "is_causal=True")


@pytest.mark.parametrize("impl", ("eager", "sdpa"))
def test_a_transformers_decoder_is_refused_for_its_causal_mask(impl):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaModel._from_config(config, attn_implementation=impl).eval()
    inputs = {"input_ids": torch.randint(3, 100, (2, 10))}
    assert_refused(model, inputs, UnsupportedSiteError, "module 'layers.1.self_attn'",
                   "lets each token see only the tokens before it", "causal decoders are not pruned", keep=0.5, at=(0,))
    assert model.config.use_cache is True  # traced with the cache off, and restored
    _marked(repshift_fx.inspect(model, inputs, keep=0.5, at=(0,)), 1, "causal attention")


def test_a_drop_that_prunes_nothing_warns_and_says_so(caplog):
    """keep < 1 after the last block leaves every block on all its tokens: a warning, never silence."""
    import logging

    model, x = tiny_timm("deit_tiny_patch16_224"), torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="repshift_fx"):
        report = repshift_fx.inspect(model, x, keep=0.5, at=(3,))
    assert report.flop_ratio > 0.99 and "nothing is pruned" in caplog.text
    assert any("nothing is pruned" in note and "at=(0, 1, 2)" in note for note in report.notes)
    assert not [n for n in repshift_fx.inspect(model, x, keep=0.5, at=(1,)).notes if "nothing is pruned" in n]
