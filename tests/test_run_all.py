"""run_all.py never loses results: each case runs in a temporary copy of the repository, so that the
stored results are never at risk. A notebook that fails, a Ctrl-C, or a folder it must not touch
leaves everything as it was."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import pandas as pd
import pytest

import run_all
from conftest import REPO
from rconv.common.environment import current_environment
from runner.folders import results_folder



# What run_all executes for Test_on_CIFAR10 (its stored notebook is what this renders): the cases below change it.
TESTING_TEMPLATE = "templates/testing.ipynb"


def copy_repository(target):
    """What run_all needs to run the Testing notebooks in place: the code, its registry and templates, those
    notebooks and results/."""
    target.mkdir()
    for name in ("run_all.py", "rconv_core.py", "notebooks.toml"):
        shutil.copy2(REPO / name, target / name)
    for folder in ("rconv", "runner", "templates", "Testing", "results"):
        shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns(
            "__pycache__", run_all.LOCK, f"{run_all.STAGING}*"))
    return target


@pytest.fixture
def repo(tmp_path):
    return copy_repository(tmp_path / "repo")


def snapshot(repo):
    """Hash of every stored result and notebook: results/ (but the lock and staging folders) and the Testing
    notebooks."""
    files = [p for p in (repo / "results").rglob("*") if p.is_file() and p.name != run_all.LOCK
             and not any(part.startswith(run_all.STAGING) for part in p.parts)]
    files += sorted((repo / "Testing").glob("*.ipynb"))
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(repo):
    """Staging folders and half-placed notebooks a run left behind."""
    return sorted(str(p.relative_to(repo)) for p in repo.rglob("*")
                  if p.name.startswith(run_all.STAGING) or ".staged-" in p.name)


def run_all_in(repo, *argv, **options):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "run_all.py", *argv], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=options.get("timeout", 300))


def set_parameters(notebook_path, **values):
    """Change literals of a notebook's parameters cell (in the copy)."""
    notebook = nbformat.read(notebook_path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    lines = cell.source.split("\n")
    for name, value in values.items():
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        lines[index] = f"{name} = {value!r}"
    cell.source = "\n".join(lines)
    nbformat.write(notebook, notebook_path)


# A small stand-in for a Testing notebook: a metrics table as the suite writes it, then `after`.
FAKE_METRICS = ("dataset,model,first_layer,dtype,index,psnr,ssim,exact,rank_deficient,seconds\\n"
                "cifar10,lenet_c10,hybrid,float64,0,250.0,1.0,True,False,0.5\\n"
                "cifar10,lenet_c10,hybrid,float32,0,100.0,1.0,True,False,0.5\\n")


def fake_notebook(path, after=""):
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('results_dir = "results/testing/cifar10"\nn_images = 100\n'
                                           'data_root = None')
    parameters.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "from pathlib import Path\nimport time\nout = Path(results_dir)\nout.mkdir(parents=True, exist_ok=True)\n"
        f'(out / "metrics.csv").write_text("{FAKE_METRICS}")\n(out / "psnr.png").write_bytes(b"new figure")\n'
        f"{after}")
    notebook.cells = [parameters, body]
    notebook.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    nbformat.write(notebook, path)


def wait_for(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_notebook_failing_after_its_csv_changes_nothing(repo, packs):
    """Test_on_CIFAR10 fails in a cell after it has written metrics.csv: nothing stored changes."""
    set_parameters(repo / TESTING_TEMPLATE, n_images=3, dtypes=["torch.float64"])
    before = snapshot(repo)
    done = run_all_in(repo, "--only", "Test_on_CIFAR10", "--data-root", str(packs.resolve()))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "FAILED: Test_on_CIFAR10 at cell" in done.stderr and "KeyError" in done.stderr
    assert snapshot(repo) == before, "a failed notebook changed the stored results or notebook"
    kept = [p for p in (repo / "results").glob(f"{run_all.STAGING}Test_on_CIFAR10-*")]
    assert len(kept) == 1 and str(kept[0].relative_to(repo)) in done.stderr
    assert len(pd.read_csv(kept[0] / "results" / "metrics.csv")) == 3, "the cell failed after the CSV was written"


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_notebook_that_succeeds_replaces_its_results_together(repo):
    fake_notebook(repo / TESTING_TEMPLATE)
    before = snapshot(repo)
    old_summary = pd.read_csv(repo / "results" / "summary.csv")
    old_environments = json.loads((repo / "results" / "environment.json").read_text())
    done = run_all_in(repo, "--only", "Test_on_CIFAR10")
    assert done.returncode == 0, done.stderr[-2000:]
    after = snapshot(repo)
    changed = {name for name in after if after[name] != before.get(name)}
    # The notebook's entry in environment.json records where it ran: it changes only on another machine.
    environments = json.loads((repo / "results" / "environment.json").read_text())
    assert environments.pop("Test_on_CIFAR10") == current_environment()
    assert environments == {k: v for k, v in old_environments.items() if k != "Test_on_CIFAR10"}
    moved = {"results/environment.json"} if old_environments["Test_on_CIFAR10"] != current_environment() else set()
    assert changed == {"results/testing/cifar10/metrics.csv", "results/testing/cifar10/psnr.png",
                       "results/summary.csv", "results/README.md", "Testing/Test_on_CIFAR10.ipynb"} | moved
    assert set(before) - set(after) == {"results/testing/cifar10/grid_float32.png",
                                        "results/testing/cifar10/grid_float64.png"}, "the old subfolder is replaced"
    summary = pd.read_csv(repo / "results" / "summary.csv")
    assert summary[summary.notebook == "Test_on_CIFAR10"].images.tolist() == [1, 1]
    pd.testing.assert_frame_equal(summary[summary.notebook != "Test_on_CIFAR10"].reset_index(drop=True),
                                  old_summary[old_summary.notebook != "Test_on_CIFAR10"].reset_index(drop=True))
    old_readme = [line for line in (REPO / "results" / "README.md").read_text().splitlines()
                  if "[Test_on_CIFAR10]" not in line]
    readme = (repo / "results" / "README.md").read_text().splitlines()
    assert [line for line in readme if "[Test_on_CIFAR10]" not in line] == old_readme
    assert "| [Test_on_CIFAR10](../Testing/Test_on_CIFAR10.ipynb) | cifar10 | lenet_c10 | hybrid | 1 | 1 | 1 |" \
        " 250.0 | 100.0 | 0.500 | [psnr](testing/cifar10/psnr.png) |" in readme
    stored = (repo / "Testing" / "Test_on_CIFAR10.ipynb").read_text()
    assert run_all.STAGING not in stored
    assert json.loads(stored)["metadata"]["papermill"]["parameters"]["results_dir"] == "results/testing/cifar10"
    assert leftovers(repo) == []


@pytest.mark.slow
@pytest.mark.notebooks
def test_ctrl_c_leaves_everything_as_it_was_and_the_lock_holds(repo):
    fake_notebook(repo / TESTING_TEMPLATE, after="time.sleep(120)")
    before = snapshot(repo)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running = subprocess.Popen([sys.executable, "run_all.py", "--only", "Test_on_CIFAR10"], cwd=repo, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: list((repo / "results").glob(f"{run_all.STAGING}*/results/psnr.png")), 60), \
            "the notebook never wrote its staged results"
        second = run_all_in(repo, "--only", "Test_on_CIFAR10")
        assert second.returncode == 2 and f"another run_all.py (process {running.pid})" in second.stderr
        running.send_signal(signal.SIGINT)
        _, err = running.communicate(timeout=60)
    finally:
        running.kill()
    assert running.returncode == run_all.INTERRUPTED, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert snapshot(repo) == before
    assert leftovers(repo) == []


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_hung_cell_fails_its_notebook_and_names_the_cell(repo):
    fake_notebook(repo / TESTING_TEMPLATE, after="time.sleep(120)")
    before = snapshot(repo)
    done = run_all_in(repo, "--only", "Test_on_CIFAR10", "--cell-timeout", "3", timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "FAILED: Test_on_CIFAR10 at cell 2 (CellTimeoutError" in done.stderr  # after papermill's injected cell
    assert snapshot(repo) == before


@pytest.mark.slow
@pytest.mark.notebooks
def test_two_runs_of_one_notebook_do_not_share_a_path(repo, tmp_path):
    fake_notebook(repo / TESTING_TEMPLATE, after="time.sleep(2)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = [tmp_path / "first", tmp_path / "second"]
    runs = [subprocess.Popen([sys.executable, "run_all.py", "--quick", "--only", "Test_on_CIFAR10", "--results-dir",
                              str(out)], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for out in outs]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err[-2000:]
    for out in outs:
        assert (out / "testing" / "cifar10" / "metrics.csv").read_text() == FAKE_METRICS.replace("\\n", "\n")
        assert (out / "notebooks" / "Testing" / "Test_on_CIFAR10.ipynb").exists()
        assert json.loads((out / run_all.MARKER).read_text()) == {"kind": "quick"}
        assert "These are quick results" in (out / "README.md").read_text()


REFUSED = {
    "the repository itself": (["--quick", "--only", "Test_on_MNIST", "--results-dir", "."],
                              "is not empty and is not a results folder of run_all.py"),
    "quick into the stored results": (["--quick", "--only", "Test_on_MNIST", "--results-dir", "results"],
                                      "a quick run never writes into results/"),
    "quick inside the stored results": (["--quick", "--only", "Test_on_MNIST", "--results-dir", "results/testing"],
                                        "lies inside the results folder"),
    "a folder that is not run_all's": (["--only", "Test_on_MNIST", "--results-dir", "Testing"],
                                       "is not empty and is not a results folder of run_all.py"),
    "unwritable": (["--quick", "--only", "Test_on_MNIST", "--results-dir", "/proc/x"],
                   "cannot write results to /proc/x"),
    "a file": (["--quick", "--only", "Test_on_MNIST", "--results-dir", "run_all.py"], "is a file, not a folder"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_run_all_refuses_results_folders_it_must_not_touch(repo, case):
    argv, problem = REFUSED[case]
    if "/proc" in argv and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    before = snapshot(repo)
    top = sorted(p.name for p in repo.iterdir())
    done = run_all_in(repo, *argv, timeout=60)
    assert done.returncode == 2 and problem in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(repo) == before and sorted(p.name for p in repo.iterdir()) == top
    assert not (repo / run_all.LOCK).exists() and not (repo / "Testing" / run_all.MARKER).exists()


def test_run_all_keeps_quick_and_full_results_apart(tmp_path, capsys):
    for held, argv in (("quick", []), ("full", ["--quick"])):
        folder = tmp_path / held
        folder.mkdir()
        (folder / run_all.MARKER).write_text(json.dumps({"kind": held}))
        with pytest.raises(SystemExit):
            run_all.main([*argv, "--only", "Test_on_MNIST", "--results-dir", str(folder)])
        assert f"holds {held} results" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == [run_all.MARKER]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / run_all.MARKER).write_text("{not json")
    with pytest.raises(SystemExit):
        run_all.main(["--quick", "--only", "Test_on_MNIST", "--results-dir", str(tmp_path / "broken")])
    assert "cannot be read" in capsys.readouterr().err


def test_run_all_lock_refuses_a_second_run(tmp_path, capsys):
    with results_folder(tmp_path / "results", "quick"):
        with pytest.raises(SystemExit):
            run_all.main(["--quick", "--only", "Test_on_MNIST", "--results-dir", str(tmp_path / "results")])
    assert f"another run_all.py (process {os.getpid()}) is writing to" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted([run_all.LOCK, run_all.MARKER])
