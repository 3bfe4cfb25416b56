"""The example input, checked and put in the order the model's forward takes it.

    args = as_args(example_input, model)     # a tensor, a tuple of tensors, or Inputs (keyword tensors)
    args = analysis_args(args)               # two samples: enough to read every shape
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import ConfigError, ExampleInputError, ModelModeError


def check_model(model, train: bool = False) -> None:
    """The model is a module in the mode asked for: eval mode, with no submodule whose training mode
    changes its output (batch norm, dropout) left in it; or with `train` training mode (submodules
    may be in eval mode: frozen batch statistics)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    name = type(model).__name__
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ConfigError(f"{name}'s weights are on the meta device (created without data): load them first "
                          "(model.to_empty(device='cpu') and load_state_dict), then compress it")
    if model.training and not train:
        raise ModelModeError(
            f"{name} is in training mode. repshift_fx compresses inference graphs unless asked: call "
            "model.eval() before compress()/inspect(), or pass train=True to compress() to train through "
            "the reduction."
        )
    training = next((path for path, module in model.named_modules() if module.training and _mode_matters(module)),
                    None)
    if training is not None and not train:
        raise ModelModeError(
            f"{name} is in eval mode, but its module '{training}' ({type(model.get_submodule(training)).__name__}) is "
            "in training mode: it would use batch statistics or drop at random where inference does not. Call "
            "model.eval() before compress()/inspect(), which sets every module (also one assigned after it), or "
            "pass train=True on a model in training mode to train through the reduction"
        )
    if train and not model.training:
        raise ConfigError(f"train=True compresses a training graph, but {name} is in eval mode: call model.train() "
                          "first, or leave train out for inference")


def _mode_matters(module: nn.Module) -> bool:
    """Whether training mode changes what `module` computes: batch norm (batch statistics, running
    ones updated) and dropout, drop-path or attention dropout with a rate above 0. A module
    without such behaviour (an nn.Identity assigned after model.eval()) may be left in training mode."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else \
        getattr(module, "drop_prob", None) if not isinstance(module, nn.MultiheadAttention) else module.dropout
    return isinstance(rate, (int, float)) and rate > 0


class Inputs(tuple):
    """Example tensors given as keywords, in the order of the model's forward parameters.

    A tuple (the passes run the graph on it positionally) that keeps the keyword `names`, so that
    `capture(model, inputs)` traces the same call again."""

    names: tuple[str, ...] = ()

    def __new__(cls, tensors, names):
        new = super().__new__(cls, tensors)
        new.names = tuple(names)
        return new

    def like(self, tensors) -> "Inputs":
        """The same names over other tensors (a slice of each, say)."""
        return Inputs(tensors, self.names)

    def as_kwargs(self) -> dict:
        return dict(zip(self.names, self))


def _keyword_inputs(example_input: dict, model: nn.Module | None) -> Inputs:
    bad = [k for k, v in example_input.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad or not example_input:
        raise ExampleInputError(
            "a dict example_input must map forward parameter names to tensors, e.g. {'input_ids': ids, "
            f"'attention_mask': mask}}; " + (f"{bad} do not" if bad else "it is empty")
        )
    parameters = inspect.signature(model.forward).parameters if model is not None else {}
    params = list(parameters)
    unknown = [k for k in example_input if k not in params]
    takes_kwargs = model is not None and any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if model is not None and unknown and not takes_kwargs:
        raise ExampleInputError(
            f"{type(model).__name__}.forward has no parameter(s) {unknown}; it takes {params}"
        )
    _check_token_inputs(example_input)
    order = sorted(example_input, key=lambda k: params.index(k) if k in params else len(params))
    return Inputs([example_input[k] for k in order], order)


TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # one (batch, length) shape from a tokenizer


def _check_token_inputs(example_input: dict) -> None:
    shapes = {k: tuple(v.shape) for k, v in example_input.items() if k in TOKENIZER_INPUTS}
    if len(set(shapes.values())) > 1:
        given = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise ExampleInputError(f"the example's {given} differ in shape: a tokenizer gives them one shape, (batch, "
                                "sequence length); pass them as it returns them (padding=True pads every text of a "
                                "batch to one length)")


def as_args(example_input, model: nn.Module | None = None) -> tuple:
    """The example input as positional args: a tensor, a tuple/list of tensors, or `Inputs`
    for a dict of keyword tensors (ordered as `model.forward` lists them). Every tensor must hold
    at least one sample (an ExampleInputError otherwise)."""
    if isinstance(example_input, Inputs):
        return example_input
    if isinstance(example_input, dict):
        args = _keyword_inputs(example_input, model)
    elif isinstance(example_input, torch.Tensor):
        args = (example_input,)
    elif isinstance(example_input, (tuple, list)) and example_input and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        args = tuple(example_input)
    else:
        raise ExampleInputError(
            "example_input must be a tensor, a tuple of tensors or a dict of keyword tensors, got "
            + (f"an empty {type(example_input).__name__}" if isinstance(example_input, (tuple, list))
               else type(example_input).__name__)
        )
    _check_not_empty(args)
    if any(t.is_meta for t in args):
        raise ExampleInputError("the example input is on the meta device (no data): pass a real batch, which the "
                                "pass runs the model on to check the graph it captures")
    return args


def input_label(args: tuple, i: int) -> str:
    """How the user names input `i`: by its keyword ("input 'input_ids'"), or by its place ('input 0')."""
    names = getattr(args, "names", ())
    return f"input '{names[i]}'" if i < len(names) else f"input {i}"


def _check_not_empty(args: tuple) -> None:
    for i, tensor in enumerate(args):
        if 0 in tensor.shape:
            what = "no sample (batch size 0)" if tensor.shape[0] == 0 else "an axis of size 0"
            raise ExampleInputError(
                f"the example's {input_label(args, i)} has shape {tuple(tensor.shape)}, with {what}: the example "
                "must hold at least one sample, every axis at least one entry; pass a real batch (one image, "
                "one sentence, ...), which fixes the sizes the compressed model runs at"
            )


def defaults_not_given(model: nn.Module, given) -> dict:
    """Forward parameters the example input leaves out, fixed to their (constant) defaults.

    `given`: the number of positional inputs, or the names of the keyword inputs."""
    params = list(inspect.signature(model.forward).parameters.values())
    params = [p for p in params if p.name not in given] if not isinstance(given, int) else params[given:]
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face transformers model: traced by dynamo (torch.fx cannot trace them)."""
    return any(cls.__module__.split(".")[0] == "transformers" for cls in type(model).__mro__)


def expected_input(model: nn.Module) -> str | None:
    """The input size a model declares, where it declares one (patch embedding, torchvision ViT, timm cfg)."""
    for module in model.modules():
        size = getattr(module, "img_size", None)
        channels = getattr(getattr(module, "proj", None), "in_channels", 3)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return f"(B, {channels}, {size[0]}, {size[1]})"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return "(B, " + ", ".join(str(s) for s in cfg["input_size"]) + ")"
    size = getattr(model, "image_size", None)
    if isinstance(size, int):
        return f"(B, 3, {size}, {size})"
    return None


def analysis_args(args: tuple) -> tuple:
    """Two samples are enough to read every shape; more only cost time."""
    sliced = tuple(a[:2] if a.dim() > 0 and a.shape[0] > 2 else a for a in args)
    return args.like(sliced) if isinstance(args, Inputs) else sliced
