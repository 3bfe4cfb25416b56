"""calibrate(..., labels=...): the objective is the task's (expected) accuracy, measured as an
independent eager run measures it; within one standard error of the most accurate candidate,
fidelity decides; bad labels and targets are refused."""
import pytest
import torch

import repshift_fx
from repshift_fx import ConfigError, ExampleInputError
from repshift_fx.calibration.choice import GUARD, paired_interval
from conftest import assert_unchanged, random_batches, snapshot, tiny_timm

SPACE = {"reduce": ["drop", "merge"], "score": ["shift", "tome"], "at": "auto"}
PAPER = {"score": "shift", "target_flops": 0.7}  # the paper's rule (shift, drop, default schedule) at the target


@pytest.fixture(scope="module")
def batches():
    return random_batches(3, 16, seed=2)


def predictions(module, batches) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [module(b).argmax(-1) for b in batches]


@pytest.fixture(scope="module")
def drop_labels(vit, batches):
    """Labels the paper's drop gets all right: the task rewards exactly what that reduction sees."""
    return predictions(repshift_fx.compress(vit, batches[0], compile=False, **PAPER), batches)


def calibrate(vit, batches, **kwargs):
    return repshift_fx.calibrate(vit, batches, target_flops=0.7, space=SPACE, max_candidates=8, screen=16,
                                 refine=3, progress=False, **kwargs)


def test_labels_aim_the_search_at_the_task(vit, batches, drop_labels):
    before = snapshot(vit)
    cal = calibrate(vit, batches, labels=drop_labels)
    assert_unchanged(vit, before)
    full = [c for c in cal.table if c.error is None and c.samples == 48]
    best = max(full, key=lambda c: c.expected)
    assert cal.paper.accuracy == 1.0 and best.expected >= cal.paper.expected
    # the choice is within one standard error of the most accurate, and the most faithful of those
    assert paired_interval(cal.chosen.p_true, best.p_true, GUARD)[2] >= 0
    tied = [c for c in full if paired_interval(c.p_true, best.p_true, GUARD)[2] >= 0]
    assert cal.chosen.value == max(c.value for c in tied)
    most_faithful = max((c for c in cal.table if c.error is None), key=lambda c: c.fidelity())
    assert most_faithful.samples == 48  # measured on every labelled sample, so the choice can fall on it
    assert "accuracy" in cal.format_table() and "labelled" in cal.summary()


def test_with_labels_every_candidate_is_measured_on_every_labelled_sample(vit, drop_labels):
    """screen="auto": the search is led by accuracy on all the labels, not on a screen of them
    (64 labels resolve nothing finer than about 12 points)."""
    many = random_batches(6, 16, seed=2)  # 96 samples, more than a screen of 64
    labels = drop_labels + drop_labels  # any labels: the samples measured are what matters
    cal = repshift_fx.calibrate(vit, many, target_flops=0.7, space=SPACE, max_candidates=4, refine=1,
                                labels=labels, progress=False)
    assert {c.samples for c in cal.table if c.error is None} == {96}
    cal = repshift_fx.calibrate(vit, many, target_flops=0.7, space=SPACE, max_candidates=4, refine=1, progress=False)
    assert min(c.samples for c in cal.table if c.error is None) < 96  # without labels: screened on 64


@pytest.mark.parametrize("screen", [0, -3, 1.5, "all", True])
def test_a_screen_that_is_not_a_sample_count_is_refused(vit, batches, screen):
    with pytest.raises(ConfigError, match="screen must be a whole number"):
        repshift_fx.calibrate(vit, batches, target_flops=0.7, screen=screen, progress=False)


def test_the_head_accuracy_is_what_an_eager_run_measures(vit, batches, drop_labels):
    cal = calibrate(vit, batches, labels=torch.cat(drop_labels))  # one tensor over every sample
    gm = repshift_fx.compress(vit, batches[0], compile=False, **cal.config)
    with torch.inference_mode():
        logits = torch.cat([gm(b) for b in batches]).double()
    labels = torch.cat(drop_labels)
    assert cal.chosen.accuracy == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    expected = logits.softmax(-1)[torch.arange(len(labels)), labels]  # the head's probability of each label
    assert cal.chosen.p_true == pytest.approx(expected.tolist(), abs=1e-5)
    assert cal.chosen.expected == pytest.approx(expected.mean().item(), abs=1e-6)


def test_without_a_head_a_probe_fitted_on_the_unpruned_outputs_scores_accuracy(batches):
    features = tiny_timm("deit_tiny_patch16_224", depth=4, img_size=64, num_classes=0)
    labels = [(b.mean((1, 2, 3)) > 0).long() for b in batches]  # a task the features can learn
    cal = calibrate(features, batches, labels=labels)
    unpruned = [c for c in cal.table if c.error is None and c.flops == 1.0]
    assert cal.objective == "cosine similarity" and cal.chosen.accuracy is not None
    assert all(0 <= c.accuracy <= 1 for c in cal.table if c.error is None and c.accuracy is not None)
    assert not unpruned  # every candidate is reduced
    assert any("linear probe" in note for note in cal.notes)


@pytest.mark.parametrize("labels, words", [
    (lambda b: [torch.zeros(16, dtype=torch.long)] * 2, "one tensor of class indices per batch"),
    (lambda b: [torch.zeros(15, dtype=torch.long)] * 3, "holds 16 samples"),
    (lambda b: [torch.zeros(16)] * 3, "integer class indices"),
    (lambda b: [torch.full((16,), -1)] * 3, "negative"),
    (lambda b: [torch.full((16,), 12)] * 3, "head has 10 classes"),
    (lambda b: "cats", "one tensor of class indices per batch"),
])
def test_labels_that_do_not_match_the_batches_are_refused(vit, batches, labels, words):
    with pytest.raises(ConfigError, match=words):
        calibrate(vit, batches, labels=labels(batches))


def test_an_unreachable_target_names_the_lowest_reachable_one(vit, batches):
    with pytest.raises(ConfigError, match=r"calibrate\(\): target_flops=0.01 is below .* at least 0\.\d+"):
        repshift_fx.calibrate(vit, batches, target_flops=0.01, progress=False, max_candidates=4)


def test_batches_the_model_cannot_take_are_an_example_input_error(vit):
    with pytest.raises(ExampleInputError, match=r"batch 0 \(\(2, 3, 64, 64\) torch.int64\) does not fit"):
        repshift_fx.calibrate(vit, [torch.ones(2, 3, 64, 64, dtype=torch.long)], target_flops=0.7, progress=False)



def test_batches_of_input_label_pairs_say_to_pass_the_labels_apart(vit, batches):
    pairs = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches[:1]]  # as a DataLoader of a dataset yields
    with pytest.raises(ExampleInputError, match=r"\(inputs, labels\) pairs.*labels= "):
        repshift_fx.calibrate(vit, pairs, target_flops=0.7, progress=False)


@pytest.mark.parametrize("objective, words", [(lambda out, ref: None, "returned None"),
                                              (lambda out, ref: float("nan"), "returned nan"),
                                              (lambda out: 1.0, "raised TypeError")])
def test_an_objective_that_gives_no_number_is_refused(vit, batches, objective, words):
    with pytest.raises(ConfigError, match=words):
        repshift_fx.calibrate(vit, batches[:1], target_flops=0.7, objective=objective, progress=False,
                              max_candidates=2)


@pytest.mark.parametrize("given", [None, 3])
def test_no_batches_is_an_example_input_error(vit, given):
    with pytest.raises(ExampleInputError, match="calibrate\\(\\) needs batches"):
        repshift_fx.calibrate(vit, given, target_flops=0.7, progress=False)
