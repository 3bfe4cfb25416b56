"""inspect(): the report as a table and as data, the same analysis compress() acts on."""
import torch

import repshift_fx
from conftest import tiny_timm


def test_report_table_and_data(deit, image):
    report = repshift_fx.inspect(deit, image, keep=0.5, at=(1,))
    text = str(report)
    for column in ("block", "module", "attention", "tokens in", "tokens out"):
        assert column in text
    assert "prefix tokens kept: 1" in text and "GFLOPs per sample" in text
    data = report.to_dict()
    assert [b["tokens_in"] for b in data["blocks"]] == [17, 17, 9, 9]
    assert data["config"]["at"] == (1,)
    assert 0 < data["flop_ratio"] < 1


def test_inspect_and_compress_agree(deit, image):
    report = repshift_fx.inspect(deit, image, keep=0.6, at=(0, 2))
    gm = repshift_fx.compress(deit, image, keep=0.6, at=(0, 2), compile=False)
    assert report.tokens == gm.report.tokens == [17, 11, 11, 7]  # ceil(0.6 * 16) = 10, ceil(0.6 * 10) = 6


def test_explicit_attention_reported_as_rewritten():
    model = tiny_timm("deit_tiny_patch16_224", fused=False)
    report = repshift_fx.inspect(model, torch.randn(1, 3, 64, 64), at=(1,))
    assert all(row.attention == "explicit -> SDPA" for row in report.blocks)
