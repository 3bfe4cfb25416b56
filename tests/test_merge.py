"""reduce="merge", score="tome" and restore, against the plain eager oracle (tests/reference_merge.py)."""
import pytest
import torch

import repshift_fx
from conftest import (PerToken, assert_close, assert_compiled_matches_eager, assert_refused, assert_unchanged,
                      flat_halves, snapshot, tiny_timm)
from reference_merge import merge_forward
from repshift_fx import ConfigError, UnsupportedSiteError


@pytest.fixture(scope="module")
def distilled():
    return tiny_timm("deit_tiny_distilled_patch16_224")


@pytest.mark.parametrize("metric", ("keys", "stream", "ward"))
def test_shift_merge_matches_the_reference(deit, image, metric):
    before = snapshot(deit)
    gm = repshift_fx.compress(deit, image, keep=0.6, at=(1, 2), reduce="merge", merge_metric=metric, compile=False)
    assert_close(gm(image), merge_forward(deit, image, at=(1, 2), keep=0.6, metric=metric))
    assert gm.report.tokens == [17, 17, 11, 7]
    assert_unchanged(deit, before)


@pytest.mark.parametrize("name", ("deit", "distilled"))
def test_tome_matches_the_reference(name, deit, distilled, image):
    model = {"deit": deit, "distilled": distilled}[name]
    gm = repshift_fx.compress(model, image, score="tome", r=2, compile=False)
    assert_close(gm(image), merge_forward(model, image, tome_r=2))
    prefix = model.num_prefix_tokens
    assert gm.report.tokens == [prefix + 16 - 2 * i for i in range(4)]


@pytest.mark.parametrize("metric", ("stream", "ward"))
@pytest.mark.parametrize("guidance", (0.0, 0.5))
def test_tome_on_the_stream_matches_the_reference(deit, image, metric, guidance):
    gm = repshift_fx.compress(deit, image, score="tome", r=2, merge_metric=metric, shift_guidance=guidance,
                              compile=False)
    on_stream = gm(image)
    assert_close(on_stream, merge_forward(deit, image, tome_r=2, metric=metric, guidance=guidance))
    other = "ward" if metric == "stream" else "stream"  # each metric merges other pairs than the rest
    for different in (merge_forward(deit, image, tome_r=2, guidance=guidance),
                      merge_forward(deit, image, tome_r=2, metric=other, guidance=guidance)):
        assert not torch.allclose(on_stream, different, atol=1e-4)


@pytest.mark.parametrize("metric", ("stream", "ward"))
def test_tome_on_the_stream_merging_nothing_is_the_model(deit, image, metric):
    before = snapshot(deit)
    gm = repshift_fx.compress(deit, image, score="tome", r=0, merge_metric=metric, compile=False)
    with torch.inference_mode():
        assert_close(gm(image), deit(image))
    assert_unchanged(deit, before)


@pytest.mark.parametrize("options", ({"merge_metric": "stream"}, {"merge_metric": "ward", "shift_guidance": 0.5}))
def test_tome_on_the_stream_compiles_to_what_it_computes_eagerly(deit, image, options):
    assert_compiled_matches_eager(deit, image.shape[1:], (2, 3), score="tome", r=2, **options)


@pytest.mark.parametrize("name", ("deit", "distilled"))
def test_shift_guided_tome_matches_the_reference(name, deit, distilled, image):
    model = {"deit": deit, "distilled": distilled}[name]
    before = snapshot(model)
    gm = repshift_fx.compress(model, image, score="tome", r=2, shift_guidance=0.5, compile=False)
    guided = gm(image)
    assert_close(guided, merge_forward(model, image, tome_r=2, guidance=0.5))
    assert not torch.allclose(guided, merge_forward(model, image, tome_r=2), atol=1e-4)  # the shift changed merges
    assert_unchanged(model, before)


@pytest.mark.parametrize("target", (0.8, 0.75))
def test_tome_at_a_flop_budget_takes_the_fewest_merges_within_it(deit, image, target):
    report = repshift_fx.inspect(deit, image, score="tome", target_flops=target)
    r = report.budget["r"]
    assert report.flop_ratio <= target and report.budget["reached"] == pytest.approx(report.flop_ratio)
    assert repshift_fx.inspect(deit, image, score="tome", r=r).flop_ratio == pytest.approx(report.flop_ratio)
    if isinstance(r, int):
        fewer = r - 1
    else:  # r + 1 in the first blocks, r after; one token fewer in the last block with r + 1 goes over
        assert list(r) == sorted(r, reverse=True) and max(r) - min(r) == 1
        fewer = list(r)
        fewer[max(i for i, v in enumerate(r) if v == max(r))] -= 1
        fewer = tuple(fewer)
    assert repshift_fx.inspect(deit, image, score="tome", r=fewer).flop_ratio > target
    assert f"ToMe r={r}" in str(report)


def test_tome_past_its_largest_r_merges_one_more_in_the_first_blocks(deit, image):
    # 16 patch tokens in 4 blocks: r=3 in every block is the most bipartite matching allows, and (4, 4, 3, 3)
    # leaves the last block 5 tokens for 3 merges
    assert_refused(deit, image, ConfigError, score="tome", r=4)
    assert_refused(deit, image, ConfigError, score="tome", r=(4, 4, 3, 3))
    largest = repshift_fx.inspect(deit, image, score="tome", r=3).flop_ratio
    past = repshift_fx.inspect(deit, image, score="tome", r=(4, 3, 3, 3)).flop_ratio
    report = repshift_fx.inspect(deit, image, score="tome", target_flops=(largest + past) / 2)
    assert report.budget["r"] == (4, 3, 3, 3) and report.flop_ratio == pytest.approx(past)
    gm = repshift_fx.compress(deit, image, score="tome", target_flops=(largest + past) / 2, compile=False)
    assert_close(gm(image), merge_forward(deit, image, tome_r=(4, 3, 3, 3)))
    with pytest.raises(ConfigError, match=rf"ToMe with r=\(4, 3, 3, 3\) gives a FLOP ratio of {past:.3f}"):
        repshift_fx.inspect(deit, image, score="tome", target_flops=past - 0.01)



def test_tome_budget_search_rewrites_only_schedules_the_planner_takes(deit, image, monkeypatch):
    # the search bisects over r and over the blocks that take r + 1; r=4 and (4, 4, 3, 3) are refused by the
    # planner (too few tokens), which says so without a rewrite
    import repshift_fx.pipeline as pipeline

    rewritten, rewrite = [], pipeline.rewrite
    monkeypatch.setattr(pipeline, "rewrite", lambda m, x, config: rewritten.append(config.r) or rewrite(m, x, config))
    largest = repshift_fx.inspect(deit, image, score="tome", r=3).flop_ratio
    past = repshift_fx.inspect(deit, image, score="tome", r=(4, 3, 3, 3)).flop_ratio
    rewritten.clear()
    report = repshift_fx.inspect(deit, image, score="tome", target_flops=(largest + past) / 2)
    assert report.budget["r"] == (4, 3, 3, 3) and (4, 3, 3, 3) in rewritten
    assert 4 not in rewritten and (4, 4, 3, 3) not in rewritten and 3 in rewritten
    assert len(rewritten) == len(set(rewritten))  # the schedule chosen is not rewritten again

def test_attention_score_merges_by_the_keys_of_its_explicit_attention(deit, image):
    gm = repshift_fx.compress(deit, image, keep=0.6, at=(1, 2), score="attention", reduce="merge", compile=False)
    assert gm(image).shape == (2, 1000) and gm.report.tokens == [17, 17, 11, 7]
    assert "cosine of the keys" in str(gm.report) and "no attention keys" not in str(gm.report)


def test_merging_nothing_is_the_original(deit, image):
    with torch.no_grad():
        original = deit(image)
    for config in (dict(keep=1.0, at=(1, 2), reduce="merge"), dict(score="tome", r=0)):
        assert_close(repshift_fx.compress(deit, image, compile=False, **config)(image), original)


@pytest.mark.parametrize("config", [dict(score="tome", r=1), dict(score="tome", r=1, merge_metric="stream"),
                                    dict(score="tome", r=1, merge_metric="ward"),
                                    dict(score="tome", r=1, size_attention="qk")])
@pytest.mark.parametrize("pooling", [{}, dict(global_pool="avg"), dict(global_pool="avg", class_token=False)],
                         ids=["cls", "mean after the cls", "mean"])
def test_merging_copies_of_a_token_computes_what_the_model_computes(config, pooling):
    """An oracle that shares nothing with the pass: without position embeddings, patch tokens of
    identical patches stay identical, so merging copies, size-weighted, under proportional
    attention must leave the output as it is (attention over a token of size s is attention
    over s copies), and so must a mean pooling that counts a merged token s times."""
    model = tiny_timm("deit_tiny_patch16_224", **pooling)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = flat_halves(2, 64)
    merged = repshift_fx.compress(model, x, compile=False, **config)
    assert merged.report.tokens[-1] < merged.report.tokens[0]
    with torch.no_grad():
        assert_close(merged(x), model(x))


def test_both_forms_of_proportional_attention_agree(deit, image):
    masked = repshift_fx.compress(deit, image, keep=0.6, at=(0, 2), reduce="merge", compile=False)
    columns = repshift_fx.compress(deit, image, keep=0.6, at=(0, 2), reduce="merge", size_attention="qk",
                                   compile=False)
    assert_close(columns(image), masked(image))
    assert "SDPA + log(size)" in str(masked.report)


@pytest.mark.parametrize("reduce", ("drop", "merge"))
def test_restore_puts_every_token_back(deit, image, reduce):
    model = PerToken(deit).eval()
    gm = repshift_fx.compress(model, image, keep=0.6, at=(1, 2), reduce=reduce, compile=False)
    out = gm(image)
    assert out.shape == (2, 17, 192)
    assert_close(out, merge_forward(deit, image, at=(1, 2), keep=0.6, reduce=reduce, per_token=True))
    assert gm.report.blocks[-1].restored and not any(row.restored for row in gm.report.blocks[:-1])
    assert gm.report.flop_ratio is None or gm.report.flop_ratio < 1


def test_restore_after_tome_unmerges(deit, image):
    model = PerToken(deit).eval()
    gm = repshift_fx.compress(model, image, score="tome", r=2, compile=False)
    assert_close(gm(image), merge_forward(deit, image, tome_r=2, per_token=True))


def test_merge_compiles_to_what_it_runs_eagerly(deit):
    assert_compiled_matches_eager(deit, (3, 64, 64), (2, 3), keep=0.6, at=(1,), reduce="merge", backend="eager")


def test_restore_false_on_a_per_token_output_says_restore_would_fix_it(deit, image):
    assert_refused(PerToken(deit).eval(), image, UnsupportedSiteError, "changes shape", "restore=True",
                   keep=0.7, at=(1,), restore=False)


@pytest.mark.parametrize("config,words", [
    (dict(reduce="fold"), "reduce must be one of"),
    (dict(score="tome", r=9), "more than half"),
    (dict(score="tome"), "pass r="),
    (dict(score="tome", r=2, reduce="merge"), "chooses its own merges"),
    (dict(score="tome", r=2, keep=0.5), "not keep="),
    (dict(score="tome", r=2, target_flops=0.5), "both set the amount"),
    (dict(score="tome", target_flops=0.05), "ToMe with r="),
    (dict(reduce="merge", fuse=True), "use one of them"),
    (dict(r=2), "needs score='tome'"),
    (dict(kepe=0.5), "did you mean 'keep'"),
    (dict(merge_metric="values"), "merge_metric must be one of"),
    (dict(merge_metric="ward"), "a drop merges nothing"),
    (dict(score="attention", merge_metric="stream", keep=0.5), "a drop merges nothing"),
])
def test_bad_merge_options_are_config_errors(deit, image, config, words):
    assert_refused(deit, image, ConfigError, words, **config)
