"""tools/gpu_bench.py --device cpu --quick: the GPU run's code paths, on the CPU (about 2 minutes on 2 cores)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench.py"
REDUCED = ("drop", "merge", "tome (pass)", "tome + shift (pass)", "tome on stream (pass)",
           "tome by Ward's cost (pass)", "attention (EViT)",
           "tome (published)")


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    result = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "gpu_bench.md").read_text().startswith("# gpu_bench: cpu")
    assert (out / "gpu_bench.png").stat().st_size > 0
    return json.loads((out / "gpu_bench.json").read_text())


def test_every_check_passes(record):
    failed = [check for check in record["checks"] if not check["passed"]]
    assert not failed, failed
    names = " | ".join(check["name"] for check in record["checks"])
    for words in ("keep=1.0 == model", "drop == eager re-implementation", "published ToMe", "compiled == eager",
                  "bf16 vs fp32", "fp16 vs fp32", "bert"):
        assert words in names


def test_every_row_is_timed_and_read(record):
    rows = {row["row"]: row for row in record["rows"]}
    assert set(rows) == {"unpruned", *REDUCED}, record["notes"]
    for row in rows.values():
        assert row["img_s"] > 0 and row["kernel"] and row["kernel"] != "none seen", row
        assert row["peak_mib"] is None  # CPU
    assert rows["unpruned"]["flop_ratio"] == 1
    for name in REDUCED:
        assert 0 < rows[name]["flop_ratio"] < 1
        assert rows[name]["gain_share"] is not None
    assert rows["tome (published)"]["flop_ratio"] == pytest.approx(rows["drop"]["flop_ratio"], rel=0.03)
    assert rows["tome (published)"]["tome_r"] > 0


def test_kernels_are_read_not_assumed(record):
    """The attention score runs explicit attention in its scoring blocks: the profiler sees softmaxes."""
    rows = {row["row"]: row for row in record["rows"]}
    assert "flash_cpu" in rows["unpruned"]["kernels"] and "softmax" not in rows["unpruned"]["kernels"]
    assert rows["attention (EViT)"]["kernels"].get("softmax", 0) >= 1


def test_header_and_sections(record):
    assert record["header"]["versions"]["torch"] and record["header"]["versions"]["timm"]
    assert record["header"]["device"].startswith("cpu")
    assert {"checks: deit", "checks: bert", "speed"} <= set(record["sections"])
    assert any("CUDA only" in note for note in record["notes"])
