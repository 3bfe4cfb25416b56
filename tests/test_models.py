"""The models the pass must handle, at full size (batch 1, no compile): keep=1.0 is the original
model, and the paper's schedule prunes with the right prefix and token counts."""
import pytest
import torch
import torchvision

import repshift_fx
from conftest import tiny_timm

MODELS = [  # one, two and five prefix tokens; DeiT-S, DeiT-B and ViT-B are DeiT-Ti's class at other widths
    ("deit_tiny_patch16_224", {}, 1, 197),
    ("deit_small_distilled_patch16_224", {}, 2, 198),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 224}, 5, 261),
]


@pytest.mark.parametrize("name,kwargs,prefix,tokens", MODELS, ids=[m[0] for m in MODELS])
def test_full_size_timm_models(name, kwargs, prefix, tokens):
    model = tiny_timm(name, depth=12, **({"img_size": 224} | kwargs))
    x = torch.randn(1, 3, 224, 224)
    same = repshift_fx.compress(model, x, keep=1.0, compile=False)
    pruned = repshift_fx.compress(model, x, score="shift", compile=False)  # the paper's rule
    with torch.no_grad():
        reference = model(x)
        assert ((same(x) - reference).abs().max() / reference.abs().max()).item() < 1e-5
        assert pruned(x).shape == reference.shape
    patches = tokens - prefix
    after = [prefix + patches]
    for _ in range(3):
        after.append(prefix + -(-7 * (after[-1] - prefix) // 10))
    assert pruned.report.prefix == prefix
    assert pruned.report.tokens == [after[0]] * 4 + [after[1]] * 3 + [after[2]] * 3 + [after[3]] * 2


def test_torchvision_vit_b_16():
    model = torchvision.models.vit_b_16().eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
    x = torch.randn(1, 3, 224, 224)
    report = repshift_fx.inspect(model, x, score="shift")
    assert report.tokens == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert all(r.attention == "MultiheadAttention (fused inside)" for r in report.blocks)
    assert 17.5 < report.gflops_before < 17.7 and report.flop_ratio < 0.7
    same = repshift_fx.compress(model, x, keep=1.0, compile=False)
    with torch.no_grad():
        reference = model(x)
        assert ((same(x) - reference).abs().max() / reference.abs().max()).item() < 1e-5
