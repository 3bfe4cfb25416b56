"""The torchvision guard: imports work here; where the operators exist it does nothing."""
import subprocess
import sys
import textwrap


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def _extension_loads() -> bool:
    """Whether torchvision's compiled ops load with this torch (checked in a fresh process)."""
    probe = _python("""
        import glob, importlib.util, os, torch
        root = importlib.util.find_spec("torchvision").submodule_search_locations[0]
        try:
            torch.ops.load_library(glob.glob(os.path.join(root, "_C*.so"))[0]); print("yes")
        except OSError:
            print("no")
    """)
    return probe.stdout.strip() == "yes"


def test_repshift_fx_then_timm_and_torchvision_import():
    result = _python("""
        import repshift_fx, timm, torchvision
        from repshift_fx import _torchvision_guard as guard
        print(guard._library is not None)
        print(timm.create_model("deit_tiny_patch16_224", depth=1).__class__.__name__)
    """)
    assert result.returncode == 0, result.stderr
    acted, model = result.stdout.split()
    assert acted == str(not _extension_loads())
    assert model == "VisionTransformer"


def test_guard_does_nothing_where_the_operators_exist():
    result = _python("""
        import torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from repshift_fx import _torchvision_guard as guard
        print(guard._library is None, guard.install())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_guard_does_nothing_once_torchvision_is_imported():
    result = _python("""
        from repshift_fx import _torchvision_guard as guard
        import torchvision
        print(guard.install())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
