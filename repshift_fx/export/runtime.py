"""Running an exported ONNX file in onnxruntime, and comparing it with the eager graph.

    s = session("deit.onnx", threads=2)          # CPUExecutionProvider
    outputs = run_session(s, (x,))              # numpy arrays, in the graph's output order
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch
import torch.utils._pytree as pytree

from repshift_fx.capture.inputs import Inputs
from repshift_fx.errors import ExportError

PROVIDER = "CPUExecutionProvider"
INSTALL_HINT = 'pip install "repshift-fx[export]"'


def require(*modules: str) -> None:
    """Raise ExportError naming the extra to install when one of `modules` is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def session(path, *, threads: int | None = None, provider: str = PROVIDER):
    """An onnxruntime InferenceSession on `path`; `threads`: intra-op threads (None: ORT's default)."""
    require("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=[provider])


def feed(onnx_session, args: tuple) -> dict:
    """The session's inputs from the example args: by name for keyword inputs, else in order."""
    names = [i.name for i in onnx_session.get_inputs()]
    if isinstance(args, Inputs):
        given = args.as_kwargs()
        return {name: _numpy(given[name]) for name in names}
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    return {name: _numpy(t) for name, t in zip(names, tensors)}


def run_session(onnx_session, args: tuple) -> list[np.ndarray]:
    return onnx_session.run(None, feed(onnx_session, args))


def run_eager(module, args: tuple) -> list[np.ndarray]:
    """The module's tensor outputs on `args` (keywords for Inputs), flattened as torch.export does."""
    with torch.no_grad():
        out = module(**args.as_kwargs()) if isinstance(args, Inputs) else module(*args)
    return [_numpy(leaf) for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def max_relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max |got - want| / max |want| over every output (the worst one); inf if they do not pair up."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    errors = [np.abs(g.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-6) for g, w in zip(got, want)
              if w.size]
    return float(max(errors, default=0.0))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()
