"""The compressed graph as one self-contained ONNX file: compress -> torch.export -> ONNX.

    exported = export(model, x, "deit.onnx", keep=0.7)     # exported.path, exported.report
    session = onnxruntime.InferenceSession(str(exported.path))

Token counts are fixed by the example input (as for compress); the batch axis stays dynamic
(a torch.export Dim, named "batch" in the ONNX file). The file is written under a temporary name
next to the target and renamed at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from repshift_fx.api import compress
from repshift_fx.capture.inputs import Inputs, as_args
from repshift_fx.config import config_from, inference_only
from repshift_fx.errors import ExportError, described
from repshift_fx.export.diagnose import conversion_error, export_error
from repshift_fx.export.runtime import max_relative_error, require, run_eager, run_session, session
from repshift_fx.report.tokens import Report

log = logging.getLogger(__name__)
CHECK_TOLERANCE = 1e-4  # max |onnx - eager| / max |eager| on the example input


@dataclass
class Exported:
    """What `export` wrote: the file, the compress report, the ONNX input and output names, the
    largest relative error of the ONNX model against the eager graph on the example input (None
    when not checked), and that eager graph (`compress(..., compile=False)`; it shares the model's
    parameters)."""

    path: Path
    report: Report | None = field(repr=False)
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    max_error: float | None = None
    module: torch.nn.Module | None = field(default=None, repr=False)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


RESERVED_ONNX_OPTIONS = ("dynamo", "external_data", "verbose", "dynamic_shapes", "f")  # export() sets them


def _target(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ExportError(f"path must be the .onnx file to write (a str or a Path), got {path!r}")
    return Path(path).expanduser()


def _check_options(dynamic_batch, check, onnx_options, config: dict) -> None:
    for name, value in (("dynamic_batch", dynamic_batch), ("check", check)):
        if not isinstance(value, bool):
            raise ExportError(f"{name} must be True or False, got {value!r}")
    if onnx_options is not None and not isinstance(onnx_options, dict):
        raise ExportError(f"onnx_options must be a dict of torch.onnx.export keywords, e.g. {{'opset_version': 18}}; "
                          f"got {type(onnx_options).__name__}")
    taken = [k for k in onnx_options or {} if k in RESERVED_ONNX_OPTIONS]
    if taken:
        raise ExportError(f"onnx_options {taken} are set by export() itself; leave them out")
    if check and config.get("score") == "random":
        raise ExportError("score='random' draws other tokens on every call, and onnxruntime cannot draw torch's: the "
                          "check against the eager graph cannot pass. Export with check=False (CLI: --no-check)")


def export(model: torch.nn.Module, example_input, path, *, dynamic_batch: bool = True, check: bool = True,
           onnx_options: dict | None = None, **config) -> Exported:
    """Compress `model` (`compress(model, example_input, compile=False, **config)`) and write the
    rewritten graph to `path` as ONNX, through torch.export and `torch.onnx.export(dynamo=True)`.

    Args:
        model, example_input, **config: as for `compress` (config: the fields of `repshift_fx.Config`);
            the example input fixes the token counts.
        path: the .onnx file to write (its folder is created); replaced only once the export succeeded.
        dynamic_batch: the batch axis (dim 0 of every input that has the example's batch size)
            is dynamic, named "batch"; False fixes it to the example's.
        check: run the file in onnxruntime on the example input and compare with the eager graph
            (relative error at most 1e-4), else ExportError.
        onnx_options: passed on to torch.onnx.export (opset_version=, custom_translation_table=, ...).

    Returns:
        `Exported`: `.path` (also usable as a path, os.fspath), `.report`, `.input_names`,
        `.output_names`, `.max_error`, `.module` (the eager compressed graph that was exported).

    Raises:
        The RepShiftError compress raises for the model; ExportError where an op cannot be
        exported (naming the node and the model's module), the path cannot be written, or the
        `export` extra is missing. The user's model is never changed.
    """
    config.pop("compile", None)  # the eager graph is what is exported
    _check_options(dynamic_batch, check, onnx_options, config)
    inference_only(config_from(config, export)[0], "export()", "writes an inference graph")  # no compile options
    require("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    target = _target(path)
    with _atomic_file(target) as temporary:
        args = _example(example_input, model, dynamic_batch)
        gm = compress(model, args, compile=False, **config)
        exported = _write(gm, args, temporary, dynamic_batch, check, onnx_options)
    exported.path, exported.report, exported.module = target, gm.report, gm
    log.info("wrote %s (inputs %s, outputs %s)", target, exported.input_names, exported.output_names)
    return exported


def export_unpruned(model: torch.nn.Module, example_input, path, *, dynamic_batch: bool = True, check: bool = True,
                    onnx_options: dict | None = None) -> Exported:
    """`model` as it is, without the pass, written the same way: the baseline `bench --onnx`
    times the compressed model against. `.report` is None."""
    _check_options(dynamic_batch, check, onnx_options, {})
    require("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    target = _target(path)
    with _atomic_file(target) as temporary:
        exported = _write(model, _example(example_input, model, dynamic_batch), temporary, dynamic_batch, check,
                          onnx_options)
    exported.path = target
    return exported


def _example(example_input, model: torch.nn.Module, dynamic_batch: bool) -> tuple:
    """The example as positional args (Inputs for keywords); a batch of 1 repeated to 2 for a
    dynamic batch, since a capture at batch 1 (dynamo, torch.export) pins that size in the graph."""
    args = as_args(example_input, model)
    return batch_of_two(args) if dynamic_batch and _batch_size(args) == 1 else args


def _write(module, args: tuple, destination: Path, dynamic_batch: bool, check: bool, onnx_options) -> Exported:
    program = to_onnx(module, args, dynamic_batch=dynamic_batch, **(onnx_options or {}))
    _save(program, destination)
    graph = program.model.graph
    error = check_against_eager(module, args, destination) if check else None
    return Exported(destination, None, [v.name for v in graph.inputs], [v.name for v in graph.outputs], error)


def to_onnx(gm: torch.nn.Module, args: tuple, *, dynamic_batch: bool = True, **onnx_options):
    """The rewritten graph (or any module) as a torch.onnx.ONNXProgram (batch axis "batch" when dynamic)."""
    trace_args = batch_of_two(args) if dynamic_batch and _batch_size(args) == 1 else args
    positional, kwargs = ((), trace_args.as_kwargs()) if isinstance(trace_args, Inputs) else (tuple(trace_args), None)
    shapes = dynamic_shapes(trace_args) if dynamic_batch else None
    quiet = not log.isEnabledFor(logging.DEBUG)
    try:
        with _quiet_loggers(["torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes"], quiet):
            program = torch.export.export(gm, positional, kwargs=kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:
        raise export_error(err, gm, dynamic_batch) from err
    onnx_options.setdefault("output_names", output_names(gm, trace_args))
    try:
        with _quiet_loggers(["torch.onnx", "onnxscript", "onnx_ir"], quiet):
            onnx_program = torch.onnx.export(program, dynamo=True, external_data=False, verbose=False,
                                             **onnx_options)
    except Exception as err:
        raise conversion_error(err, gm, program) from err
    if dynamic_batch:
        _name_batch_axis(onnx_program)
    return onnx_program


def _batch_size(args: tuple) -> int | None:
    tensors = [t for t in args if isinstance(t, torch.Tensor) and t.dim() > 0]
    return tensors[0].shape[0] if tensors else None


def _batched(args: tuple) -> list[bool]:
    """Which inputs carry the batch axis: dim 0 of the size the first input has."""
    batch = _batch_size(args)
    return [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in args]


def batch_of_two(args: tuple) -> tuple:
    """The example repeated to two samples: torch.export fixes a dim that is 1 when traced."""
    doubled = [torch.cat([t, t]) if batched else t for t, batched in zip(args, _batched(args))]
    return args.like(doubled) if isinstance(args, Inputs) else tuple(doubled)


def dynamic_shapes(args: tuple):
    """torch.export's dynamic_shapes: dim 0 of every batched input is the one Dim "batch"."""
    batch = torch.export.Dim("batch", min=1)
    shapes = [{0: batch} if batched else None for batched in _batched(args)]
    return dict(zip(args.names, shapes)) if isinstance(args, Inputs) else tuple(shapes)


def output_names(gm: torch.nn.Module, args: tuple) -> list[str] | None:
    """ONNX output names from the graph's output: "output" for one tensor, a dict's (or a
    Hugging Face ModelOutput's) keys, else output_0, output_1, ..."""
    with torch.no_grad():
        out = gm(**args.as_kwargs()) if isinstance(args, Inputs) else gm(*args)
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, dict):
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(keys) == len(_tensor_leaves(out)):
            return keys
    return [f"output_{i}" for i in range(len(_tensor_leaves(out)))]


def _tensor_leaves(out) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def _name_batch_axis(onnx_program) -> None:
    inputs = onnx_program.model.graph.inputs
    symbols = {str(v.shape[0]) for v in inputs if v.shape is not None and len(v.shape) and not
               isinstance(v.shape[0], int)}
    onnx_program.rename_axes({symbol: "batch" for symbol in symbols})


@contextlib.contextmanager
def _quiet_loggers(names: list[str], quiet: bool):
    """torch.export and torch.onnx log their progress and the failures they re-raise (which the
    ExportError then explains); shown only under DEBUG."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL if quiet else logger.level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _save(onnx_program, destination: Path) -> None:
    """One self-contained file: the weights inside, no external .data file (< 2 GB models)."""
    try:
        onnx_program.save(destination, external_data=False)
    except OSError as err:
        raise ExportError(f"cannot write {destination.name!r} in {str(destination.parent)!r}: "
                          f"{err.strerror or err}") from None


@contextlib.contextmanager
def _atomic_file(target: Path):
    """A temporary file in `target`'s folder, renamed to `target` if the block succeeds; on any
    failure removed (with any side file an exporter may have put next to it, and the folders made
    for it)."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        open(temporary, "xb").close()  # not mkstemp: its 0600 mode would stay on the renamed file
    except OSError as err:
        _remove(made)
        raise ExportError(f"cannot write {str(target)!r}: {err.strerror or err} (choose a folder you can write "
                          "to, e.g. -o ./model.onnx)") from None
    try:
        yield temporary
        try:
            os.replace(temporary, target)
        except OSError as err:
            raise ExportError(f"cannot write {str(target)!r}: {err.strerror or err}") from None
        made = []
    finally:
        for leftover in (temporary, temporary.with_name(temporary.name + ".data")):
            leftover.unlink(missing_ok=True)
        _remove(made)


def _remove(folders: list[Path]) -> None:
    """Remove the folders export made (innermost first), where they are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_against_eager(gm: torch.nn.Module, args: tuple, onnx_path: Path) -> float:
    """The ONNX model in onnxruntime against the eager graph on `args`: the largest relative
    error over the outputs; ExportError above CHECK_TOLERANCE."""
    try:
        got = run_session(session(onnx_path), args)
    except Exception as err:  # onnxruntime's own refusal: an input type its CPU provider has no kernel for, ...
        raise ExportError(f"onnxruntime cannot run the exported model: {described(err)}. Export in float32, or "
                          "with check=False (CLI: --no-check) to keep the file for another runtime") from err
    want = run_eager(gm, args)
    error = max_relative_error(got, want)
    if error > CHECK_TOLERANCE:
        raise ExportError(f"the ONNX model differs from the compressed graph on the example input (relative error "
                          f"{error:.3g} > {CHECK_TOLERANCE:g}); export with check=False (CLI: --no-check) to keep "
                          "it anyway, or report the model")
    return error
