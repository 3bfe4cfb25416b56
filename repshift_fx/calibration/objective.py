"""What calibration maximises, without labels: how closely the reduced model follows the original.

    kind = output_kind(model, batch, reference)        # "logits" or "features"
    value = OBJECTIVES[kind](outputs, reference)       # mean over the batch, higher is better

- logits (a classifier's (B, K) scores): top-1 agreement, the share of samples whose predicted
  class is the unpruned model's;
- features (embeddings, pooled features, per-token states): the cosine similarity of each
  sample's (or token's) vector to the unpruned one, averaged.
The cosine is also measured for logits, to break ties between candidates of equal agreement.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from repshift_fx.errors import ConfigError, described


def main_output(out) -> torch.Tensor:
    """The tensor compared: a model output's `logits` where it has them (Hugging Face), else its
    first tensor (`last_hidden_state`, the first of a tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for value in out:
            if isinstance(value, torch.Tensor):
                return value
    raise ConfigError(f"calibration compares the model's outputs, but it returned {type(out).__name__} without "
                      "a tensor; pass objective= (a callable (outputs, reference) -> float)")


def call(module, batch):
    """module(batch), with a dict batch as keywords and a tuple as positional arguments."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, (tuple, list)):
        return module(*batch)
    return module(batch)


def agreement_per_sample(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,): whether each sample's top-1 class (last axis) is the reference's (per-token outputs: the
    share of its tokens)."""
    return _per_sample((outputs.argmax(-1) == reference.argmax(-1)).double())


def cosine_per_sample(outputs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,): each sample's cosine similarity over the last axis (per-token outputs: its tokens' mean)."""
    return _per_sample(F.cosine_similarity(outputs.double(), reference.double(), dim=-1))


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(len(values), -1).mean(1)


def agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of samples whose top-1 class (last axis) is the reference's."""
    return agreement_per_sample(outputs, reference).mean().item()


def cosine(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity over the last axis (per sample, or per token of (B, N, C) states)."""
    return cosine_per_sample(outputs, reference).mean().item()


OBJECTIVES: dict[str, Callable] = {"logits": agreement, "features": cosine}
PER_SAMPLE: dict[Callable, Callable] = {agreement: agreement_per_sample, cosine: cosine_per_sample}  # for intervals
OBJECTIVE_NAMES = {"logits": "top-1 agreement", "features": "cosine similarity"}


def output_kind(model: nn.Module, batch, reference_output) -> str:
    """"logits" when the model's output is a classifier's: a `logits` field, or a (B, K) tensor that
    is the output of the last nn.Linear the model ran; else "features"."""
    if isinstance(reference_output, Mapping) and isinstance(reference_output.get("logits"), torch.Tensor):
        return "logits"
    out = main_output(reference_output)
    if out.dim() != 2 or out.shape[-1] < 2:
        return "features"
    last = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: last.append(o)) for m in model.modules()
             if isinstance(m, nn.Linear)]
    try:
        with torch.inference_mode():
            again = main_output(call(model, batch))
    finally:
        for hook in hooks:
            hook.remove()
    return "logits" if last and isinstance(last[-1], torch.Tensor) and last[-1].shape == again.shape \
        and torch.equal(last[-1], again) else "features"


def choose_objective(objective, kind: str) -> tuple[Callable, str]:
    """(the measure, its name): `objective` "agreement", "cosine", a callable, or None (by `kind`)."""
    if objective is None:
        return OBJECTIVES[kind], OBJECTIVE_NAMES[kind]
    if callable(objective):
        return _checked(objective), getattr(objective, "__name__", "custom objective")
    named = {"agreement": (agreement, OBJECTIVE_NAMES["logits"]), "cosine": (cosine, OBJECTIVE_NAMES["features"])}
    if objective not in named:
        raise ConfigError(f"objective must be 'agreement', 'cosine', a callable (outputs, reference) -> float or "
                          f"None (chosen by the output), got {objective!r}")
    return named[objective]


def _checked(objective: Callable) -> Callable:
    """The user's objective, its failures and non-numbers a ConfigError that says what it must be."""
    def measured(outputs: torch.Tensor, reference: torch.Tensor) -> float:
        try:
            value = objective(outputs, reference)
        except Exception as err:  # the user's code, whatever it raises
            raise ConfigError(f"objective= raised {described(err)}; it is called as "
                              "objective(outputs, reference) with two tensors") from err
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"objective= returned {value!r}; it must return a finite number, higher is better")
        return float(value)

    return measured
