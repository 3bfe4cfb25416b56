"""Every node's shape, recorded by running the captured graph once on the example input.

    propagate_shapes(gm, args, model)    # node.meta["tensor_meta"]; bad input -> ExampleInputError
    fold_pass_through_calls(gm)          # calls that returned None or one of their inputs, removed
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from ..errors import ExampleInputError, described, root_cause
from ..fx.nodes import mutates
from .inputs import expected_input


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
    """Also notes the calls which, on this input, return None or one of their input tensors
    unchanged. An in-place call (`F.relu(x, inplace=True)` returns `x`, changed) is no such call:
    it is known by its name or by an input whose version counter it moved."""

    def run_node(self, n: torch.fx.Node):
        candidate = n.op == "call_function" and n.target.__module__ not in ("_operator", "operator") \
            and not mutates(n)
        inputs = [self.env.get(a) for a in n.all_input_nodes] if candidate else []
        versions = _versions(inputs)
        result = super().run_node(n)
        if not candidate or versions != _versions(inputs):
            return result
        if result is None:
            n.meta["folds_to"] = None
        elif isinstance(result, torch.Tensor):  # not a size: max(s, 0) returning s is no pass-through
            hits = [a for a in n.args if isinstance(a, torch.fx.Node) and self.env.get(a) is result]
            others = [a for a in n.args if not (isinstance(a, torch.fx.Node) and self.env.get(a) is result)]
            if len(hits) == 1 and all(self.env.get(a, a) is None for a in others if isinstance(a, torch.fx.Node)):
                n.meta["folds_to"] = hits[0]
        return result


def _versions(values) -> list[int | None]:
    """Version counters of the tensors among `values`; None for inference tensors (made under
    torch.inference_mode), which keep none."""
    return [None if t.is_inference() else t._version for t in values if isinstance(t, torch.Tensor)]


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
        raise ExampleInputError(input_mismatch(model or gm, given or args, root_cause(wrapped))) from wrapped


def input_mismatch(model: nn.Module, given: tuple, err: BaseException) -> str:
    """'the example input (2, 3, 48, 48) does not fit VisionTransformer; the model expects
    (B, 3, 32, 32): AssertionError: ...': the error `err` the input met, in the model's terms."""
    shapes = ", ".join(str(tuple(a.shape)) for a in given)
    hint = expected_input(model) if isinstance(model, nn.Module) else None
    expects = f"; the model expects {hint}" if hint else ""
    return f"the example input {shapes} does not fit {type(model).__name__}{expects}: {described(err)}"
