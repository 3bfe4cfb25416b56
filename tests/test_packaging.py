"""A plain `pip install .` and the editable install both give every subpackage (the passes as
`repshift_fx.passes`), imported from outside the repository."""
import os
import re
import site
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _subpackages() -> list[str]:
    found = ["repshift_fx.passes"]
    for init in sorted((ROOT / "repshift_fx").rglob("__init__.py")):
        found.append(".".join(("repshift_fx", *init.parent.relative_to(ROOT / "repshift_fx").parts)).rstrip("."))
    return sorted(set(found))


SUBPACKAGES = _subpackages()
IMPORT_ALL = "import importlib; print('\\n'.join(importlib.import_module(m).__file__ for m in {!r}))".format(SUBPACKAGES)


def test_pyproject_lists_every_subpackage():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(declared) == SUBPACKAGES


def test_plain_install_ships_every_subpackage(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    assert (target / "repshift_fx" / "passes" / "find_sites.py").exists()
    assert not (target / "passes").exists()
    # -S: no site module, so no editable finder; the dependencies' site-packages after the target, on PYTHONPATH
    path = [str(target), *site.getsitepackages()]
    result = subprocess.run([sys.executable, "-S", "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})
    assert result.returncode == 0, result.stderr
    files = result.stdout.split()
    assert len(files) == len(SUBPACKAGES) and all(line.startswith(str(target)) for line in files)


def test_editable_install_imports_every_subpackage_from_outside(tmp_path):
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    files = result.stdout.split()
    assert len(files) == len(SUBPACKAGES) and all(line.startswith(str(ROOT)) for line in files)


def test_the_docs_index_lists_every_document_and_plot():
    docs = ROOT / "docs"
    index = (docs / "index.md").read_text()
    listed = set(re.findall(r"\]\(([^)]+)\)", index))
    present = {str(p.relative_to(docs)) for p in docs.rglob("*") if p.suffix in (".md", ".png") and p.name != "index.md"}
    assert present <= listed, sorted(present - listed)
    assert {p for p in listed if not p.startswith("http")} <= present, sorted(listed - present)
