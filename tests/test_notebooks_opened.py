"""The notebooks as people open them: Jupyter in their own folder, with edited parameters, from a fresh clone
with nothing installed, in Colab, and anywhere else."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import NamedTuple

import nbformat
import pandas as pd
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]
CELL_TIMEOUT = 600  # seconds; a cell that takes longer has hung
# What an install of the suite leaves in site-packages: the editable finder, its .pth, its metadata, or the code.
SUITE_FILES = re.compile(r"^(__editable__.*rconv_suite.*|rconv_suite-.*\.(dist|egg)-info|rconv_core\.py|rconv)$")
# Variables that would hand a kernel the suite, or a setting of the test runner, without the setup cell.
LEAKY_VARIABLES = ("PYTHONPATH", "RCONV_SUITE", "COLAB_RELEASE_TAG", "RCONV_DATA", "PIP_NO_INDEX")


class FreshVenv(NamedTuple):
    python: Path
    site_packages: Path
    kernels: Path  # a folder of Jupyter kernel specs holding "fresh", this venv's kernel


def edited(path, **values):
    """A copy of a notebook whose parameters cell a reader has edited (`name = value` lines rewritten)."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    for name, value in values.items():
        cell.source, count = re.subn(rf"^{name} = [^#\n]*", f"{name} = {value!r}  ", cell.source, flags=re.M)
        assert count == 1, f"{path.name} has no parameter {name}"
    return notebook


def setup_cell(path=REPO / "Various_settings" / "LeNet.ipynb"):
    return next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code").source


def execute(notebook, folder, kernel_manager=None, env=None):
    """Run every cell as Jupyter does, in a kernel whose working directory is `folder`; raises on an error."""
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", km=kernel_manager,
                            resources={"metadata": {"path": str(folder)}})
    client.execute(**({"env": env} if env is not None else {}))
    return notebook


def printed(cell):
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")


def all_text(notebook):
    return json.dumps([c.get("outputs", []) for c in notebook.cells])


def kernel_env(**extra):
    env = {name: value for name, value in os.environ.items() if name not in LEAKY_VARIABLES}
    return dict(env, **extra)


@pytest.fixture
def fresh_venv(tmp_path):
    """A new venv holding requirements.txt's packages but not the suite: what a fresh clone has after
    `pip install -r requirements.txt`.

    Installing torch into a new venv takes minutes and gigabytes, so the new venv's site-packages
    links each package of the project's venv instead, leaving out every trace of the suite's own
    (editable) install.
    """
    if sys.prefix == sys.base_prefix:
        pytest.skip("run from the project's venv (make test): its packages are linked into the fresh one")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                                        check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    assert site_packages != ours
    for entry in ours.iterdir():
        if not SUITE_FILES.match(entry.name):
            (site_packages / entry.name).symlink_to(entry)
    spec = tmp_path / "kernels" / "fresh"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps(dict(
        argv=[str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"], display_name="fresh clone",
        language="python")))
    return FreshVenv(python, site_packages, spec.parent)


def fresh_kernel(venv):
    return KernelManager(kernel_name="fresh", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(venv.kernels)]))


def test_edited_parameters_take_effect(tmp_path, packs):
    """Set n_images and model in the parameters cell and run all: the run uses them (no injected cell overrides)."""
    notebook = edited(REPO / "Testing" / "Test_on_MNIST.ipynb", n_images=2, model="lenet_o", shown=2,
                      data_root=str(packs), results_dir=str(tmp_path / "mnist"))
    execute(notebook, REPO / "Testing")
    table = pd.read_csv(tmp_path / "mnist" / "metrics.csv")
    assert len(table) == 2 * 2, "two images, float64 and float32"
    assert set(table.model) == {"lenet_o"} and sorted(set(table["index"])) == [0, 1]
    assert (tmp_path / "mnist" / "grid_float32.png").exists()


def test_a_fresh_clone_runs_a_notebook_in_place_with_nothing_installed(fresh_venv, tmp_path, packs):
    env = kernel_env(RCONV_DATA=str(packs))
    probe = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import importlib.util\nprint(importlib.util.find_spec('rconv_core'))")])
    execute(probe, REPO / "Various_settings", fresh_kernel(fresh_venv), env)
    assert printed(probe.cells[0]) == "None\n", "the fresh environment must not hold the suite"

    installed = sorted(path.name for path in fresh_venv.site_packages.iterdir())
    notebook = edited(REPO / "Various_settings" / "LeNet.ipynb", n_images=2, example_first_layers=["hybrid"],
                      results_dir=str(tmp_path / "lenet"))
    notebook.cells.append(nbformat.v4.new_code_cell("print(rc.__file__)"))
    execute(notebook, REPO / "Various_settings", fresh_kernel(fresh_venv), env)

    assert printed(notebook.cells[-1]) == f"{REPO / 'rconv_core.py'}\n", "the checkout's own library"
    assert printed(next(c for c in notebook.cells if c.cell_type == "code")) == "", "the setup cell stays quiet"
    assert "Traceback" not in all_text(notebook) and '"error"' not in all_text(notebook)
    assert sorted(path.name for path in fresh_venv.site_packages.iterdir()) == installed, "nothing was installed"
    assert len(pd.read_csv(tmp_path / "lenet" / "metrics.csv")) == 2 * 2
    assert (tmp_path / "lenet" / "psnr.png").exists()


def test_outside_a_checkout_the_setup_cell_says_in_one_sentence_what_to_do(fresh_venv, tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup_cell())])
    execute(notebook, tmp_path, fresh_kernel(fresh_venv), kernel_env())
    [output] = notebook.cells[0].outputs
    assert output.output_type == "stream" and output.text.count("\n") == 1
    assert output.text.startswith("rconv_core is not importable here: open this notebook in a checkout")
    assert "pip install git+https://" in output.text


def test_in_colab_the_setup_cell_installs_the_suite_from_its_address(fresh_venv, tmp_path):
    """Colab: no checkout around the notebook; the cell pip-installs RCONV_SUITE (here a copy of the suite)."""
    suite = tmp_path / "suite"  # what pip would fetch from the repository
    suite.mkdir()
    for name in ("pyproject.toml", "README.md", "rconv_core.py"):
        shutil.copy(REPO / name, suite / name)
    shutil.copytree(REPO / "rconv", suite / "rconv", ignore=shutil.ignore_patterns("__pycache__"))
    content = tmp_path / "content"  # Colab's working directory
    content.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup_cell()), nbformat.v4.new_code_cell(
        "import rconv_core\nprint(rconv_core.__file__)")])
    # offline: the suite's dependencies are all linked in already, and setuptools builds it in place
    env = kernel_env(COLAB_RELEASE_TAG="test", RCONV_SUITE=str(suite), PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    execute(notebook, content, fresh_kernel(fresh_venv), env)
    assert printed(notebook.cells[0]) == ""
    assert printed(notebook.cells[1]) == f"{fresh_venv.site_packages / 'rconv_core.py'}\n"
