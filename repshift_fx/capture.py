"""Capture: an FX graph of the model plus every node's shape.

    model, example_input -> (GraphModule, example args)

`example_input` is a tensor, a tuple of tensors, or a dict of keyword tensors
(`{"input_ids": ..., "attention_mask": ...}`); a dict becomes `Inputs`, a tuple in the order of
the model's forward parameters that remembers their names, and the graph takes the same names.

Two tracers: `torch.fx.symbolic_trace` (module paths in errors, optional forward args fixed to
their defaults), and, for Hugging Face transformers models or where symbolic tracing fails,
`torch._dynamo.export` (the same torch-level ops a dynamo backend sees: `F.linear`,
`layer_norm`, SDPA; parameters stay attributes; Python control flow that does not depend on
tensor values is evaluated away; see repshift_fx/dynamo_capture.py). The graph shares the model's parameters (nothing is copied, nothing is changed); shapes
are recorded in ``node.meta["tensor_meta"]``.
"""
from __future__ import annotations

import contextlib
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
            f"a dict example_input must map forward parameter names to tensors; {bad or 'it is empty'} "
            "do not, e.g. {'input_ids': ids, 'attention_mask': mask}"
        )
    parameters = inspect.signature(model.forward).parameters if model is not None else {}
    params = list(parameters)
    unknown = [k for k in example_input if k not in params]
    takes_kwargs = model is not None and any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    if model is not None and unknown and not takes_kwargs:
        raise ExampleInputError(
            f"{type(model).__name__}.forward has no parameter(s) {unknown}; it takes {params}"
        )
    order = sorted(example_input, key=lambda k: params.index(k) if k in params else len(params))
    return Inputs([example_input[k] for k in order], order)


def as_args(example_input, model: nn.Module | None = None) -> tuple:
    """The example input as positional args: a tensor, a tuple/list of tensors, or `Inputs`
    for a dict of keyword tensors (ordered as `model.forward` lists them)."""
    if isinstance(example_input, Inputs):
        return example_input
    if isinstance(example_input, dict):
        return _keyword_inputs(example_input, model)
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in example_input
    ):
        return tuple(example_input)
    raise ExampleInputError(
        "example_input must be a tensor, a tuple of tensors or a dict of keyword tensors, got "
        f"{type(example_input).__name__}"
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


def trace(model: nn.Module, inputs=1) -> torch.fx.GraphModule:
    """symbolic_trace with module paths in errors; the model keeps no trace of it.

    `inputs`: the number of positional inputs, or the example args (then a transformers
    model, or one symbolic_trace fails on, is traced by `torch._dynamo.export` on them).
    torch.fx stores tensor constants it meets as `_tensor_constantN` attributes on the traced
    root; they are moved to the GraphModule and removed from the user's model.
    """
    args = inputs if isinstance(inputs, tuple) else None
    given = getattr(inputs, "names", None) or (len(inputs) if args is not None else inputs)
    from .dynamo_capture import dynamo_trace

    if args is not None and is_transformers_model(model):
        return dynamo_trace(model, args)
    tracer = _PathTracer()
    own_attributes = set(vars(model))
    try:
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
            f"torch.fx cannot trace {where}: {type(err).__name__}: {err}. Make its forward free of "
            "data-dependent Python control flow, or wrap that module with torch.fx.wrap / a leaf "
            "module, or use torch.compile(model, backend='repshift'), which allows graph breaks."
        ), err
    finally:
        for name in set(vars(model)) - own_attributes:
            delattr(model, name)
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
    sliced = tuple(a[:2] if a.dim() > 0 and a.shape[0] > 2 else a for a in args)
    return args.like(sliced) if isinstance(args, Inputs) else sliced


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
    return id(model), getattr(args, "names", None), tensors


def _copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule over a copy of `gm`'s graph (nodes, names and meta), sharing its attributes
    and its input/output conventions (`Graph.__deepcopy__` without copying the codegen)."""
    graph = torch.fx.Graph(tracer_cls=gm.graph._tracer_cls)
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph._codegen = gm.graph._codegen
    graph.output(value, type_expr=getattr(old_output, "type", None)).meta = dict(old_output.meta)
    copied = torch.fx.GraphModule(gm, graph, gm.__class__.__name__)
    copied.meta.update(gm.meta)
    return copied


def capture(model: nn.Module, example_input) -> tuple[torch.fx.GraphModule, tuple]:
    """Trace `model` and record shapes on (a slice of) `example_input`."""
    check_model(model)
    given = as_args(example_input, model)
    args = analysis_args(given)
    key = _trace_key(model, args) if _REUSED is not None else None
    if key is not None and key in _REUSED:
        return _copy(_REUSED[key][0]), args
    gm = trace(model, args)
    propagate_shapes(gm, args, model, given)
    fold_pass_through_calls(gm)
    if key is not None:
        _REUSED[key] = (_copy(gm), model)  # the model is held so that its id stays its own
    return gm, args
