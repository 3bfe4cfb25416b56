"""Task-aware calibration: the objective is accuracy on a few hundred labelled samples.

    task = Task.fit(kind, reference, labels)     # the model's head, or probes fitted in torch
    correct, p_true = task.scores(outputs, i)    # (B,) bool and (B,) float64 for batch i

With a classifier head ("logits") the prediction is the head's argmax. Without one, a linear
softmax probe (standardised features, L2, L-BFGS) is fitted on the unpruned model's outputs and
applied to the reduced model's: cross-fitted over FOLDS folds, so that no sample is scored by a
probe that saw it. Its L2 weight is chosen from DECAYS by the held-out log-likelihood of the
unpruned outputs (as scikit-learn's LogisticRegressionCV does): a few hundred samples in a few
hundred dimensions overfit a weakly regularised probe, whose probabilities are then too sharp to
rank reductions by (on the real ViT, 256 images: held-out log-likelihood -3.19 at 1e-3, worse than
chance, -2.14 at 0.1; docs/results/label_selection.md). Per-token outputs (B, N, C) are
mean-pooled over the tokens first.
`p_true` is the softmax probability of each sample's true class, the expected accuracy: a
reduction that moves a sample towards or away from its class changes it even where the argmax
does not flip, so differences between candidates are resolved on fewer labels than by the 0/1
count (tools/label_selection.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from repshift_fx.errors import ConfigError

FOLDS = 5
DECAYS = tuple(10.0 ** (e / 2) for e in range(-6, 1))  # 1e-3 to 1, half a decade apart


def label_list(labels, sizes: list[int]) -> list[torch.Tensor]:
    """The labels as one int64 tensor per batch: a list aligned with the batches, or one tensor
    over every sample in order. Anything else is a ConfigError that says what was expected."""
    total = sum(sizes)
    if isinstance(labels, torch.Tensor):
        labels = [labels] if len(sizes) == 1 else list(labels.split(sizes)) if labels.dim() == 1 and \
            labels.shape[0] == total else None
    elif isinstance(labels, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in labels):
        labels = list(labels)
    else:
        labels = None
    if labels is None or len(labels) != len(sizes):
        raise ConfigError(f"labels must be one tensor of class indices per batch ({len(sizes)} batches), or one "
                          f"tensor of {total} class indices over every sample in order")
    for i, (batch_labels, size) in enumerate(zip(labels, sizes)):
        if batch_labels.dtype.is_floating_point or batch_labels.dtype == torch.bool or batch_labels.is_complex():
            raise ConfigError(f"labels of batch {i} are {batch_labels.dtype}; give integer class indices")
        if tuple(batch_labels.shape) != (size,):
            raise ConfigError(f"labels of batch {i} have shape {tuple(batch_labels.shape)}, but the batch holds "
                              f"{size} samples: give one class index per sample, shape ({size},)")
        if (batch_labels < 0).any():
            raise ConfigError(f"labels of batch {i} hold negative values; give class indices 0, 1, ...")
    return [t.long() for t in labels]


def pooled(outputs: torch.Tensor) -> torch.Tensor:
    """(B, C) features as they are; (B, N, C) tokens mean-pooled; other ranks flattened."""
    return outputs.mean(1) if outputs.dim() == 3 else outputs.flatten(1)


class LinearProbe:
    """Softmax regression on standardised features, fitted with L-BFGS (L2 `decay`)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, classes: int, decay: float = 1e-3):
        features = features.double()
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - self.mean) / self.std
        self.weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
        self.bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([self.weight, self.bias], max_iter=300, line_search_fn="strong_wolfe")

        def loss():
            optimizer.zero_grad()
            value = F.cross_entropy(x @ self.weight + self.bias, labels) + decay * self.weight.square().sum()
            value.backward()
            return value

        with torch.enable_grad():
            optimizer.step(loss)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ((features.double() - self.mean) / self.std) @ self.weight + self.bias


class Task:
    """Predictions of a reduced model's outputs, to compare with the labels."""

    def __init__(self, labels: list[torch.Tensor], probes: list[LinearProbe] | None = None,
                 decay: float | None = None, held_out_accuracy: float | None = None):
        self.labels, self.probes, self.decay = labels, probes, decay
        self.held_out_accuracy = held_out_accuracy  # the probes on the unpruned outputs, cross-fitted
        self.fold = [torch.arange(n) + sum(len(t) for t in labels[:i]) for i, n in enumerate(map(len, labels))]

    @classmethod
    def fit(cls, kind: str, reference: list[torch.Tensor], labels: list[torch.Tensor]) -> "Task":
        if kind == "logits":
            logits, highest = reference[0].shape[-1], int(torch.cat(labels).max())
            if highest >= logits:
                raise ConfigError(f"labels go up to class {highest}, but the model's head has {logits} classes: "
                                  "give the head's class indices")
            return cls(labels)
        present, targets = torch.unique(torch.cat(labels), return_inverse=True)  # class ids 0..k-1, however sparse
        if len(present) < 2:
            raise ConfigError(f"the labels hold one class ({present.tolist()[0]}): accuracy cannot tell candidates "
                              "apart; give labels of the task's classes")
        labels = list(targets.split([len(t) for t in labels]))
        classes = len(present)
        features = torch.cat([pooled(r) for r in reference])
        if len(targets) < 2 * FOLDS:
            raise ConfigError(f"labels for {len(targets)} samples are too few to fit a probe; give a few hundred")
        folds = torch.arange(len(targets)) % FOLDS
        fitted = {decay: [LinearProbe(features[folds != k], targets[folds != k], classes, decay) for k in range(FOLDS)]
                  for decay in DECAYS}
        held_out = {decay: cross_fitted_logits(probes, features, folds) for decay, probes in fitted.items()}
        decay = max(DECAYS, key=lambda d: log_likelihood(held_out[d], targets))
        accuracy = (held_out[decay].argmax(-1) == targets).double().mean().item()
        return cls(labels, fitted[decay], decay, accuracy)

    def notes(self) -> list[str]:
        """What the probe can read from the unpruned outputs; a warning where it reads no more than
        the commonest class (the labels then cannot aim the choice)."""
        if self.probes is None:
            return []
        targets = torch.cat(self.labels)
        accuracy, commonest = self.held_out_accuracy, targets.bincount().max().item() / len(targets)
        note = (f"no classifier head: a linear probe fitted on the unpruned outputs of the {len(targets)} labelled "
                f"samples (L2 weight {self.decay:.3g}, chosen by held-out likelihood) gets {100 * accuracy:.1f}% of "
                f"them right unpruned, held out (the commonest class: {100 * commonest:.1f}%)")
        if accuracy <= commonest:
            note += ("; the outputs barely predict these labels, so accuracy cannot aim the choice: give more labels, "
                     "or a model with its classifier head")
        return [note]

    def scores(self, outputs: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((B,) bool, (B,) float64): which samples of batch `batch` the reduced model's `outputs` get
        right, and the probability they give each sample's true class."""
        labels = self.labels[batch]
        logits = outputs.double() if self.probes is None else self._probe_logits(outputs, batch)
        return logits.argmax(-1) == labels, logits.softmax(-1).gather(-1, labels[:, None])[:, 0]

    def _probe_logits(self, outputs: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, classes): each sample scored by the probe whose fold left it out."""
        return cross_fitted_logits(self.probes, pooled(outputs), self.fold[batch] % FOLDS)


def cross_fitted_logits(probes: list[LinearProbe], features: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
    """(B, classes): sample i scored by probes[folds[i]], the probe fitted without it."""
    logits = torch.empty(len(folds), probes[0].bias.shape[0], dtype=torch.float64)
    for k, probe in enumerate(probes):
        if (folds == k).any():
            logits[folds == k] = probe.logits(features[folds == k])
    return logits


def log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean log-probability the (samples, classes) logits give each sample's true class."""
    return logits.log_softmax(-1).gather(-1, targets[:, None]).mean().item()
