"""Make `import torchvision` work when its compiled ops do not match the installed torch.

A torchvision wheel built for another torch (here: a CUDA torchvision next to a CPU torch) fails
to load its `_C` extension silently and then dies in `_meta_registrations.py` with
``RuntimeError: operator torchvision::nms does not exist``. timm imports torchvision, so timm
dies too. Defining the schemas of the two operators that torchvision registers fake kernels for
unconditionally lets both imports succeed; the models this project reads never call them.

When torchvision's extension loads (matching builds) this does nothing.
"""
import glob
import importlib.util
import logging
import os
import sys

import torch

log = logging.getLogger("repshift_fx")

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: the schemas vanish with the Library object


def _extension_loads(package_dir: str) -> bool:
    for path in glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(
        os.path.join(package_dir, "_C*.pyd")
    ):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, ImportError):
            return False
    return False


def _op_exists(name: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel(f"torchvision::{name}")) or hasattr(
            torch.ops.torchvision, name
        )
    except (RuntimeError, AttributeError):
        return False


def install() -> bool:
    """Define the missing schemas if (and only if) torchvision's extension cannot load.

    Returns True when the guard acted.
    """
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return False
    missing = [s for s in _SCHEMAS if not _op_exists(s.split("(")[0])]
    if not missing:
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        _library.define(schema)
    log.debug("torchvision's compiled ops do not load with this torch; defined %d schemas", len(missing))
    return True
