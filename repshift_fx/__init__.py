"""repshift_fx: Representation Shift token pruning as a torch.fx graph pass.

    compressed = repshift_fx.compress(model, example_input)          # compiled, pruned
    print(repshift_fx.inspect(model, example_input))                  # what it would do

The pipeline, one folder a step: capture/ -> passes/ (analyze, rewrite, verify) with plan/ between
them -> compile/; modes/ holds one strategy per reduction (tokens, lines), report/ what a run did,
method/ the method itself as plain functions. apps/ (CLI, bench, evaluation, data) is never
imported from here.
"""
from __future__ import annotations

from repshift_fx._torchvision_guard import install as _install_torchvision_guard

_install_torchvision_guard()  # before anything imports torchvision (timm does)

from repshift_fx.api import compress, inspect  # noqa: E402
from repshift_fx.calibration import Calibration, calibrate  # noqa: E402
from repshift_fx.compile.backend import backend  # noqa: E402
from repshift_fx.config import Config  # noqa: E402
from repshift_fx.errors import (  # noqa: E402
    CaptureError,
    ConfigError,
    ExampleInputError,
    ExportError,
    ModelModeError,
    NoSiteError,
    RepShiftError,
    TargetOutOfReach,
    TraceError,
    UnsupportedSiteError,
)
from repshift_fx.export import Exported, export  # noqa: E402
from repshift_fx.report.tokens import Report  # noqa: E402

__all__ = [
    "compress", "inspect", "export", "Exported", "calibrate", "Calibration", "backend", "Config", "Report", "RepShiftError", "CaptureError", "ConfigError", "ExampleInputError",
    "ExportError", "ModelModeError", "NoSiteError", "TargetOutOfReach", "TraceError", "UnsupportedSiteError",
]
__version__ = "0.1.0"
