"""The compressed model's inputs, checked before its graph runs.

    guard = InputGuard(gm.forward, args)                          # args: as_args(example_input, model)
    gm.register_forward_pre_hook(guard, with_kwargs=True)

The example input fixes every size but the batch: token counts, the positions a drop keeps and the
tables gathered along them are constants of the graph. Called at another resolution or sequence
length, the graph would fail deep inside (a size mismatch in an add, a dynamo error when compiled),
or, where the sizes happen to line up, compute something else. The guard compares each tensor
input's sizes after the batch axis with the example's and raises an `ExampleInputError` saying
which input, the shape the model was compressed for and what to do; a missing or unknown input is
named the same way. Another batch size, dtype or device passes (the graph handles those as the
model does). It runs as a forward pre-hook, in Python, before dynamo sees the call.

A graph compressed for training (`train=True`) fixed its dropout rates when it was traced (SDPA's
`dropout_p`, `F.dropout(training=True)`): switched to eval mode it would still drop at random, so
the guard refuses that call with a `ModelModeError` (compress the model in eval mode for inference).
"""
from __future__ import annotations

import inspect

import torch

from repshift_fx.capture.inputs import input_label
from repshift_fx.errors import ExampleInputError, ModelModeError

_NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class InputGuard:
    """A forward pre-hook (`with_kwargs=True`): the inputs must have the example's sizes but for
    the batch (axis 0). Picklable, as the GraphModule it is registered on."""

    def __init__(self, forward, args: tuple, train: bool = False):
        self.train = train
        self.signature = inspect.signature(forward)
        params = list(self.signature.parameters.values())
        self.bindable = all(p.kind in _NAMED for p in params)  # else *args or **kwargs: by position or keyword
        self.keywords = tuple(getattr(args, "names", ()))  # a dict example's keys
        self.names = [p.name for p in params][:len(args)] if self.bindable else self.keywords or list(range(len(args)))
        self.labels = [f"input '{name}'" if isinstance(name, str) else input_label(args, name) for name in self.names]
        self.shapes = [tuple(a.shape) for a in args]
        # forward parameters the example left out: fixed to their defaults in the graph
        self.fixed = {p.name: p.default for p in params if p.name not in self.names and p.default is not p.empty} \
            if self.bindable else {}

    def __call__(self, module, args: tuple, kwargs: dict):
        if self.train and not module.training:
            raise ModelModeError(
                "this graph was compressed for training (train=True: its dropout is fixed in the graph), and it was "
                "put in eval mode: for inference, compress the model in eval mode, repshift_fx.compress(model.eval(), "
                "x, ...), which shares the trained weights"
            )
        given = self._bind(args, kwargs)
        for name, default in self.fixed.items():
            if name in given and given[name] is not default and not _equal(given[name], default):
                raise ExampleInputError(
                    f"the model was compressed for the example's inputs ({', '.join(map(str, self.names))}) alone, "
                    f"its other forward parameters fixed to their defaults ({default!r} here); got a "
                    f"{type(given[name]).__name__} for one of them. Compress again with an example that passes it "
                    "(a dict example: {name: tensor} for each)"
                )
        for name, label, want in zip(self.names, self.labels, self.shapes):
            got = given.get(name)
            if name in given and not isinstance(got, torch.Tensor):
                raise ExampleInputError(f"the model was compressed for a tensor as {label} (shape {_batch_free(want)}), "
                                        f"got {type(got).__name__}")
            if isinstance(got, torch.Tensor) and (got.dim() != len(want) or tuple(got.shape[1:]) != want[1:]):
                raise ExampleInputError(
                    f"the model was compressed for {label} of shape {_batch_free(want)}, got "
                    f"{tuple(got.shape)}: the example input fixes every size but the batch (the token counts, "
                    "the tokens each drop keeps). Compress again with an example of this size, one compressed "
                    "model per input size"
                )
        return None

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        if not self.bindable:
            return {**dict(zip(self.names, args)), **kwargs}
        try:
            return self.signature.bind(*args, **kwargs).arguments
        except TypeError as err:
            raise ExampleInputError(
                f"the compressed model takes the inputs of the example it was compressed with, "
                f"({', '.join(self.names)}): {err}. Pass each of them (a dict example: the same keys)"
            ) from None


def _equal(value, default) -> bool:
    try:
        return isinstance(value, (bool, int, float, str)) and value == default
    except Exception:
        return False


def _batch_free(shape: tuple) -> str:
    """(2, 3, 64, 64) -> '(B, 3, 64, 64)'."""
    return "(" + ", ".join(["B", *map(str, shape[1:])]) + ")" if shape else "()"
