"""The package keeps the layering ARCHITECTURE.md describes, and its modules stay readable."""
import ast

import pytest

import rconv_core as rc
from conftest import REPO

# ARCHITECTURE.md's layers, top first: a module imports only from layers above its own.
LAYERS = [
    {"errors", "geometry", "paths", "progress", "vertices"},
    {"sparse", "memory", "models", "data", "client", "constraints", "parallel", "linear_search"},
    {"solvers", "network", "linear_split"},
    {"tolerances", "activations", "equations", "bounds"},
    {"systems"},
    {"steps"},
    {"batch"},
    {"attack"},
    {"reports", "cases"},
    {"experiments", "baselines"},
    {"batches"},
    {"plotting"},
    {"cli"},
]
MODULES = sorted(p.stem for p in (REPO / "rconv").glob("*.py") if p.stem != "__init__")
MAX_MODULE_LINES = 600
MAX_FACADE_LINES = 100


def layer_of(module):
    return next(k for k, layer in enumerate(LAYERS) if module in layer)


def package_imports(module):
    tree = ast.parse((REPO / "rconv" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rconv"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("rconv")}
    return found


def test_every_module_has_a_layer():
    assert set(MODULES) == set().union(*LAYERS)


@pytest.mark.parametrize("module", MODULES)
def test_imports_flow_one_way(module):
    imported = package_imports(module)
    assert "rconv_core" not in imported, "the package never imports its facade"
    upward = {name for name in imported if layer_of(name) >= layer_of(module)}
    assert not upward, f"rconv.{module} imports {sorted(upward)}, which are not above it in ARCHITECTURE.md"


@pytest.mark.parametrize("module", MODULES)
def test_modules_stay_readable(module):
    lines = (REPO / "rconv" / f"{module}.py").read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"rconv/{module}.py has {lines} lines"


def test_the_facade_is_thin_and_explicit():
    source = (REPO / "rconv_core.py").read_text()
    assert source.count("\n") < MAX_FACADE_LINES
    tree = ast.parse(source)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)]
    assert all(not name.startswith("_") for name in rc.__all__)
