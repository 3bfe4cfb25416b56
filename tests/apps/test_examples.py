"""Every example runs, with tiny settings."""
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_compress_deit_example():
    out = _run("compress_deit.py", "--model", "deit_tiny_patch16_224", "--depth", "4", "--img-size", "64",
               "--batch", "2", "--rounds", "1")
    assert "tokens in" in out and "compressed compiled" in out and "the compiled baseline" in out
