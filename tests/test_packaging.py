"""A plain `pip install .` gives a working `repshift_fx.passes`, imported from outside the repo."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_ships_the_passes_as_a_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert (target / "repshift_fx" / "passes" / "find_sites.py").exists()
    assert not (target / "passes").exists()
    code = "import repshift_fx.passes.find_sites as f, repshift_fx; print(f.__file__); print(repshift_fx.__file__)"
    result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
                             f"{[p for p in sys.path if 'site-packages' in p]!r}; {code}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(target)) for line in result.stdout.split())
