"""Site finding on timm and torchvision graphs: blocks, kinds, prefix tokens, side tensors."""
import pytest
import torch
import torchvision

import repshift_fx
from repshift_fx import NoSiteError
from conftest import tiny_timm
from repshift_fx.capture import capture
from repshift_fx.passes.find_sites import analyze


def _analysis(model, x):
    gm, _ = capture(model, x)
    return analyze(gm)


def test_timm_blocks_pair_attention_with_mlp():
    analysis = _analysis(tiny_timm("deit_tiny_patch16_224"), torch.randn(2, 3, 64, 64))
    assert [b.module for b in analysis.blocks] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert all(b.mixer.kind == "attention" and b.mlp.kind == "mlp" for b in analysis.blocks)
    assert analysis.prefix == 1 and "cls_token" in analysis.prefix_source
    assert analysis.channels == 192 and not analysis.stray


def test_layerscale_swiglu_and_registers():
    model = tiny_timm("vit_small_patch14_reg4_dinov2", img_size=56)
    analysis = _analysis(model, torch.randn(1, 3, 56, 56))
    assert analysis.prefix == 5 and len(analysis.blocks) == 4
    assert analysis.blocks[0].tokens == 21


def test_rotary_tables_are_side_inputs():
    analysis = _analysis(tiny_timm("eva02_tiny_patch14_224", img_size=56), torch.randn(1, 3, 56, 56))
    assert all(b.mixer.side_inputs for b in analysis.blocks)
    assert not any(b.mlp.side_inputs for b in analysis.blocks)


def tiny_torchvision_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model


def test_torchvision_vit_multihead_attention_stays_a_fused_leaf():
    model = tiny_torchvision_vit()
    x = torch.randn(2, 3, 64, 64)
    report = repshift_fx.inspect(model, x, keep=0.5, at=(0,))
    assert [r.module for r in report.blocks] == [f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    assert {r.attention for r in report.blocks} == {"MultiheadAttention (fused inside)"}
    assert report.tokens == [17, 9, 9] and report.prefix == 1
    same = repshift_fx.compress(model, x, keep=1.0, at=(0, 1), compile=False)
    with torch.no_grad():
        reference = model(x)
        assert ((same(x) - reference).abs().max() / reference.abs().max()).item() < 1e-5
        assert repshift_fx.compress(model, x, keep=0.5, at=(0,), compile=False)(x).shape == (2, 10)


class _ParallelMlps(torch.nn.Module):
    """x + sum of two MLPs, stacked on a new axis `stack_dim` and summed over `sum_dim`."""

    def __init__(self, stack_dim: int, sum_dim: int):
        super().__init__()
        self.stack_dim, self.sum_dim = stack_dim, sum_dim
        self.ffns = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
                                        for _ in range(2))

    def forward(self, x):
        return x + torch.stack([ffn(x) for ffn in self.ffns], dim=self.stack_dim).sum(self.sum_dim)


def test_parallel_mlps_summed_over_their_stack_are_an_mlp_site_and_summed_otherwise_are_not():
    """ParallelThingsBlock's `torch.stack([ffn(x) ...]).sum(0)`: each token sums its own outputs. Summing
    the stack over the batch axis instead (dim 1 of (2, B, N, C)) mixes samples: not token-local."""
    x = torch.randn(2, 5, 8)
    assert _analysis(_ParallelMlps(0, 0).eval(), x).blocks[0].mlp.kind == "mlp"
    for stack_dim, sum_dim in ((0, 1), (2, 2)):  # the batch summed; a stack between the tokens and channels
        with pytest.raises(NoSiteError, match="found: mixing at 'ffns'"):
            _analysis(_ParallelMlps(stack_dim, sum_dim).eval(), x)
