"""Capture: an FX graph of the model plus every node's shape.

    model, example_input -> (GraphModule, example args)

`example_input` is a tensor, a tuple of tensors, or a dict of keyword tensors
(`{"input_ids": ..., "attention_mask": ...}`); a dict becomes `Inputs`, a tuple in the order of
the model's forward parameters that remembers their names, and the graph takes the same names.

Two tracers: `torch.fx.symbolic_trace` (module paths in errors, optional forward args fixed to
their defaults), and, for Hugging Face transformers models or where symbolic tracing fails,
`torch._dynamo.export` (the same torch-level ops a dynamo backend sees: `F.linear`,
`layer_norm`, SDPA; parameters stay attributes; Python control flow that does not depend on
tensor values is evaluated away; every size is fixed to the example input's but the
batch axis; see repshift_fx/capture/dynamo_export.py). The graph shares the model's parameters (nothing is copied, nothing is changed); shapes
are recorded in ``node.meta["tensor_meta"]``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx
from torch import nn

from ..errors import ExampleInputError, TraceError
try:  # torch.fx's module that writes its code when first called (private; Inductor's passes use it)
    from torch.fx._lazy_graph_module import _LazyGraphModule
except ImportError:  # a torch without it: copies are plain modules, each recompile() writes code
    _LazyGraphModule = None

from .check import call_model, check_capture
from .fx_trace import trace
from .inputs import Inputs, analysis_args, as_args, check_model, expected_input, is_transformers_model
from .shapes import ShapeRecorder, fold_pass_through_calls, input_mismatch, propagate_shapes

__all__ = ["capture", "reuse_traces", "copy_graph", "eager_module", "set_own_modes", "trace", "Inputs", "as_args", "analysis_args", "check_model", "expected_input",
           "is_transformers_model", "ShapeRecorder", "propagate_shapes", "fold_pass_through_calls"]


_REUSED: dict | None = None  # trace key -> GraphModule, inside `reuse_traces()`


@contextlib.contextmanager
def reuse_traces():
    """Inside this block, capturing the same model on inputs of the same shapes again reuses the
    first trace (a copy of its graph), e.g. compressing one model at several keep rates:

        with repshift_fx.capture.reuse_traces():
            fast = [repshift_fx.compress(model, x, keep=k, compile=False) for k in (0.9, 0.7, 0.5)]

    The model must not change inside the block (its code, modules or attributes: a trace records
    them); its weights may change in place, which the graph reads."""
    global _REUSED
    outer = _REUSED
    _REUSED = {} if outer is None else outer
    try:
        yield
    finally:
        _REUSED = outer


def _trace_key(model: nn.Module, args: tuple) -> tuple:
    tensors = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
    return id(model), model.training, getattr(args, "names", None), tensors


def copy_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph (nodes, names and meta), sharing its attributes
    and its input/output conventions (`Graph.__deepcopy__` without copying the codegen).

    The copy writes its Python code when first called, not at every `recompile()` (torch.fx's
    `_LazyGraphModule`, as Inductor's passes use it): each rewrite pass recompiles, and the budget
    search's rewrites are only counted, never called. `eager_module` makes it plain again."""
    graph = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls)
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph._codegen = gm.graph._codegen
    graph.output(value, type_expr=getattr(old_output, "type", None)).meta = dict(old_output.meta)
    return _carrying_meta((_LazyGraphModule or torch.fx.GraphModule)(gm, graph, gm.__class__.__name__), gm)


def eager_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` as a plain GraphModule over the same graph, its code written now: what the pipeline
    hands out (a lazy module's `forward` is a stand-in without the graph's signature)."""
    if _LazyGraphModule is None or not isinstance(gm, _LazyGraphModule):
        return gm
    return _carrying_meta(torch.fx.GraphModule(gm, gm.graph, gm.__class__.__name__), gm)


def _carrying_meta(new: torch.fx.GraphModule, old: torch.fx.GraphModule) -> torch.fx.GraphModule:
    new.meta.update(old.meta)
    set_own_modes(new, old, old.training)
    return new


def set_own_modes(gm: torch.fx.GraphModule, owner: nn.Module, training: bool) -> None:
    """Training mode `training` for `gm` and the containers torch.fx made for it, not for the modules
    it shares with `owner` (the user's model: `gm.train()` would set theirs too)."""
    shared = {id(m) for m in owner.modules() if m is not owner}
    for module in gm.modules():
        if id(module) not in shared:
            module.training = training


def _raise_if_the_model_rejects(model: nn.Module, args: tuple, given: tuple) -> None:
    """ExampleInputError with the model's own error where the model itself fails on the example
    (its message holds real sizes, where the graph's holds traced ones, or no graph was made)."""
    try:
        call_model(model, args)
    except Exception as err:  # the model's own error, whatever it raises
        raise ExampleInputError(input_mismatch(model, given, err)) from err


def capture(model: nn.Module, example_input, check: bool = True, train: bool = False
            ) -> tuple[torch.fx.GraphModule, tuple]:
    """Trace `model` and record shapes on (a slice of) `example_input`; with `check`, the graph's
    outputs on that slice are compared with the model's (`check_capture`: one more forward of each,
    a `CaptureError` naming the first module that differs). `train`: the model is in training mode."""
    check_model(model, train)
    given = as_args(example_input, model)
    args = analysis_args(given)
    key = _trace_key(model, args) if _REUSED is not None else None
    if key is not None and key in _REUSED:
        return copy_graph(_REUSED[key][0]), args
    try:
        gm = trace(model, args)
        propagate_shapes(gm, args, model, given)
    except (TraceError, ExampleInputError):
        _raise_if_the_model_rejects(model, args, given)
        raise
    fold_pass_through_calls(gm)
    if check:
        check_capture(gm, model, args, given=given)
    gm.meta["repshift_memo"] = {}  # what analyses learn about this trace; copies of it share the dict
    if key is not None:
        _REUSED[key] = (copy_graph(gm), model)  # the model is held so that its id stays its own
    return gm, args
