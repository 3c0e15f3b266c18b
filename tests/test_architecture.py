"""The package keeps the layering ARCHITECTURE.md describes, and its modules stay readable."""
import ast

import pytest

import rconv_core as rc
from conftest import REPO

# ARCHITECTURE.md's sub-packages, top first: a module imports only from sub-packages above its own.
SUBPACKAGES = ["common", "linalg", "cases", "split", "attack", "analysis", "studies", "cli"]
# Within a sub-package, its modules' order, top first: a module imports only from the sets above its own.
MODULE_LAYERS = {
    "common": [{"errors", "paths", "progress", "environment", "optional"}, {"checks", "geometry"}],
    "linalg": [{"sparse", "memory", "krylov"}, {"solvers"}],
    "cases": [{"networks"}, {"models", "data", "client", "updates", "privacy", "flower"}, {"setup"}],
    "split": [{"vertices"}, {"search"}, {"linear"}],
    "attack": [{"constraints", "graph", "folding", "bias_free", "refined"}, {"network"},
               {"tolerances", "activations", "equations", "bounds", "tangents", "preconditioning", "nullspace",
                "pooling", "joint"}, {"estimate"},
               {"systems"}, {"train_norm"},
               {"steps"}, {"batch_steps"}, {"reconstruct"}],
    "analysis": [{"reports"}, {"summaries"}, {"plotting"}],
    "studies": [{"executors", "findings"}, {"experiments", "baselines"}, {"batches", "federated", "real_networks"}],
    "cli": [{""}],
}
MODULES = sorted(".".join(p.relative_to(REPO / "rconv").with_suffix("").parts)
                 for p in (REPO / "rconv").rglob("*.py") if p.stem != "__init__")
PYTHON_FILES = sorted(p for p in REPO.rglob("*.py") if ".venv" not in p.parts and not p.name.startswith("."))
MAX_MODULE_LINES = 600
MAX_FACADE_LINES = 100


def rank_of(module):
    """(sub-package's place, module's place within it): a module may import only what ranks lower."""
    package, _, name = module.partition(".")
    place = next(k for k, layer in enumerate(MODULE_LAYERS[package]) if name in layer)
    return SUBPACKAGES.index(package), place


def package_imports(module):
    """The package's modules that `module` imports, as dotted names below rconv."""
    here = module.split(".")[:-1]
    tree = ast.parse((REPO / "rconv" / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - node.level + 1]
            found.add(".".join(base + (node.module or "").split(".")).strip("."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rconv"):
            found.add(node.module.removeprefix("rconv").strip("."))
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("rconv.") for alias in node.names if alias.name.startswith("rconv")}
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        assert rank_of(module) is not None


@pytest.mark.parametrize("module", MODULES)
def test_imports_flow_one_way(module):
    imported = package_imports(module)
    assert "rconv_core" not in imported, "the package never imports its facade"
    upward = {name for name in imported if rank_of(name) >= rank_of(module)}
    assert not upward, f"rconv.{module} imports {sorted(upward)}, which are not above it in ARCHITECTURE.md"


@pytest.mark.parametrize("path", PYTHON_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_python_files_stay_readable(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines"


def test_the_facade_is_thin_and_explicit():
    source = (REPO / "rconv_core.py").read_text()
    assert source.count("\n") < MAX_FACADE_LINES
    tree = ast.parse(source)
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)]
    assert all(not name.startswith("_") for name in rc.__all__)
