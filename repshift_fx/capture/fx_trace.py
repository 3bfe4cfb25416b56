"""Capture by `torch.fx.symbolic_trace`, with module paths in errors; dynamo where fx cannot trace.

    gm = trace(model, args)
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ..errors import TraceError, described
from .dynamo_export import dynamo_trace, leaving_no_trace
from ..fx.nodes import is_drop_path
from .inputs import defaults_not_given, is_transformers_model


class _PathTracer(torch.fx.Tracer):
    """A `torch.fx.Tracer` that remembers which module it was inside when tracing failed."""

    def __init__(self):
        super().__init__()
        self.failed_path: str | None = None
        self.failed_type: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Drop-path modules too: traced through in training mode, their random per-sample mask
        (`x.new_empty(...).bernoulli_()`) would read as ops mixing the branch's tokens."""
        return is_drop_path(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.path_of_module(m) or "<root>"
                self.failed_type = type(m).__name__
            raise


def trace(model: nn.Module, inputs=1) -> torch.fx.GraphModule:
    """symbolic_trace with module paths in errors; the model keeps no trace of it.

    `inputs`: the number of positional inputs, or the example args (then a transformers
    model, or one symbolic_trace fails on, is traced by `torch._dynamo.export` on them).
    torch.fx stores tensor constants it meets as `_tensor_constantN` attributes on the traced
    root; they are moved to the GraphModule and removed from the user's model.
    """
    args = inputs if isinstance(inputs, tuple) else None
    given = getattr(inputs, "names", None) or (len(inputs) if args is not None else inputs)

    if args is not None and is_transformers_model(model):
        return dynamo_trace(model, args)
    tracer = _PathTracer()
    try:
        with leaving_no_trace(model):
            graph = tracer.trace(model, concrete_args=defaults_not_given(model, given) or None)
            if not isinstance(given, int):
                _drop_fixed_placeholders(graph, given)
            return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as err:
        where = (
            f"module '{tracer.failed_path}' ({tracer.failed_type})"
            if tracer.failed_path
            else type(model).__name__
        )
        fx_error, cause = TraceError(
            f"torch.fx cannot trace {where}: {described(err)}. Make its forward free of "
            "data-dependent Python control flow, or wrap that module with torch.fx.wrap / a leaf "
            "module, or use torch.compile(model, backend='repshift'), which allows graph breaks."
        ), err
    if args is None:
        raise fx_error from cause
    try:
        return dynamo_trace(model, args)  # what torch.fx cannot trace, dynamo may
    except TraceError:
        raise fx_error from cause


def _drop_fixed_placeholders(graph: torch.fx.Graph, names) -> None:
    """Keyword inputs: the parameters fixed to their defaults leave the signature (torch.fx keeps
    them as placeholders read only by its `_assert_is_none` checks), so that the graph takes the
    given tensors positionally, in `names` order."""
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.target in names:
            continue
        for user in list(node.users):
            if getattr(user.target, "__name__", "").startswith("_assert") and not user.users:
                graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)
