"""Reading the graphs dynamo hands a backend, and what a backend owes dynamo in return.

Everything here touches dynamo's conventions (placeholder sources, fake example values, symbolic
sizes and their guards, the frame being compiled); `repshift_fx.compile.backend` builds on it.

- `is_weight`: a placeholder that is a lifted parameter, buffer or attribute, not a user input;
- `pin_token_axes`: symbolic sizes other than the batch are specialized (guards added);
- `concrete_args`: values the graph can run on eagerly (shape recording);
- `refresh_example_values`: dynamo's fake `example_value`s recomputed after a rewrite;
- `frame_module`, `frame_code`, `graph_name`: the module and code being compiled, for numbering and logs.
"""
from __future__ import annotations

import logging
import re

import torch
import torch.fx
from torch import nn

from repshift_fx.capture import ShapeRecorder
from repshift_fx.errors import ModelModeError, TraceError, UnsupportedSiteError, root_cause
from repshift_fx.fx.nodes import literal_arg, op_name, where

log = logging.getLogger("repshift_fx")

_USER_INPUT = re.compile(r"L\['(?!self')[^']+'\](\[[^\]]+\])*")  # L['x'], L['args'][0]; not L['self'].w
_TRAINING_OPS = ("dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "batch_norm")


def check_inference(gm: torch.fx.GraphModule) -> None:
    """Refuse a graph captured in training mode (a dropout or batch norm called with training=True)."""
    for node in gm.graph.nodes:
        name = op_name(node, gm)
        if node.op == "call_function" and name in _TRAINING_OPS:
            training = literal_arg(node, 5 if name == "batch_norm" else 2, "training", False)
            if training is True:
                raise ModelModeError(
                    f"{where(node, gm)} runs in training mode: call model.eval() before "
                    "torch.compile(model, backend='repshift') for inference, or build the backend with "
                    "repshift_fx.backend(train=True, ...) to train through the reduction."
                )


def _source_name(node: torch.fx.Node) -> str | None:
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


def is_weight(node: torch.fx.Node, example) -> bool:
    """A lifted parameter, buffer or attribute tensor; not a tensor the caller passed in."""
    if not isinstance(example, torch.Tensor):
        return False
    if isinstance(example, nn.Parameter):
        return True
    source = _source_name(node)
    return source is not None and not _USER_INPUT.fullmatch(source)


def pin_token_axes(inputs: list, weights: frozenset) -> None:
    """Specialize every symbolic input size but the batch (dimension 0 of the inputs).

    Token counts follow from those sizes, and a plan is made for one token count: pinning adds
    dynamo guards, so another resolution recompiles (with its own counts) instead of reusing
    counts computed for this one."""
    from torch.fx.experimental.symbolic_shapes import free_symbols, guard_int

    values = [n.meta.get("example_value") for n in inputs if n.name not in weights]
    batch = set()
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            batch |= free_symbols(value.shape[0])
    for value in values:
        sizes = list(value.shape[1:]) if isinstance(value, torch.Tensor) else [value]
        for size in sizes if isinstance(value, (torch.Tensor, torch.SymInt)) else ():
            if isinstance(size, torch.SymInt) and not free_symbols(size) <= batch:
                try:
                    guard_int(size)
                except Exception as err:
                    raise UnsupportedSiteError(
                        f"the input size {size} must be static for repshift_fx (a drop keeps a fixed number "
                        f"of tokens), but it cannot be specialized: {root_cause(err)}. Mark only the "
                        "batch dimension dynamic."
                    ) from err


def _concrete(example, user_input: bool):
    """A value the graph can run on eagerly: hints for symbolic ints, real tensors for fake ones."""
    from torch._subclasses.fake_tensor import is_fake

    if isinstance(example, torch.SymInt):
        if not example.node.has_hint():
            raise TraceError(
                f"the graph dynamo captured takes a data-dependent size ({example}); repshift_fx needs "
                "every size known at compile time (turn off torch._dynamo.config.capture_scalar_outputs)"
            )
        return example.node.hint
    if isinstance(example, torch.Tensor) and is_fake(example):
        sizes = [s.node.hint if isinstance(s, torch.SymInt) else s for s in example.shape]
        if example.dtype.is_floating_point or example.dtype.is_complex:
            return torch.randn(sizes, dtype=example.dtype, device=example.device)
        return torch.zeros(sizes, dtype=example.dtype, device=example.device)
    if user_input and isinstance(example, torch.Tensor):
        return example.detach().clone()  # the graph may write to its inputs; it runs twice here
    return example


def record_shapes(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Run the graph once on `args`, recording `tensor_meta` on every node (as `capture` does)."""
    try:
        ShapeRecorder(gm).propagate(*args)
    except Exception as err:
        cause = root_cause(err)
        raise TraceError(
            f"repshift_fx could not run the graph dynamo captured to read its shapes: "
            f"{type(cause).__name__}: {cause}"
        ) from err


def frame_module() -> nn.Module | None:
    """The module whose forward dynamo is compiling (`self` of the frame), where dynamo says."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        owner = tx.f_locals.get("self")
        if not isinstance(owner, nn.Module) and tx.f_code.co_argcount:  # a method whose self has another name
            owner = tx.f_locals.get(tx.f_code.co_varnames[0])
    except Exception:
        return None
    return owner if isinstance(owner, nn.Module) else None


def frame_code() -> str | None:
    """The name of the code dynamo is compiling (`forward`, or a `torch_dynamo_resume_in_...`
    function after a graph break), where dynamo says."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_code.co_name
    except Exception:
        return None


def graph_name(gm: torch.fx.GraphModule) -> str:
    """How the logs name a graph: the compiled frame and dynamo's compile id, `Model.forward [1/0]`."""
    owner, code = frame_module(), frame_code() or ""
    where = f"{type(owner).__name__}.{code}" if owner is not None else code or "graph"
    compile_id = gm.meta.get("dynamo_compile_id")
    return f"{where} [{compile_id}]" if compile_id is not None else where


def refresh_example_values(gm: torch.fx.GraphModule) -> None:
    """Recompute dynamo's `example_value` (fake tensors) on the rewritten graph, for the passes of
    `inner` that read them; where that is impossible, drop the stale ones."""
    from torch._subclasses.fake_tensor import FakeTensor

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value") for n in placeholders]
    mode = next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)

    class _Fake(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op not in ("placeholder", "output"):
                n.meta["example_value"] = result
            return result

    try:
        if mode is None or any(v is None for v in values):
            raise LookupError("no fake inputs")
        with mode:
            _Fake(gm).run(*values)
    except Exception as err:
        log.debug("example values not recomputed (%s); dropped", err)
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                node.meta.pop("example_value", None)


def concrete_args(inputs: list, example_inputs: list, weights: frozenset) -> tuple:
    """The example inputs as values the graph can run on eagerly (see `_concrete`)."""
    return tuple(_concrete(ex, n.name not in weights) for n, ex in zip(inputs, example_inputs))

