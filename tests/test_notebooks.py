"""The notebooks: one literal parameters cell, no algorithm code, and a quick headless run of all of them."""
import ast
import json
import re
import subprocess
import sys

import nbformat
import pandas as pd
import papermill
import pytest

import rconv_core as rc
import run_all
from conftest import REPO
from runner import notebooks
from runner.summary import notebook_link

NOTEBOOK_PATHS = sorted(p for folder in ("Various_settings", "Testing", "Experiments")
                        for p in (REPO / folder).glob("*.ipynb") if not p.name.startswith("."))
COLUMNS = {"dataset", "model", "activations", "dtype", "first_layer", "index", "label", "mse", "psnr", "ssim",
           "max_abs_err", "exact", "seconds"}


EXPERIMENT_COLUMNS = {"Precision": {"dtype", "first_layer", "relu_test", "psnr", "ssim", "exact", "seed", "index"},
                      "Defences": {"defence", "strength", "project", "psnr", "ssim", "exact", "index"},
                      "Filters": {"position", "filters", "seed", "index", "rank", "full_rank", "min_filters"},
                      "Success_rates": {"model", "seed", "index", "dtype", "exact", "rank_deficient", "psnr"},
                      "Baselines": {"dataset", "model", "method", "index", "psnr", "ssim", "seconds"},
                      "High_resolution": {"size", "model", "dtype", "index", "start", "exact", "psnr",
                                          "max_abs_err", "seconds", "peak_mb", "verdict", "methods", "reason"},
                      "Batches": {"dataset", "model", "method", "dtype", "batch_size", "index", "label",
                                  "recovered_label", "image_exact", "psnr", "max_abs_err", "max_batch",
                                  "within_bound", "reason"},
                      "Federated": {"dataset", "model", "scenario", "lr", "local_steps", "noise_multiplier",
                                    "max_grad_norm", "epsilon", "method", "client", "index", "label",
                                    "recovered_label", "image_exact", "psnr", "max_abs_err", "reason"},
                      "Real_networks": {"network", "dataset", "counting", "dtype", "index", "outcome", "reason", "psnr",
                                        "ig_psnr", "seconds", "ig_seconds"}}
# Every notebook runs without the optional breaching package (Baselines then runs R-CONV alone); Federated's
# clients are Flower's and Opacus's, so it needs the federated extra.
QUICK_NAMES = [name for name in run_all.NOTEBOOKS if name != "Federated" or not rc.flower_missing()]
TEMPLATED = [name for name, entry in run_all.NOTEBOOKS.items() if "template" in entry]
# The reference notebooks' step-by-step images (dataset, index) per Various_settings architecture.
REFERENCE_IMAGES = {"LeNet": ("cifar100", 12), "LeNet_O": ("cifar100", 12), "LeNet_4_ReLU": ("cifar100", 12),
                    "O_CNN6": ("cifar10", 6), "LeNet_All_ReLU": ("cifar100", 2)}


@pytest.mark.parametrize("name", TEMPLATED, ids=str)
def test_templated_notebooks_are_what_their_template_renders(name):
    """Edit templates/ and notebooks.toml, not the notebooks: `python run_all.py --render` rewrites them."""
    stored = nbformat.read(REPO / run_all.NOTEBOOKS[name]["path"], as_version=4)
    baked = stored.metadata.get("papermill", {}).get("parameters")  # what a run baked into its parameters cell
    rendered = notebooks.render(name, baked)
    assert notebooks.sources(stored) == notebooks.sources(rendered), \
        f"{name} differs from its template: edit the template, then run `python run_all.py --render`"


def test_every_notebook_is_run_by_run_all():
    listed = {REPO / entry["path"] for entry in run_all.NOTEBOOKS.values()}
    assert listed == set(NOTEBOOK_PATHS)


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged parameters"
    for statement in ast.parse(tagged[0].source).body:  # literals only: papermill overrides literals
        assert isinstance(statement, ast.Assign), ast.dump(statement)
        ast.literal_eval(statement.value)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert "find_spec(\"rconv_core\")" in code[0].source, "the first code cell is the setup cell"
    installs = [c.source for c in code[1:] if re.search(r"\bpip\b|subprocess", c.source)]
    assert not installs, "only the setup cell may install, and only the suite, only in Colab"
    for cell in code:
        tree = ast.parse(cell.source)
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))], \
            "notebooks call rconv_core; functions and classes belong there"
    inspected = papermill.inspect_notebook(str(path))
    quick = next(v["quick"] for v in run_all.NOTEBOOKS.values() if REPO / v["path"] == path)
    assert set(quick) | {"results_dir", "data_root"} <= set(inspected)


def repository_address():
    """The suite's one address: pyproject's [project.urls] Repository."""
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_the_notebooks_and_the_readme_derive_from_the_one_repository_address():
    address = repository_address()
    setup_cells = {next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
                   for path in NOTEBOOK_PATHS}
    assert len(setup_cells) == 1, "every notebook opens with the same setup cell"
    sources = "\n".join(c.source for path in NOTEBOOK_PATHS for c in nbformat.read(path, as_version=4).cells)
    assert set(re.findall(r"git\+https://[^\s\"'`]+", sources)) == {f"git+{address}.git"}, \
        f"pyproject.toml says {address}: replace the notebooks' old address in their setup cell"
    readme = (REPO / "README.md").read_text()
    assert f"git+{address}.git" in readme
    owner_and_name = address.removeprefix("https://github.com/")
    badges = re.findall(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                        r"\(https://colab\.research\.google\.com/github/([^)]+)\)", readme)
    assert sorted(badges) == sorted(f"{owner_and_name}/blob/main/{path.relative_to(REPO).as_posix()}"
                                    for path in NOTEBOOK_PATHS), "one Colab badge per notebook, from the address"


def test_various_settings_default_to_the_reference_images():
    for name, (dataset, index) in REFERENCE_IMAGES.items():
        defaults = {key: ast.literal_eval(value["default"]) for key, value in
                    papermill.inspect_notebook(str(REPO / "Various_settings" / f"{name}.ipynb")).items()}
        assert (defaults["dataset"], defaults["image_index"]) == (dataset, index), name
    all_relu = papermill.inspect_notebook(str(REPO / "Various_settings" / "LeNet_All_ReLU.ipynb"))
    assert {"gradients", "hybrid"} <= set(ast.literal_eval(all_relu["example_first_layers"]["default"]))


def test_stored_notebooks_hold_outputs_from_run_all():
    for path in NOTEBOOK_PATHS:
        notebook = nbformat.read(path, as_version=4)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert any(c.outputs for c in code), f"{path.name} is stored without outputs; run `make run`"
        assert all(c.execution_count is None for c in code), f"{path.name} was not cleaned by run_all"
        assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
        streams = [o for c in code for o in c.outputs if o.get("output_type") == "stream"]
        assert not any("\r" in o["text"] for o in streams), f"{path.name} keeps every progress-bar redraw"
        assert all(a["name"] != b["name"] for c in code for a, b in zip(c.outputs, c.outputs[1:])
                   if a.get("output_type") == b.get("output_type") == "stream"), f"{path.name}: streams not merged"
        assert "/work/" not in json.dumps(notebook.metadata), f"{path.name} stores a machine's absolute path"


def test_no_stored_notebook_keeps_an_injected_parameters_cell():
    """papermill's injected cell would silently override what a reader edits in the parameters cell."""
    for path in NOTEBOOK_PATHS:
        notebook = nbformat.read(path, as_version=4)
        assert not [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])], path.name


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda path: path.name)
def test_no_stored_notebook_reads_images_from_one_machine_s_folder(path):
    """A reader's copy finds its images through $RCONV_DATA or a download, never through the folder of the
    machine that ran it (a `--data-root` run bakes one in; the stored notebooks keep None)."""
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    values = {node.targets[0].id: node.value for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)}
    assert ast.literal_eval(values["data_root"]) is None, f"{path.name} stores data_root = {ast.unparse(values['data_root'])}"


def test_injected_parameters_are_baked_into_the_parameters_cell():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('n_images = 100  # first n images\nname = "caf\u00e9"  # a label\nseed = 50\n',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('# Parameters\nn_images = 3\nname = "x"\nresults_dir = "out/x"\n',
                                  metadata={"tags": ["injected-parameters"]}),
        nbformat.v4.new_code_cell("print(n_images)")])
    notebooks.bake_parameters(notebook)
    assert [c.source for c in notebook.cells] == [
        'n_images = 3  # first n images\nname = "x"  # a label\nseed = 50\n\nresults_dir = "out/x"', "print(n_images)"]


def test_the_machine_s_paths_are_scrubbed_from_outputs():
    output = dict(output_type="stream", name="stderr",
                  text="/opt/env/lib/python3.11/site-packages/torch/jit/_script.py:9: Warning\n"
                       f"in {run_all.ROOT}/results\n"
                       f"{run_all.ROOT} and {run_all.ROOT}x")
    notebooks.scrub_output(output)
    assert output["text"] == (f"site-packages/torch/jit/_script.py:9: Warning\nin results\n. and {run_all.ROOT}x")
    data = dict(output_type="display_data", data={"text/plain": f"{run_all.ROOT}/a", "image/png": "iVBOR/x/y/"})
    notebooks.scrub_output(data)
    assert data["data"] == {"text/plain": "a", "image/png": "iVBOR/x/y/"}


# An absolute path of two folders or more (in text outputs: images are base64, where '/' is a letter).
ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/<-])/(?:[\w.-]+/){2,}")


def test_stored_outputs_hold_no_absolute_paths():
    for path in NOTEBOOK_PATHS:
        for cell in nbformat.read(path, as_version=4).cells:
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                texts = [output.get("text", "")] + [value for mime, value in data.items() if mime.startswith("text/")]
                found = [m.group(0) for text in texts for m in ABSOLUTE_PATH.finditer("".join(text))]
                assert not found, f"{path.name} stores the machine's paths {found[:3]}"


def test_results_readme_links_reach_the_notebooks(tmp_path):
    stored = notebook_link("Various_settings/LeNet.ipynb", in_place=True)
    assert (REPO / "results" / stored).resolve() == REPO / "Various_settings/LeNet.ipynb"
    executed = notebook_link("Testing/Test_on_MNIST.ipynb", in_place=False)
    assert executed == "notebooks/Testing/Test_on_MNIST.ipynb"


@pytest.mark.slow
@pytest.mark.notebooks
def test_progress_bar_redraws_settle_to_their_final_state(tmp_path):
    """run_all has nbclient coalesce each cell's streams: a terminal's final state, one output per stream."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import sys\nfrom IPython.display import display\n"
        "sys.stderr.write('a:  10%\\r'); sys.stderr.flush()\n"
        "sys.stderr.write('a: 100%\\nb:  50%\\rb: 100%\\n'); sys.stderr.flush()\n"
        "display('a figure')\nprint('done')")])
    notebook.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(notebook, tmp_path / "bars.ipynb")
    (tmp_path / "stage").mkdir()
    job = run_all._Job("bars", str(tmp_path / "bars.ipynb"), tmp_path / "stage", tmp_path / "results",
                       tmp_path / "out.ipynb", {"results_dir": str(tmp_path / "stage" / "results")})
    assert run_all._execute(job, cell_timeout=60, kernels={}).ok
    settled = nbformat.read(tmp_path / "stage" / "notebook.ipynb", as_version=4).cells[-1].outputs
    assert [o["output_type"] for o in settled] == ["stream", "display_data", "stream"]
    assert settled[0]["text"] == "a: 100%\nb: 100%\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, packs):
    results = tmp_path_factory.mktemp("quick")
    only = [argument for name in QUICK_NAMES for argument in ("--only", name)]
    done = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--quick", "--results-dir", str(results),
                           "--data-root", str(packs), "--jobs", "2", *only], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    return results, done


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.parametrize("name", QUICK_NAMES, ids=str)
def test_quick_run_executes_every_notebook(quick_run, name):
    results, done = quick_run
    assert f"FAILED: {name} " not in done.stderr, done.stderr[-3000:]
    path, subfolder, quick = (run_all.NOTEBOOKS[name][key] for key in ("path", "results", "quick"))
    executed = nbformat.read(results / "notebooks" / path, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is None for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs), name
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} shows no figure"
    table = pd.read_csv(results / subfolder / "metrics.csv")
    if name in run_all.EXPERIMENTS:
        assert EXPERIMENT_COLUMNS[name] <= set(table.columns) and len(table) > 0, name
        assert (results / subfolder / "summary.csv").exists()
    else:
        assert COLUMNS <= set(table.columns), name
        assert len(table) == quick["n_images"] * 2, name
        assert (results / subfolder / "psnr.png").exists()
    parameters = next(c for c in executed.cells if "parameters" in c.metadata.get("tags", [])).source
    assert not [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])], name
    baked = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(parameters).body}
    assert {key: baked[key] for key in quick} == quick, f"{name}: quick values baked into its parameters cell"


@pytest.mark.slow
@pytest.mark.notebooks
def test_quick_run_summarises_every_notebook(quick_run):
    results, done = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    summary = pd.read_csv(results / "summary.csv")
    assert set(summary.notebook) == set(run_all.NOTEBOOKS) - set(run_all.EXPERIMENTS)
    readme = (results / "README.md").read_text()
    for link in re.findall(r"\]\((notebooks/[^)]+\.ipynb)\)", readme):
        assert (results / link).exists(), f"results/README.md links to {link}, which is not there"
    assert "| notebook |" in (results / "README.md").read_text()
    assert "## Experiments" in (results / "README.md").read_text()
    tables = [pd.read_csv(path, keep_default_na=False) for path in results.rglob("metrics.csv")]
    judged = pd.concat([t for t in tables if {"exact", "reason"} <= set(t.columns)], ignore_index=True)
    not_exact = judged[~judged.exact.astype(str).eq("True")]
    assert len(not_exact) > 0, "the quick run has attacks that fail (Precision's half precisions), to check"
    assert (not_exact.reason.str.len() > 0).all(), "every not-exact row of every table says why"
    stored = nbformat.read(REPO / run_all.NOTEBOOKS["LeNet"]["path"], as_version=4)
    assert "quick" not in json.dumps(stored.metadata), "--results-dir must leave stored notebooks alone"


@pytest.mark.slow
@pytest.mark.notebooks
def test_run_all_reports_the_failing_notebook_and_cell(tmp_path, monkeypatch, capsys, packs):
    entry = run_all.NOTEBOOKS["Test_on_CIFAR10"]
    monkeypatch.setitem(run_all.NOTEBOOKS, "Test_on_CIFAR10", dict(entry, quick=dict(entry["quick"], model="resnet")))
    status = run_all.main(["--only", "Test_on_CIFAR10", "--quick", "--results-dir", str(tmp_path),
                           "--data-root", str(packs)])
    assert status == 1
    assert "FAILED: Test_on_CIFAR10 at cell" in capsys.readouterr().err
    assert not (tmp_path / "notebooks" / entry["path"]).exists()


def test_run_all_list_and_unknown_names(capsys):
    assert run_all.main(["--list"]) == 0
    assert "Test_on_CIFAR100" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_all.main(["--only", "Nope"])
    assert "unknown notebook Nope" in capsys.readouterr().err


def test_quick_runs_never_overwrite_the_stored_notebooks(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--only", "LeNet"])
    assert "give --results-dir" in capsys.readouterr().err
