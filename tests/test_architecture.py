"""The layout's rules, checked on the source: no import cycle inside repshift_fx, no import that runs
back up the pipeline's layers, the library never imports its applications (repshift_fx.apps), a bare `import repshift_fx` loads no plotting or
data stack, no module over about 400 lines, and no private name imported across modules."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"repshift_fx": ROOT / "repshift_fx", "repshift_fx.passes": ROOT / "passes"}
MAX_LINES = 420
# the pipeline's layers, lowest first: a module imports only from its own layer or the ones below
LAYERS = (
    ("repshift_fx.errors", "repshift_fx.config", "repshift_fx._torchvision_guard"),
    ("repshift_fx.fx", "repshift_fx.method", "repshift_fx.capture", "repshift_fx.context", "repshift_fx.wording",
     "repshift_fx.flops"),
    ("repshift_fx.plan",),
    ("repshift_fx.passes",),
    ("repshift_fx.report",),
    ("repshift_fx.modes",),
    ("repshift_fx.pipeline",),
    ("repshift_fx.compile", "repshift_fx.export", "repshift_fx.calibration", "repshift_fx.api"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, local ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in modules else (base, [alias.name]))
    return [(target, names) for target, names in found if target.split(".")[0] == "repshift_fx"]


def _import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        for target, _ in _imports(name, path, modules):
            while target not in modules:  # a name inside a module: the module itself
                target = target.rpartition(".")[0]
            if target != name and target != "repshift_fx":
                graph.add_edge(name, target)
    return graph


def test_no_import_cycle_inside_the_package():
    cycles = list(nx.simple_cycles(_import_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def _layer(module: str) -> int | None:
    return next((i for i, names in enumerate(LAYERS) for n in names if module == n or module.startswith(n + ".")), None)


def test_every_library_module_has_a_layer():
    graph = _import_graph()
    assert [m for m in graph if _layer(m) is None and not m.startswith("repshift_fx.apps") and m != "repshift_fx"] == []


def test_no_import_runs_back_up_the_layers():
    graph = _import_graph()
    upward = [(m, t) for m, t in graph.edges if _layer(m) is not None and _layer(t) is not None and _layer(t) > _layer(m)]
    assert upward == []


def test_the_library_never_imports_its_applications():
    graph = _import_graph()
    library = [m for m in graph if not m.startswith("repshift_fx.apps")]
    bad = [(m, t) for m in library for t in graph.successors(m) if t.startswith("repshift_fx.apps")]
    assert not bad


def test_a_bare_import_loads_no_plotting_or_data_stack():
    code = ("import sys, repshift_fx; heavy = ('sklearn', 'matplotlib', 'PIL', 'skimage', 'repshift_fx.apps'); "
            "print([m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('repshift_fx.apps')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT / "tests")
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_about_400_lines(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    bad = [(name, target, n) for name, path in modules.items() for target, names in _imports(name, path, modules)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad
