"""The accuracy-retention harness (repshift_fx.evaluation, repshift_fx.datasets, tools/evaluate.py):
end to end on a tiny random ViT and a few hundred Fashion-MNIST images, and its parts."""
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import repshift_fx  # noqa: F401  (before timm)
from conftest import assert_unchanged, snapshot, tiny_timm
from repshift_fx import ConfigError, evaluation
from repshift_fx.datasets import FASHION_MNIST, WORDNET, DataError, fashion_mnist, load_dataset, to_model_input
from repshift_fx.datasets import wordnet_glosses
from repshift_fx.specs import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST}: apt-get install dataset-fashion-mnist (Debian); "
           ".ci/run installs it",
)
TINY = '{"depth": 3, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}'


def _tool():
    spec = importlib.util.spec_from_file_location("evaluate_tool", ROOT / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_fashion
def test_harness_end_to_end_on_fashion_mnist(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="repshift_fx")
    tool = _tool()
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["timm:vit_tiny_patch16_224", "--kwargs", TINY, "--limit", "200", "--train-limit", "300", "--at", "0,1",
              "--cache", str(cache), "--no-progress", "--batch", "100"]
    assert tool.main(common + ["--scores", "shift,shift:block:cosine,attention,norm,random", "--keeps", "1.0,0.5",
                               "--out", str(out)]) == 0
    record = json.loads((out / "evaluate.json").read_text())
    rows = record["rows"]
    assert [r["score"] for r in rows] == ["unpruned", "shift(mlp,l2)", "shift(block,cosine)", "attention", "norm",
                                         "random"]
    base = rows[0]
    assert base["agreement"] == 1.0 and base["accuracy"] > 0.3  # ten classes: chance is 0.1
    assert all(r["gflops"] < base["gflops"] and r["flop_ratio"] < 0.8 for r in rows[1:])
    assert len({round(r["gflops"], 9) for r in rows[1:]}) == 1  # one schedule: equal FLOPs
    assert all(0 <= r["agreement"] <= 1 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (out / "evaluate.png").stat().st_size > 10_000
    assert "agreement %" in (out / "evaluate.md").read_text()
    assert len(list(cache.glob("*.pt"))) == 2  # the unpruned test and train outputs
    capsys.readouterr()

    # a second run reads the unpruned outputs from the cache and gives the same figures
    assert tool.main(common + ["--scores", "random", "--keeps", "0.5", "--out", str(tmp_path / "again")]) == 0
    assert "from the cache" in caplog.text
    again = json.loads((tmp_path / "again" / "evaluate.json").read_text())["rows"]
    assert again[0] == base and again[1] == rows[-1]


@needs_fashion
def test_model_head_with_other_classes_measures_agreement_only():
    model = tiny_timm("vit_tiny_patch16_224", depth=2, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    loaded = LoadedModel("tiny", model, (1, 3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    setup = evaluation.prepare(loaded, None, fashion_mnist("test", 40), head="model", progress=False)
    assert setup.accuracy is None and "only agreement" in setup.notes[0]
    rows = evaluation.sweep(setup, evaluation.parse_variants("shift"), keeps=(0.5,), at=(0,))
    assert rows[1].accuracy is None and 0 <= rows[1].agreement <= 1


def test_feature_model_removes_the_classifier_and_leaves_the_model_alone():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=32, mlp_dim=64).eval()
    before = snapshot(vit)
    features = evaluation.feature_model(vit, "pooled")
    with torch.no_grad():
        assert features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert_unchanged(vit, before)
    timm_model = tiny_timm("deit_tiny_patch16_224", depth=1, img_size=32)
    assert evaluation.feature_model(timm_model)(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    assert timm_model.num_classes == 1000


@pytest.mark.parametrize("kind", ["sklearn", "torch"])
def test_linear_probe_separates_separable_classes(kind):
    if kind == "sklearn":
        pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -c constraints.txt .[eval])")
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 5
    labels = torch.arange(3).repeat(40)
    features = centres[labels] + torch.randn(120, 8, generator=generator)
    probe = evaluation.LinearProbe(kind).fit(features, labels)
    assert (probe.predict(features) == labels).double().mean() > 0.95


def test_parse_variants():
    assert [v.label for v in evaluation.parse_variants("shift,shift:attn,shift:block:l1,attention,norm,random")] == [
        "shift(mlp,l2)", "shift(attn,l2)", "shift(block,l1)", "attention", "norm", "random"]
    assert len(evaluation.parse_variants("all")) == 3 * 3 + 3
    assert [v.label for v in evaluation.parse_variants("all", "lines")] == [
        "shift(l2)", "shift(l1)", "shift(cosine)", "norm", "random"]
    assert evaluation.parse_variants("shift:block:cosine")[0].kwargs == {"score": "shift", "site": "block",
                                                                        "distance": "cosine"}
    for bad in ("shift:nowhere", "attention:mlp", "entropy"):
        with pytest.raises(ConfigError):
            evaluation.parse_variants(bad)


def test_to_model_input_resizes_grey_and_colour_images():
    grey, colour = np.full((28, 28), 255, np.uint8), np.zeros((40, 30, 4), np.uint8)
    x = to_model_input([grey, colour], (3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 16, 16)
    assert torch.allclose(x[0], torch.ones(1)) and torch.allclose(x[1], -torch.ones(1))


@needs_fashion
def test_fashion_mnist_reads_the_debian_files():
    data = fashion_mnist("train", limit=50)
    assert len(data) == 50 and data.images([0])[0].shape == (28, 28) and data.images([0])[0].dtype == np.uint8
    assert data.labels.tolist()[:5] == [9, 0, 0, 3, 0] and len(data.classes) == 10
    assert len(fashion_mnist("test")) == 10_000


def test_missing_or_unknown_data_sets_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(root=tmp_path)
    with pytest.raises(DataError, match="no images"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DataError, match="fashion-mnist, skimage or folder:PATH"):
        load_dataset("imagenet")


def test_image_folder(tmp_path):
    from PIL import Image

    for name, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / "train" / name / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}", "train", limit=4)
    assert data.classes == ("cat", "dog") and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images([3])[0].shape == (10, 12, 3)


@pytest.mark.skipif(not (WORDNET / "data.noun").exists(),
                    reason=f"WordNet is not installed at {WORDNET}: apt-get install wordnet-base (Debian)")
def test_wordnet_glosses_have_41_categories():
    glosses, labels, names = wordnet_glosses(limit=100)
    assert len(glosses) == 100 and len(names) == 41 and labels.max() < 41
    assert "noun.animal" in names and "verb.motion" in names
