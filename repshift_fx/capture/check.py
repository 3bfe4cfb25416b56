"""The captured graph, proven equal to the model on the example input before anything is rewritten.

    check_capture(gm, model, args)     # CaptureError naming the first module whose output differs
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.fx
from torch import nn

from ..errors import CaptureError, ExampleInputError
from ..fx.nodes import module_paths
from .inputs import Inputs
from .shapes import input_mismatch
from .state import seeded


CAPTURE_RTOL = 1e-5  # the graph runs the model's own ops: it agrees to rounding, or not at all


def _same_draws(model, args):
    """A training-mode model (dropout, drop-path) and its graph draw the same random numbers when
    both start from one seed. An eval-mode model that draws (random masking) is left to draw freely,
    so that `_check_deterministic` finds it."""
    return seeded(args) if model.training else contextlib.nullcontext()


def call_model(model, args):
    with torch.no_grad(), _same_draws(model, args):
        return model(**args.as_kwargs()) if isinstance(args, Inputs) else model(*args)


def _run_graph(gm, model, args, runner=None):
    with torch.no_grad(), _same_draws(model, args):
        return runner.run(*args) if runner is not None else gm(*args)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an output: a tensor, a tuple/list, a dict or a transformers ModelOutput."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):  # ModelOutput is an OrderedDict of its set fields
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; inf for another shape, 0 for two NaNs in one place."""
    if got.shape != want.shape:
        return math.inf
    if want.numel() == 0:
        return 0.0
    if not (want.is_floating_point() or want.is_complex()):
        return 0.0 if torch.equal(got, want) else math.inf
    got, want = got.detach().double(), want.detach().double()
    diff = (got - want).abs().masked_fill(torch.isnan(got) & torch.isnan(want), 0)
    if diff.isnan().any():
        return math.inf
    scale = want.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1e-12)
    return (diff.nan_to_num(0.0, 0.0, 0.0).max() / scale).item()


class _ValueRecorder(torch.fx.Interpreter):
    """Runs the graph and keeps a copy of every tensor a call computes (taken when it is computed:
    a later in-place call must not change it)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, torch.Tensor] = {}

    def run_node(self, n):
        result = super().run_node(n)
        if n.op.startswith("call") and isinstance(result, torch.Tensor):
            self.values[n] = result.detach().clone()
        return result


def first_divergence(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, rtol: float = CAPTURE_RTOL) -> str | None:
    """The first module (in the order the model finishes them) whose output the graph does not
    reproduce: "module 'blocks.0.attn' (Attention), graph node 'x_5': relative error 0.03";
    None when none is found. Forward hooks record each module's output; the graph's value for
    a module is that of the last node traced inside it whose shape is the output's (its first tensor)."""
    outputs: dict[str, list] = {}

    def hook(path):
        def record(module, inputs, output):
            outputs.setdefault(path, []).append([t.detach().clone() for t in _tensors(output)])
        return record

    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(hook(path)) for path, m in modules.items() if path]
    try:
        call_model(model, args)
    finally:
        for handle in handles:
            handle.remove()
    recorder = _ValueRecorder(gm)
    _run_graph(gm, model, args, recorder)
    inside: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node in recorder.values:
            for path in module_paths(node):
                inside.setdefault(path, []).append(node)
    for path, calls in outputs.items():  # dicts keep insertion order: the order the hooks fired
        if len(calls) != 1 or not calls[0] or path not in inside:
            continue  # a module called twice, returning no tensor, or not in the graph
        want = calls[0][0]
        nodes = [n for n in inside[path] if recorder.values[n].shape == want.shape]
        if not nodes:
            continue
        error = relative_error(recorder.values[nodes[-1]], want)
        if error > rtol:
            return (f"module '{path}' ({type(modules[path]).__name__}), graph node '{nodes[-1].name}': "
                    f"relative error {error:.3g}")
    return None


def _rounding(t: torch.Tensor) -> float:
    """The relative error two runs of the same ops may differ by in `t`'s precision: half precision
    rounds more, and so do float32 matmuls run as TF32 (CUDA) or bf16 (float32_matmul_precision)."""
    eps = torch.finfo(t.dtype).eps
    if t.dtype == torch.float32 and (torch.get_float32_matmul_precision() != "highest"
                                     or (t.is_cuda and torch.backends.cuda.matmul.allow_tf32)):
        eps = 2.0 ** -10  # TF32's mantissa
    return 8 * eps


def _check_deterministic(model: nn.Module, args: tuple, want: list[torch.Tensor], rtol: float) -> None:
    """A model whose own output changes from call to call (random masking, sampling) cannot be
    proven equal to any graph: say so, rather than blame the capture."""
    again = _tensors(call_model(model, args))
    if len(again) == len(want) and all(relative_error(a, w) <= rtol for a, w in zip(again, want)):
        return
    raise CaptureError(
        f"{type(model).__name__} gives another output each time it is called on the same example input (random "
        "masking, noise or sampling inside its forward), so no graph can be checked against it. Make its forward "
        "deterministic first (e.g. ViTMAE: config.mask_ratio=0.0), then compress it."
    )


def check_capture(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, rtol: float = CAPTURE_RTOL,
                  given: tuple = ()) -> None:
    """Run the graph once on `args` and compare each output tensor with the model's own (eager,
    no_grad); a relative error over `rtol` is a `CaptureError` naming the first module whose
    output differs (`first_divergence`: one more run of each, on failure only). The model failing
    on `args` (a slice of the example `given`) is an `ExampleInputError`."""
    try:
        want = _tensors(call_model(model, args))
    except Exception as err:  # the model's own error: the example does not fit how it is called
        raise ExampleInputError(input_mismatch(model, given or args, err)) from err
    got = _tensors(_run_graph(gm, model, args))
    rtol = max([rtol] + [_rounding(w) for w in want if w.is_floating_point()])
    if len(got) != len(want):
        problem = f"the graph returns {len(got)} tensor(s), the model {len(want)}"
    else:
        errors = [relative_error(g, w) for g, w in zip(got, want)]
        worst = max(range(len(errors)), key=errors.__getitem__, default=None)
        if worst is None or errors[worst] <= rtol:
            return
        problem = f"output {worst} differs by a relative error of {errors[worst]:.3g} (> {rtol:g})"
    _check_deterministic(model, args, want, rtol)
    where = first_divergence(gm, model, args, rtol)
    tracer = "torch._dynamo.export" if gm.meta.get("repshift_tracer") == "dynamo" else "torch.fx"
    raise CaptureError(
        f"the graph captured from {type(model).__name__} ({tracer}) does not compute what the model computes on the "
        f"example input: {problem}; first differing: {where or 'no single module (the outputs only)'}. Compressing it "
        "would give wrong answers. Likely causes: an in-place call, a value the trace fixed as a constant, Python "
        "control flow that depends on tensor values; run that module eagerly (a leaf module) or report it."
    )
