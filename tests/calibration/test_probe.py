"""The probe calibrate(labels=) fits when the model has no head: cross-fitted, with the L2 weight
whose held-out probabilities give the labels the highest likelihood, checked against
scikit-learn's logistic regression on the same folds."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from repshift_fx.calibration.labels import DECAYS, FOLDS, Task
from repshift_fx.errors import ConfigError


def sklearn_held_out_log_likelihood(x: np.ndarray, y: np.ndarray, decay: float) -> float:
    """Mean log-probability of the true class, each sample scored by a fit without its fold; the
    same objective as LinearProbe (mean cross-entropy + decay * |w|^2 is C = 1 / (2 decay n))."""
    folds, total = np.arange(len(y)) % FOLDS, 0.0
    for k in range(FOLDS):
        train = folds != k
        scaler = StandardScaler().fit(x[train])
        fit = LogisticRegression(C=1 / (2 * decay * train.sum()), max_iter=10_000, tol=1e-8)
        fit.fit(scaler.transform(x[train]), y[train])
        log_p = fit.predict_log_proba(scaler.transform(x[~train]))
        total += log_p[np.arange(len(log_p)), y[~train]].sum()
    return total / len(y)


def linear_task(samples: int, dims: int, classes: int, noise: float, seed: int):
    generator = np.random.default_rng(seed)
    x = generator.normal(size=(samples, dims))
    y = (x @ generator.normal(size=(dims, classes)) + noise * generator.normal(size=(samples, classes))).argmax(1)
    return x, y


def fit(x: np.ndarray, y: np.ndarray, batch: int = 50) -> Task:
    features, labels = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    return Task.fit("features", list(features.split(batch)), list(labels.split(batch)))


@pytest.mark.parametrize("noise", [0.5, 3.0])
def test_the_probe_takes_the_l2_weight_that_predicts_held_out_labels_best(noise):
    x, y = linear_task(200, 48, 4, noise, seed=0)
    curve = {decay: sklearn_held_out_log_likelihood(x, y, decay) for decay in DECAYS}
    assert max(curve.values()) - min(curve.values()) > 0.05  # the weight matters on this task
    assert curve[fit(x, y).decay] >= max(curve.values()) - 0.02


def test_labels_the_features_cannot_predict_get_the_strongest_weight():
    x, _ = linear_task(200, 48, 4, 0.0, seed=1)
    y = np.random.default_rng(2).integers(0, 4, size=200)
    assert fit(x, y).decay == max(DECAYS)


def test_each_sample_is_scored_by_the_probe_that_left_it_out():
    x, y = linear_task(200, 48, 4, 0.5, seed=0)
    task = fit(x, y)
    features = torch.tensor(x, dtype=torch.float32).split(50)
    p_true = torch.cat([task.scores(f, i)[1] for i, f in enumerate(features)])
    held_out = sklearn_held_out_log_likelihood(x, y, task.decay)
    assert p_true.log().mean().item() == pytest.approx(held_out, abs=0.02)


def test_the_note_says_what_the_probe_reads_and_warns_where_it_reads_nothing():
    x, y = linear_task(200, 48, 4, 0.5, seed=0)
    (note,) = fit(x, y).notes()
    assert "linear probe" in note and "barely predict" not in note
    (note,) = fit(x, np.random.default_rng(2).integers(0, 4, size=200)).notes()
    assert "barely predict" in note


def test_sparse_class_ids_fit_the_probe_of_the_classes_present():
    """Class ids 7 and 2000 are two classes: the probe has two outputs, and scores as for ids 0 and 1."""
    x, y = linear_task(120, 8, 2, 0.5, seed=3)
    dense, sparse = fit(x, y), fit(x, np.where(y == 1, 2000, 7))
    assert sparse.probes[0].bias.shape == (2,) and sparse.decay == dense.decay
    outputs = torch.tensor(x[:50], dtype=torch.float32)
    for got, want in zip(sparse.scores(outputs, 0), dense.scores(outputs, 0)):
        assert torch.equal(got, want)


def test_labels_of_one_class_are_refused():
    x, _ = linear_task(60, 8, 2, 0.5, seed=3)
    with pytest.raises(ConfigError, match=r"one class \(4\)"):
        fit(x, np.full(60, 4))
