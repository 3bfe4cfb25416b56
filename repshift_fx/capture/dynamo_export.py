"""Capture by `torch._dynamo.export`: for Hugging Face transformers models and whatever
`torch.fx.symbolic_trace` cannot trace (see repshift_fx/capture/).

    gm = dynamo_trace(model, args)       # args: a tuple, or capture.Inputs (keyword tensors)

The graph holds torch-level calls (`F.linear`, `layer_norm`, SDPA), the parameters as attributes
shared with the model, and takes the same (keyword) arguments as the model. Where the export
fails, the model is run once eagerly, so that an input it does not accept is an `ExampleInputError`
in its own words rather than a `TraceError`.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..errors import ExampleInputError, TraceError, described, root_cause
from ..fx.nodes import is_impure, name_modules_as_user
from .inputs import Inputs, expected_input, is_transformers_model


_CONTAINERS = (dict, list, set)


@contextlib.contextmanager
def leaving_no_trace(model: nn.Module):
    """The modules keep no trace of a trace: attributes it sets (dynamo's `_is_torch_compile`,
    torch.fx's `_tensor_constantN`) are removed, and dicts, lists and sets it fills are put back
    as they were. A forward that caches into a dict (timm's LeViT and EfficientFormerV2 cache
    their attention biases under `str(x.device)`) would otherwise keep a traced Proxy there,
    and the next trace would read it."""
    saved = {m: (set(vars(m)), {k: (v, type(v)(v)) for k, v in vars(m).items() if type(v) in _CONTAINERS})
             for m in model.modules()}
    try:
        yield
    finally:
        for module, (names, containers) in saved.items():
            state = vars(module)
            for name in set(state) - names:
                delattr(module, name)
            for name, (original, content) in containers.items():
                original.clear()
                original.extend(content) if isinstance(original, list) else original.update(content)
                state[name] = original


@contextlib.contextmanager
def _without_cache(model: nn.Module):
    """A transformers decoder returns its key/value cache (a `DynamicCache`, no tensor dynamo can
    return): trace it with `config.use_cache` off, restored afterwards, so that the passes see its
    (causal) attention and refuse it by name rather than fail to trace."""
    config = getattr(model, "config", None)
    cached = is_transformers_model(model) and getattr(config, "use_cache", False) is True
    if cached:
        config.use_cache = False
    try:
        yield
    finally:
        if cached:
            config.use_cache = True


def _runs_eagerly(model: nn.Module, args: tuple, positional: tuple, kwargs: dict) -> None:
    """Run the model once on the example input; an input it does not accept -> ExampleInputError."""
    try:
        with torch.no_grad():
            model(*positional, **kwargs)
    except Exception as err:
        cause = root_cause(err)
        shapes = ", ".join(f"{name}={tuple(a.shape)}" for name, a in zip(getattr(args, "names", None) or
                                                                          [f"#{i}" for i in range(len(args))], args))
        hint = expected_input(model)
        params = [p for p in inspect.signature(model.forward).parameters if p not in ("args", "kwargs")]
        unknown = [n for n in getattr(args, "names", ()) if n not in params]
        raise ExampleInputError(
            f"the example input ({shapes}) does not fit {type(model).__name__}"
            f"{'; the model expects ' + hint if hint else ''}"
            f"{f'; {unknown} are not among its forward parameters {params[:6]}' if unknown else ''}: "
            f"{type(cause).__name__}: {cause}"
        ) from err


def _batch_dynamic(args: tuple) -> tuple:
    """Aliases of `args` (the caller's tensors stay unmarked) whose batch axis, dim 0 of every
    input with the first input's batch size (over 1), is marked dynamic, where the model allows.
    Every other size stays static: the passes read them from the example input, and symbolic
    spatial sizes can cost dynamo minutes of sympy (MobileViTv2's nested floor divisions)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
    batch = tensors[0].shape[0] if tensors else 1
    aliased = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0 and batch > 1 and a.shape[0] == batch:
            a = a.detach()
            torch._dynamo.maybe_mark_dynamic(a, 0)
        aliased.append(a)
    return args.like(aliased) if isinstance(args, Inputs) else tuple(aliased)


def dynamo_trace(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    """`torch._dynamo.export` of one call on `args` (keywords where `args` is `Inputs`), with
    static sizes but for the batch axis (`_batch_dynamic`)."""
    marked = _batch_dynamic(args)
    kwargs = marked.as_kwargs() if isinstance(marked, Inputs) else {}
    positional = () if isinstance(marked, Inputs) else tuple(marked)
    try:
        with torch.no_grad(), _without_cache(model), leaving_no_trace(model):
            export = torch._dynamo.export(model, assume_static_by_default=True, _log_export_usage=False)
            gm = export(*positional, **kwargs).graph_module
    except Exception as err:
        _runs_eagerly(model, args, positional, kwargs)  # a bad example input fails eagerly too
        cause = root_cause(err)
        raise TraceError(
            f"neither torch.fx nor torch._dynamo.export can capture {type(model).__name__} as one graph: "
            f"{described(cause)}. Remove the "
            "graph break (torch._dynamo.explain(model)(x) lists them), or use "
            "torch.compile(model, backend='repshift'), which allows graph breaks."
        ) from err
    # e.g. a pooler whose output the model drops; asserts and in-place calls whose result nothing
    # reads (timm's `x.add_(pos_embed)`: Node.is_impure counts no call_method as impure) stay
    gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    name_modules_as_user(gm, model)
    gm.recompile()
    gm.meta["repshift_tracer"] = "dynamo"
    return gm
