"""Capture: an FX graph of the model plus every node's shape.

    model, example_input -> (GraphModule, example args)

The graph shares the model's parameters (nothing is copied, nothing is changed); shapes are
recorded by `torch.fx.passes.shape_prop.ShapeProp` in ``node.meta["tensor_meta"]``.
"""
from __future__ import annotations

import inspect

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import ConfigError, ExampleInputError, ModelModeError, TraceError, root_cause


class _PathTracer(torch.fx.Tracer):
    """A `torch.fx.Tracer` that remembers which module it was inside when tracing failed."""

    def __init__(self):
        super().__init__()
        self.failed_path: str | None = None
        self.failed_type: str | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.path_of_module(m) or "<root>"
                self.failed_type = type(m).__name__
            raise


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ModelModeError(
            f"{type(model).__name__} is in training mode. repshift_fx compresses inference graphs "
            "only (dropout and drop-path are removed); call model.eval() before compress()/inspect()."
        )


def as_args(example_input) -> tuple:
    """The example input as positional args: a tensor, or a tuple/list of tensors."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise ExampleInputError(
        f"example_input must be a tensor or a tuple of tensors, got {type(example_input).__name__}"
    )


def defaults_not_given(model: nn.Module, n_given: int) -> dict:
    """Forward parameters the example input leaves out, fixed to their (constant) defaults."""
    params = list(inspect.signature(model.forward).parameters.values())[n_given:]
    return {
        p.name: p.default
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is not p.empty
        and (p.default is None or isinstance(p.default, (bool, int, float, str)))
    }


def trace(model: nn.Module, n_inputs: int = 1) -> torch.fx.GraphModule:
    """symbolic_trace with module paths in errors; the model keeps no trace of it.

    torch.fx stores tensor constants it meets as `_tensor_constantN` attributes on the traced
    root; they are moved to the GraphModule and removed from the user's model.
    """
    tracer = _PathTracer()
    own_attributes = set(vars(model))
    try:
        graph = tracer.trace(model, concrete_args=defaults_not_given(model, n_inputs) or None)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:
        where = (
            f"module '{tracer.failed_path}' ({tracer.failed_type})"
            if tracer.failed_path
            else type(model).__name__
        )
        raise TraceError(
            f"torch.fx cannot trace {where}: {type(err).__name__}: {err}. Make its forward free of "
            "data-dependent Python control flow, or wrap that module with torch.fx.wrap / a leaf "
            "module, or use torch.compile(model, backend='repshift'), which allows graph breaks."
        ) from err
    finally:
        for name in set(vars(model)) - own_attributes:
            delattr(model, name)


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


class ShapeRecorder(torch.fx.Interpreter):
    """Runs the graph and records `tensor_meta` on every node, as ShapeProp does, without
    printing a traceback of its own when a node fails (the caller turns it into an error)."""

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        tensors = []

        def describe(value):
            if not isinstance(value, torch.Tensor):
                return value
            tensors.append(value)
            return _extract_tensor_metadata(value)

        meta = map_aggregate(result, describe)
        if tensors:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def propagate(self, *args):
        with torch.no_grad():
            return self.run(*args)


class _ShapeAndPassThroughProp(ShapeRecorder):
    """Also notes the calls which, on this input, return None or one of their inputs."""

    def run_node(self, n: torch.fx.Node):
        result = super().run_node(n)
        if n.op == "call_function" and n.target.__module__ not in ("_operator", "operator"):
            if result is None:
                n.meta["folds_to"] = None
            else:
                hits = [a for a in n.args if isinstance(a, torch.fx.Node) and self.env.get(a) is result]
                others = [a for a in n.args if not (isinstance(a, torch.fx.Node) and self.env.get(a) is result)]
                if len(hits) == 1 and all(self.env.get(a, a) is None for a in others if isinstance(a, torch.fx.Node)):
                    n.meta["folds_to"] = hits[0]
        return result


def fold_pass_through_calls(gm: torch.fx.GraphModule) -> None:
    """Remove calls that evaluate to None or hand back an input unchanged.

    With the optional forward arguments fixed to their defaults, helpers such as an optional
    mask resolver return None and `maybe_add_mask(scores, None)` returns `scores`: they are
    no-ops that would otherwise hide the attention pattern from the passes.
    """
    for node in list(gm.graph.nodes):
        if "folds_to" not in node.meta or not node.users:  # asserts and other effects stay
            continue
        for user in list(node.users):
            user.replace_input_with(node, node.meta["folds_to"])
        gm.graph.erase_node(node)
    gm.recompile()


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple, model: nn.Module | None = None, given: tuple = ()) -> None:
    """Run the graph once on `args`, recording every node's shape; bad input -> ExampleInputError."""
    try:
        _ShapeAndPassThroughProp(gm).propagate(*args)
    except Exception as wrapped:
        err = root_cause(wrapped)
        shapes = ", ".join(str(tuple(a.shape)) for a in (given or args))
        hint = expected_input(model) if model is not None else None
        expects = f"; the model expects {hint}" if hint else ""
        raise ExampleInputError(
            f"the example input {shapes} does not fit {type(model or gm).__name__}{expects}: "
            f"{type(err).__name__}: {err}"
        ) from wrapped


def analysis_args(args: tuple) -> tuple:
    """Two samples are enough to read every shape; more only cost time."""
    return tuple(a[:2] if a.dim() > 0 and a.shape[0] > 2 else a for a in args)


def capture(model: nn.Module, example_input) -> tuple[torch.fx.GraphModule, tuple]:
    """Trace `model` and record shapes on (a slice of) `example_input`."""
    check_model(model)
    given = as_args(example_input)
    args = analysis_args(given)
    gm = trace(model, len(args))
    propagate_shapes(gm, args, model, given)
    fold_pass_through_calls(gm)
    return gm, args
