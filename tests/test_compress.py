"""compress(): agreement with the eager reference, token counts, invariants, compiled == eager."""
import itertools

import pytest
import torch
import torchvision
from torch._dynamo.utils import counters

import repshift_fx
from conftest import assert_close, assert_unchanged, node_values, snapshot, tiny_timm
from reference import reference_forward
from repshift_fx.errors import TargetOutOfReach
from repshift_fx.method import tokens as shift



@pytest.mark.parametrize("site,distance,residual", list(itertools.product(("mlp", "attn", "block"), ("l2", "l1", "cosine"), (False, True))))
def test_matches_reference_for_every_site_and_distance(deit, image, site, distance, residual):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(0, 2), site=site, distance=distance, residual=residual, compile=False)
    with torch.no_grad():
        assert_close(gm(image), reference_forward(deit, image, (0, 2), 0.5, site, distance, residual))


@pytest.mark.parametrize("name,kwargs,prefix", [
    ("deit_tiny_patch16_224", {}, 1),
    ("deit_tiny_distilled_patch16_224", {}, 2),
    ("vit_small_patch14_reg4_dinov2", {"img_size": 56}, 5),
    ("vit_small_patch16_18x2_224", {}, 1),  # two attentions, then two MLPs, in parallel: stack(...).sum(0)
])
def test_prefix_tokens_found_and_reference_agrees(name, kwargs, prefix, image):
    model = tiny_timm(name, **({"img_size": 64} | kwargs))
    img = torch.randn(2, 3, kwargs.get("img_size", 64), kwargs.get("img_size", 64))
    gm = repshift_fx.compress(model, img, keep=0.6, at=(1, 2), compile=False)
    assert gm.report.prefix == prefix
    with torch.no_grad():
        assert_close(gm(img), reference_forward(model, img, (1, 2), 0.6))


def test_compress_and_inspect_inside_inference_mode(deit, image):
    """Inference tensors keep no version counter; capture must not need one."""
    with torch.inference_mode():
        gm = repshift_fx.compress(deit, image.clone(), keep=0.5, at=(0, 2), compile=False)
        report = repshift_fx.inspect(deit, image.clone(), keep=0.5, at=(0, 2))
        assert_close(gm(image), reference_forward(deit, image, (0, 2), 0.5))
    assert report.flop_ratio < 0.8


def test_norm_score_matches_reference(deit, image):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(1,), score="norm", compile=False)
    with torch.no_grad():
        assert_close(gm(image), reference_forward(deit, image, (1,), 0.5, score="norm"))


def test_keep_one_gives_the_original_outputs(image):
    for fused in (True, False):
        model = tiny_timm("deit_tiny_patch16_224", fused=fused)
        gm = repshift_fx.compress(model, image, keep=1.0, at=(0, 1, 2), compile=False)
        with torch.no_grad():
            assert_close(gm(image), model(image))


def test_deit_small_paper_rule_token_counts():
    model = tiny_timm("deit_small_patch16_224", depth=12, img_size=224)
    x = torch.randn(1, 3, 224, 224)
    report = repshift_fx.inspect(model, x, score="shift")
    assert report.tokens == [197] * 4 + [139] * 3 + [98] * 3 + [69] * 2
    assert [r.index for r in report.blocks if r.scored] == [3, 6, 9]
    assert 0.66 < report.flop_ratio < 0.70
    assert repshift_fx.inspect(model, x, keep=0.7).tokens == report.tokens  # any reduction option: as given


def test_the_default_is_tome_by_wards_cost_where_the_planner_reaches_the_target():
    model = tiny_timm("deit_tiny_patch16_224", depth=12, img_size=112)  # DeiT's 12 blocks, 49 patches
    x = torch.randn(2, 3, 112, 112)
    default = repshift_fx.compress(model, x, compile=False)
    named = repshift_fx.compress(model, x, score="tome", merge_metric="ward", target_flops=0.7, compile=False)
    assert default.report.config == named.report.config
    assert default.report.config["score"] == "tome" and default.report.config["merge_metric"] == "ward"
    assert 0.66 < default.report.budget["reached"] <= 0.70 and default.report.tokens[-1] < 50 // 2
    assert default.report.notes[0].startswith("the default: ToMe by Ward's cost") and not named.report.notes[0].startswith("the default")
    with torch.no_grad():
        assert torch.equal(default(x), named(x))


def test_the_default_falls_back_to_the_papers_rule_where_tome_cannot_reach_the_target():
    model = tiny_timm("deit_tiny_patch16_224")  # 16 patches: ToMe reaches 0.598 at most, the drop 0.592
    x = torch.randn(2, 3, 64, 64)
    report = repshift_fx.inspect(model, x, target_flops=0.595)
    assert report.config["score"] == "shift" and report.flop_ratio <= 0.595
    assert report.notes[0].startswith("the default is the paper's rule here") and "0.598" in report.notes[0]
    assert report.config == repshift_fx.inspect(model, x, score="shift", target_flops=0.595).config
    with pytest.raises(TargetOutOfReach, match="Ask for at least 0.593") as short:  # the lower of the two reaches
        repshift_fx.compress(model, x, target_flops=0.5, compile=False)
    assert short.value.lowest < 0.593
    cnn = torchvision.models.resnet18().eval()  # lines mode: ToMe has no tokens to match
    report = repshift_fx.inspect(cnn, torch.randn(1, 3, 64, 64))
    assert report.mode == "lines" and "works on tokens" in report.notes[0]
    assert report.config == repshift_fx.inspect(cnn, torch.randn(1, 3, 64, 64), score="shift").config


def test_per_sample_selection_keeps_prefix_and_order():
    scores = torch.tensor([[9.0, 1.0, 5.0, 3.0, 4.0], [0.0, 4.0, 3.0, 2.0, 1.0]])
    index = shift.select_tokens(scores, prefix=1, keep=2)
    assert index.tolist() == [[0, 2, 4], [0, 1, 2]]
    tokens = torch.arange(10.0).reshape(2, 5, 1)
    assert shift.gather_tokens(tokens, index).squeeze(-1).tolist() == [[0, 2, 4], [5, 6, 7]]


def test_gathered_tokens_are_the_original_tokens_in_order(deit, image):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(1,), compile=False)
    values = node_values(gm, image)
    index, block_out, kept = values["repshift_index_1"], values["add_4"], values["repshift_keep_1"]
    assert index.shape == (2, 1 + 8)
    assert (index[:, 0] == 0).all()
    assert (index[:, 1:].diff(dim=1) > 0).all()  # original order, no repeats
    for b in range(2):
        assert torch.equal(kept[b], block_out[b, index[b]])


def test_model_left_unchanged(image):
    model = tiny_timm("deit_tiny_patch16_224", fused=False)
    before = snapshot(model)
    gm = repshift_fx.compress(model, image, keep=0.5, compile=False)
    with torch.no_grad():
        gm(image)
    assert_unchanged(model, before)
    assert not model.blocks[0].attn.fused_attn


def test_random_score_keeps_counts(deit, image):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(1,), score="random", compile=False)
    assert gm.report.tokens == [17, 17, 9, 9]
    with torch.no_grad():
        assert gm(image).shape == deit(image).shape


def test_compiled_matches_eager_graph_without_recompiling_per_batch(deit):
    torch._dynamo.reset()
    counters.clear()
    img = torch.randn(1, 3, 64, 64)
    eager = repshift_fx.compress(deit, img, keep=0.5, at=(1,), compile=False)
    compiled = repshift_fx.compress(deit, img, keep=0.5, at=(1,))
    with torch.no_grad():
        for batch in (1, 2, 7, 32):
            x = torch.randn(batch, 3, 64, 64)
            assert_close(compiled(x), eager(x))
    assert counters["stats"]["unique_graphs"] <= 2
    assert compiled.report.tokens == [17, 17, 9, 9]


def test_compile_options_reach_torch_compile(deit, image, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda gm, **options: seen.update(options) or gm)
    out = repshift_fx.compress(deit, image, at=(1,), compile_mode="max-autotune", dynamic=False)
    assert seen == {"mode": "max-autotune", "dynamic": False}
    assert isinstance(out, torch.fx.GraphModule) and out.report.tokens == [17, 17, 13, 13]
