"""score="attention" (EViT CLS attention) and fuse=True (EViT fusion): eager reference agreement,
keep=1.0, token counts, the prefix, the report, the model left unchanged, compile."""
import logging

import pytest
import torch
import torchvision

import repshift_fx
from conftest import assert_close, assert_unchanged, load_tool, node_values, snapshot, tiny_timm
from reference import reference_forward, reference_torchvision_vit
from repshift_fx import UnsupportedSiteError
from repshift_fx.method import tokens as shift
from repshift_fx.passes.attention_scores import IMPL



@pytest.fixture(scope="module")
def distilled():
    return tiny_timm("deit_tiny_distilled_patch16_224")


@pytest.fixture(scope="module")
def no_cls():
    return tiny_timm("vit_tiny_patch16_224", class_token=False, global_pool="avg")


@pytest.fixture(scope="module")
def tv_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero
    return model


@pytest.mark.parametrize("fused,sdpa", [(True, True), (False, True), (False, False)],
                         ids=["sdpa", "explicit->sdpa", "explicit-kept"])
def test_attention_score_matches_reference_one_prefix(image, fused, sdpa):
    model = tiny_timm("deit_tiny_patch16_224", fused=fused)
    gm = repshift_fx.compress(model, image, keep=0.5, at=(0, 2), score="attention", sdpa=sdpa, compile=False)
    assert gm.report.prefix == 1 and gm.report.tokens == [17, 9, 9, 5]
    with torch.no_grad():
        assert_close(gm(image), reference_forward(model, image, (0, 2), 0.5, score="attention"))


def test_attention_score_matches_reference_two_prefix(distilled, image):
    gm = repshift_fx.compress(distilled, image, keep=0.4, at=(1, 2), score="attention", compile=False)
    assert gm.report.prefix == 2 and gm.report.tokens == [18, 18, 9, 5]
    with torch.no_grad():
        assert_close(gm(image), reference_forward(distilled, image, (1, 2), 0.4, score="attention"))


def test_attention_score_without_cls_is_the_attention_received(no_cls, image):
    gm = repshift_fx.compress(no_cls, image, keep=0.5, at=(0, 1), score="attention", compile=False)
    assert gm.report.prefix == 0 and gm.report.tokens == [16, 8, 4, 4]
    assert any("the attention each token receives" in note for note in gm.report.notes)
    with torch.no_grad():
        assert_close(gm(image), reference_forward(no_cls, image, (0, 1), 0.5, score="attention"))


def test_attention_score_multihead_attention_leaf(tv_vit):
    x = torch.randn(2, 3, 32, 32)
    gm = repshift_fx.compress(tv_vit, x, keep=0.5, at=(0, 1), score="attention", fuse=True, compile=False)
    assert gm.report.tokens == [17, 10, 7]
    with torch.no_grad():
        assert_close(gm(x), reference_torchvision_vit(tv_vit, x, (0, 1), 0.5, fuse=True))
        same = repshift_fx.compress(tv_vit, x, keep=1.0, at=(0, 1), score="attention", compile=False)
        assert_close(same(x), tv_vit(x))


@pytest.mark.parametrize("score,site", [("shift", "mlp"), ("shift", "block"), ("norm", "mlp"), ("attention", "mlp")])
def test_fuse_matches_reference(deit, image, score, site):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(0, 2), score=score, site=site, fuse=True, compile=False)
    assert gm.report.tokens == [17, 10, 10, 7]  # 1 + 8 kept + 1 fused; then 1 + ceil(9 / 2) + 1
    with torch.no_grad():
        assert_close(gm(image), reference_forward(deit, image, (0, 2), 0.5, site=site, score=score, fuse=True))


@pytest.mark.parametrize("site", ["attn", "block"])
def test_consecutive_drops_score_against_the_kept_tokens(deit, image, site):
    for fuse in (False, True):
        gm = repshift_fx.compress(deit, image, keep=0.7, at=(0, 1, 2), site=site, fuse=fuse, compile=False)
        with torch.no_grad():
            assert_close(gm(image), reference_forward(deit, image, (0, 1, 2), 0.7, site=site, fuse=fuse))


def test_fuse_two_prefix_tokens(distilled, image):
    gm = repshift_fx.compress(distilled, image, keep=(0.7, 0.5), at=(0, 1), fuse=True, compile=False)
    assert gm.report.tokens == [18, 15, 10, 10]
    with torch.no_grad():
        assert_close(gm(image), reference_forward(distilled, image, (0, 1), (0.7, 0.5), fuse=True))


@pytest.mark.parametrize("options", [{"score": "attention"}, {"fuse": True}, {"score": "attention", "fuse": True},
                                     {"score": "random", "fuse": True}])
def test_keep_one_gives_the_original_outputs(image, options):
    for fused in (True, False):
        model = tiny_timm("deit_tiny_patch16_224", fused=fused)
        before = snapshot(model)
        gm = repshift_fx.compress(model, image, keep=1.0, at=(0, 1, 2), compile=False, **options)
        assert gm.report.tokens == [17] * 4  # nothing dropped: no fused token either
        with torch.no_grad():
            assert_close(gm(image), model(image))
        assert_unchanged(model, before)
        assert model.blocks[0].attn.fused_attn is fused


def test_model_left_unchanged(tv_vit):
    before = snapshot(tv_vit)
    x = torch.randn(2, 3, 32, 32)
    gm = repshift_fx.compress(tv_vit, x, keep=0.5, at=(0,), score="attention", fuse=True, compile=False)
    with torch.no_grad():
        gm(x)
    assert_unchanged(tv_vit, before)


def test_fused_token_sits_after_the_kept_ones_and_is_scored_later(deit, image):
    gm = repshift_fx.compress(deit, image, keep=0.5, at=(0, 1), score="norm", fuse=True, compile=False)
    values = node_values(gm, image)
    block_out, index, kept = values["add_2"], values["repshift_index_0"], values["repshift_keep_0"]
    assert kept.shape == (2, 1 + 8 + 1, 192)
    assert (index[:, 0] == 0).all() and (index[:, 1:].diff(dim=1) > 0).all()
    for b in range(2):
        assert torch.equal(kept[b, :9], block_out[b, index[b]])
    assert values["repshift_score_1"].shape == (2, 10)  # the fused token is scored at the next drop
    assert values["repshift_keep_1"].shape == (2, 1 + 5 + 1, 192)


def test_fuse_dropped_weights():
    tokens = torch.arange(12.0).reshape(1, 4, 3)
    scores = torch.tensor([[0.0, 5.0, 1.0, 1.0]])
    fused = shift.fuse_dropped(tokens, scores, torch.tensor([[0, 1]]))
    assert fused.shape == (1, 3, 3)
    assert torch.allclose(fused[0, 2], (tokens[0, 2] + tokens[0, 3]) / 2)  # equal scores: the plain mean
    assert torch.equal(shift.fuse_dropped(tokens, scores, torch.tensor([[0, 1, 2, 3]])), tokens)


def test_report_shows_explicit_attention_only_in_scoring_blocks(deit, image):
    report = repshift_fx.inspect(deit, image, keep=0.5, at=(1,), score="attention")
    assert [row.attention for row in report.blocks] == ["SDPA", IMPL, "SDPA", "SDPA"]
    assert IMPL in report.table()
    shift_report = repshift_fx.inspect(deit, image, keep=0.5, at=(1,))
    assert report.gflops_after == pytest.approx(shift_report.gflops_after, rel=1e-6)  # same FLOPs as counted


def test_attention_score_needs_an_attention_block(image):
    class MLPOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(12, 16)
            self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16))
                                            for _ in range(3))

        def forward(self, x):
            x = self.embed(x)
            for mlp in self.mlps:
                x = x + mlp(x)
            return x.mean(1)

    with pytest.raises(UnsupportedSiteError, match="needs an attention sub-layer in block 0"):
        repshift_fx.compress(MLPOnly().eval(), torch.randn(2, 10, 12), keep=0.5, at=(0,), score="attention",
                             compile=False)


def test_target_flops_with_fuse_counts_the_fused_token(deit, caplog):
    x = torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger="repshift_fx"):
        report = repshift_fx.inspect(deit, x, target_flops=0.8, at=(0, 2), fuse=True)
    assert "cost model off" not in caplog.text
    assert report.budget["reached"] <= 0.8 and report.flop_ratio == pytest.approx(report.budget["reached"], rel=1e-6)


def test_compiled_matches_eager_for_attention_and_fuse(deit):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 64, 64)
    eager = repshift_fx.compress(deit, x, keep=0.5, at=(1,), score="attention", fuse=True, compile=False)
    compiled = repshift_fx.compress(deit, x, keep=0.5, at=(1,), score="attention", fuse=True)
    with torch.no_grad():
        for batch in (2, 5):
            y = torch.randn(batch, 3, 64, 64)
            assert_close(compiled(y), eager(y), 1e-4)


def test_dynamo_backend_attention_score_on_functional_multihead_attention(tv_vit):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 32, 32)
    backend = repshift_fx.backend(keep=0.5, at=(0, 1), score="attention", inner="eager")
    with torch.no_grad():
        assert_close(torch.compile(tv_vit, backend=backend)(x), reference_torchvision_vit(tv_vit, x, (0, 1), 0.5))
    assert [row.attention for row in backend.reports[0].blocks][:2] == [IMPL, IMPL]


def test_bench_comparison_has_every_score_at_equal_flops(deit, tmp_path):
    from repshift_fx.apps.bench import run_comparison, score_ratio

    x = torch.randn(2, 3, 64, 64)
    rows = run_comparison(deit, x, rounds=2, threads=None, progress=False, keep=0.5, at=(1,),
                          compile_options={"backend": "eager"}, explicit_model=tiny_timm("deit_tiny_patch16_224", fused=False))
    names = [r.variant for r in rows]
    assert names == [f"{n} {k}" for n in ("baseline", "shift", "attention", "random", "attention (all explicit)")
                     for k in ("eager", "compiled")]
    assert len({round(r.gflops, 9) for r in rows[2:]}) == 1 and rows[2].gflops < rows[0].gflops
    assert score_ratio(rows, "shift", "attention") > 0 and all(r.ms_min <= r.ms_per_batch for r in rows)
    load_tool("bench").plot_speedups(rows, tmp_path / "speed.png", "test")
    assert (tmp_path / "speed.png").stat().st_size > 10_000


def test_bench_speedups_are_to_the_baseline_of_the_same_kind(deit):
    from repshift_fx.apps.bench import bench_rows

    x = torch.randn(2, 3, 64, 64)
    times = {"baseline eager": [0.4, 0.4, 0.5], "baseline compiled": [0.2, 0.3, 0.2],
             "shift eager": [0.3, 0.3, 0.3], "shift compiled": [0.1, 0.1, 0.2]}
    rows = {r.variant: r for r in bench_rows(deit, (x,), times, {"shift eager": 0.5, "shift compiled": 0.5})}
    base_gflops = rows["baseline eager"].gflops
    assert rows["baseline compiled"].speedup == 1.0 and rows["baseline compiled"].speedup_to_eager == pytest.approx(2.0)
    assert rows["shift compiled"].speedup == pytest.approx(2.0) and rows["shift compiled"].speedup_to_eager == pytest.approx(4.0)
    assert rows["shift eager"].speedup == pytest.approx(4 / 3)
    assert rows["shift compiled"].speedup_per_flop_gain == pytest.approx(2.0 * 0.5 / base_gflops)
    assert rows["shift compiled"].ms_min == pytest.approx(100.0)
