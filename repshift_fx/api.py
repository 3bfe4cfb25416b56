"""The public entry points: `compress` (rewrite, then torch.compile) and `inspect` (the report only).

    compressed = compress(model, example_input, keep=0.7)
    print(inspect(model, example_input))
"""
from __future__ import annotations

import inspect as pyinspect

import torch

from repshift_fx.capture import as_args, check_model, reuse_traces
from repshift_fx.capture.guard import InputGuard
from repshift_fx.capture.state import untouched
from repshift_fx.config import config_from
from repshift_fx.errors import ConfigError, UnsupportedSiteError
from repshift_fx.fx.pickling import picklable
from repshift_fx.pipeline import refused_report, run
from repshift_fx.plan import default
from repshift_fx.report.tokens import Report


# torch.compile's own keywords ("mode" is compress()'s: torch.compile's is compile_mode=)
COMPILE_KEYWORDS = tuple(p for p in pyinspect.signature(torch.compile).parameters if p not in ("model", "mode"))


def compress(model: torch.nn.Module, example_input, *, compile=True, **options):
    """Reduce `model`'s tokens (by default ToMe by Ward's cost, else Representation Shift) and compile it.

    Args:
        model: an nn.Module in eval mode (a ViT-like model: residual attention and MLP blocks
            over (B, N, C) tokens). It is not changed; the result shares its parameters.
        example_input: a tensor (or tuple of tensors) the model accepts; it fixes the token
            counts (another resolution needs another compress(): the result called at another
            size than the example's, the batch aside, raises an ExampleInputError).
        compile: False returns the rewritten torch.fx.GraphModule (eager) for reading and tests.
        **options: the fields of `repshift_fx.Config` (keep=, at=, site=, score=, target_flops=,
            mode=, reduce=, ...: `help(repshift_fx.Config)` says what each means). Where none of
            them chooses a reduction, the default runs (repshift_fx/plan/default.py): ToMe by Ward's
            cost at target_flops (0.70 unless given) where the planner reaches it, else the paper's
            rule, Config's defaults (score="shift" names it); `.report.notes[0]` says which. And
            torch.compile's keywords, passed on to it (backend=, dynamic=, options=, ...);
            torch.compile's own `mode` ("max-autotune", ...) is `compile_mode=` here, since
            `mode` chooses tokens or lines. A misspelt name is a ConfigError naming the nearest.

    Returns:
        The compiled module (torch.compile of the rewritten graph), or the GraphModule; either
        has `.report`, the `Report` that `inspect` returns.

    Raises:
        RepShiftError: a subclass per cause (bad option, training mode, untraceable model, bad
            example input, no residual MLP, a site that cannot be pruned safely).
    """
    config, compile_options = config_from(options, compress, COMPILE_KEYWORDS + ("compile_mode",))
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be True or False, got {compile!r}")
    if compile:
        _check_compile_options(compile_options)
    elif compile_options:
        raise ConfigError(f"torch.compile's options ({', '.join(f'{k}=' for k in compile_options)}) were given with "
                          "compile=False, which returns the eager graph and compiles nothing: drop them, or leave "
                          "compile=True")
    check_model(model, config.train)
    # one trace per call: the budget search, the probes and the report read copies of it; the model's
    # buffers and the random streams as they were (a training-mode model runs here several times)
    with reuse_traces(), untouched(model):
        first, fallback = default.choices(options, config)
        gm, report = run(model, example_input, first, flops=False, fallback=fallback)
    gm.report = report
    guard = InputGuard(gm.forward, as_args(example_input, model), config.train)  # another input size: an ExampleInputError
    if not compile:
        gm.register_forward_pre_hook(guard, with_kwargs=True)
        return picklable(gm)  # torch.save(gm): torch.fx's own pickling traces the code again, which fails here
    if "compile_mode" in compile_options:
        compile_options["mode"] = compile_options.pop("compile_mode")
    compiled = torch.compile(gm, **compile_options)
    compiled.register_forward_pre_hook(guard, with_kwargs=True)  # on the wrapper: checked before dynamo runs
    return compiled


def _check_compile_options(options: dict) -> None:
    """torch.compile's backend= and options= as torch.compile would refuse them at the first call."""
    from repshift_fx.compile.backend import RepShiftBackend, resolve_backend

    backend = options.get("backend", "inductor")
    if isinstance(backend, RepShiftBackend):
        raise ConfigError("backend=repshift_fx.backend() would prune the compressed graph again; compress() already "
                          "runs the pass: name the backend that compiles it ('inductor', 'eager')")
    resolve_backend(backend, "backend")
    inductor_options = options.get("options")
    if inductor_options is not None and backend == "inductor":
        import torch._inductor

        unknown = [k for k in inductor_options if k not in torch._inductor.list_options()] \
            if isinstance(inductor_options, dict) else None
        if unknown is None or unknown:
            raise ConfigError(f"options= must be a dict of Inductor options (torch._inductor.list_options()); "
                              f"{'unknown: ' + repr(unknown) if unknown else 'got ' + type(inductor_options).__name__}")


def inspect(model: torch.nn.Module, example_input, **options) -> Report:
    """What `compress(model, example_input, **options)` would do, without compiling: `options` are
    the fields of `repshift_fx.Config`, checked as compress checks them.

    Returns a `Report`: blocks and their module paths, tokens in and out of every block, where
    attention is fused (SDPA, rewritten, MultiheadAttention, kept explicit and why), the prefix
    tokens and the GFLOPs per sample before and after. `print(report)` shows it as a table.
    A model compress() refuses (UnsupportedSiteError) still gets its table, nothing pruned, with
    the refused block marked and the reason under "refused" (repshift_fx.pipeline.refused_report).
    """
    options.pop("compile", None)
    config, _ = config_from(options, inspect)
    check_model(model, config.train)
    first, fallback = default.choices(options, config)
    with reuse_traces(), untouched(model):
        try:
            return run(model, example_input, first, flops=True, fallback=fallback)[1]
        except UnsupportedSiteError as error:  # not to steer: the refusal is what the report shows
            return refused_report(model, example_input, fallback or first, error)
