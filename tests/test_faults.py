"""Faults a careful user runs into (issue 13): each bad input gets one clear RConvError naming the
problem and the file or argument, `project=True` never claims exact for a clipped image, the
command line never prints a traceback for a user mistake, and run_all.py never loses results.

The run_all cases run in a temporary copy of the repository, so that the stored results are never at risk.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import rconv_core as rc
import run_all
from conftest import REPO

PACK = "cifar10_train_first100.npz"


@pytest.fixture(scope="module")
def lenet():
    return rc.build_model("lenet_c10", 3, 10)


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def cache():
    """What depends only on lenet's weights, shared between its reconstructions."""
    return {}


@pytest.fixture(scope="module")
def grads(lenet, image):
    return rc.client_gradients(lenet, image, 3, dtype=torch.float64)


@pytest.fixture
def offline(monkeypatch):
    """No $RCONV_DATA, and a check that nothing created data/ in the repository."""
    monkeypatch.delenv("RCONV_DATA", raising=False)
    existed = (REPO / "data").exists()
    yield
    assert (REPO / "data").exists() == existed, "loading images created data/ in the repository"


# ---------------------------------------------------------------------------------------------------------
# Sample packs and load_images

def pack_images(n=5, shape=(32, 32, 3), dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, size=(n, *shape)).astype(dtype)


def write_pack(folder, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / PACK, **arrays)
    return folder / PACK


def valid_pack(folder, n=5):
    return write_pack(folder, images=pack_images(n), labels=-np.ones(n, dtype=np.int64))


def truncated(folder):
    path = valid_pack(folder)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def garbage(folder):
    folder.mkdir()
    (folder / PACK).write_bytes(b"these bytes are not a zip archive " * 20)
    return folder / PACK


def empty(folder):
    folder.mkdir()
    (folder / PACK).write_bytes(b"")
    return folder / PACK


def directory(folder):
    (folder / PACK).mkdir(parents=True)
    return folder / PACK


BAD_PACKS = {
    "truncated": (truncated, "not a readable .npz"),
    "garbage": (garbage, "not a readable .npz"),
    "empty": (empty, "not a readable .npz"),
    "wrong keys": (lambda f: write_pack(f, x=pack_images(), y=np.zeros(5, dtype=np.int64)),
                   r"must hold arrays 'images' and 'labels'; it holds \['x', 'y'\]"),
    "NCHW": (lambda f: write_pack(f, images=pack_images(shape=(3, 32, 32)), labels=np.zeros(5, dtype=np.int64)),
             r"must have shape \(N, H, W, 3\) for cifar10 \(channels last\); got \(5, 3, 32, 32\)"),
    "float images": (lambda f: write_pack(f, images=pack_images(dtype=np.float32), labels=np.zeros(5, dtype=np.int64)),
                     "images must be uint8"),
    "4 channels": (lambda f: write_pack(f, images=pack_images(shape=(32, 32, 4)), labels=np.zeros(5, dtype=np.int64)),
                   r"got \(5, 32, 32, 4\)"),
    "labels out of range": (lambda f: write_pack(f, images=pack_images(), labels=np.array([0, 1, 2, 10, 3])),
                            r"labels must lie in 0..9 for cifar10 \(-1: unknown\); got \[10\]"),
    "labels not one per image": (lambda f: write_pack(f, images=pack_images(), labels=np.zeros(3, dtype=np.int64)),
                                 r"labels must be integers of shape \(5,\)"),
    "directory": (directory, "is a directory, not a .npz file"),
}


@pytest.mark.parametrize("fault", BAD_PACKS)
def test_bad_sample_packs_are_named(fault, tmp_path, offline):
    make, problem = BAD_PACKS[fault]
    path = make(tmp_path / "packs")
    with pytest.raises(rc.RConvError, match=problem) as error:
        rc.load_images("cifar10", [0], root=tmp_path / "packs")
    assert str(path) in str(error.value), "the message names the pack"


def test_a_valid_pack_still_loads(tmp_path, offline):
    valid_pack(tmp_path)
    images, labels = rc.load_images("cifar10", [0, 4], root=tmp_path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 4]


def test_index_past_a_100_image_pack_says_so_and_creates_nothing(tmp_path, offline):
    path = valid_pack(tmp_path, n=100)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(rc.RConvError, match=rf"{PACK} holds only 100 images; index 100 is out of range"):
        rc.load_images("cifar10", [3, 100], root=tmp_path)  # download=True: still no download attempt
    assert sorted(tmp_path.rglob("*")) == before and path.exists()


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "32"])
def test_load_images_refuses_sizes_that_are_no_side(size):
    with pytest.raises(rc.RConvError, match="size must be a whole number of pixels >= 1"):
        rc.load_images("samples", [0], size=size)


@pytest.mark.parametrize("indices", ["5", True, 2.9, [0, "1"], [1.0], np.array([0.5])],
                         ids=["str", "bool", "float", "str in list", "float in list", "float array"])
def test_non_integer_indices_are_refused_not_coerced(indices):
    with pytest.raises(rc.RConvError, match="image indices must be whole numbers"):
        rc.load_images("samples", indices)


def test_integer_indices_of_every_kind_still_work():
    images, _ = rc.load_images("samples", [np.int64(1), torch.tensor(2), 3])
    assert images.shape[0] == 3
    assert rc.load_images("samples", np.int32(4))[0].shape[0] == 1


# ---------------------------------------------------------------------------------------------------------
# client_gradients

@pytest.mark.parametrize("label,problem", [(10, "label 10 is out of range for a model with 10 classes"),
                                           (-1, "label -1 is out of range"),
                                           (2.5, "label must be a whole number"),
                                           ("3", "label must be a whole number"),
                                           (True, "label must be a whole number"),
                                           (torch.tensor(1.0), "label must be a whole number")])
def test_client_gradients_refuses_bad_labels(lenet, image, label, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.client_gradients(lenet, image, label)


def test_client_gradients_refuses_images_the_model_cannot_take(lenet, image):
    with pytest.raises(rc.RConvError, match="the model was built for 32x32 images; the image is 28x28"):
        rc.client_gradients(lenet, torch.rand(3, 28, 28), 1)
    with pytest.raises(rc.RConvError, match="first conv layer takes 3 channels; the image has 1"):
        rc.client_gradients(lenet, torch.rand(1, 32, 32), 1)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    with pytest.raises(rc.RConvError, match=r"the model cannot take an image of shape \(3, 10, 10\)"):
        rc.client_gradients(plain, torch.rand(3, 10, 10), 1)


def test_client_gradients_refuses_int_and_complex(lenet, image):
    for dtype in (torch.int32, torch.complex64):
        with pytest.raises(rc.RConvError, match="real floating dtype"):
            rc.client_gradients(lenet, image, 1, dtype=dtype)
    for bad in ((image * 255).to(torch.uint8), image.to(torch.complex64)):
        with pytest.raises(rc.RConvError, match="the image must be a real floating-point tensor"):
            rc.client_gradients(lenet, bad, 1)


# ---------------------------------------------------------------------------------------------------------
# reconstruct

def test_reconstruct_refuses_missing_gradients(lenet):
    for grads in (None, torch.zeros(3), 5):
        with pytest.raises(rc.RConvError, match="grads must be a list of gradient tensors"):
            rc.reconstruct(lenet, grads, (3, 32, 32))


@pytest.mark.parametrize("shape", ["332", (3, 32.0, 32), (3, "32", 32), (True, 32, 32), None])
def test_reconstruct_refuses_input_shapes_that_are_not_whole_numbers(lenet, grads, shape):
    with pytest.raises(rc.RConvError, match="input_shape must be"):
        rc.reconstruct(lenet, grads, shape)


@pytest.mark.parametrize("relu_tol", [math.nan, math.inf, -1e-3, "0.1"])
def test_reconstruct_refuses_relu_tol_that_is_no_floor(lenet, grads, relu_tol):
    with pytest.raises(rc.RConvError, match="relu_tol must be a finite number >= 0"):
        rc.reconstruct(lenet, grads, (3, 32, 32), relu_tol=relu_tol)


@pytest.mark.parametrize("image_range", [(1, 0), (0.5, 0.5), (0, math.nan), (0,), "01", None, (0, "1")])
def test_reconstruct_validates_image_range(lenet, grads, image_range):
    with pytest.raises(rc.RConvError, match="image_range must be two numbers"):
        rc.reconstruct(lenet, grads, (3, 32, 32), project=True, image_range=image_range)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_sentence(lenet, grads):
    with pytest.raises(rc.RConvError) as error:
        rc.reconstruct(lenet, grads, (3, 32, 32), device="cuda")
    message = str(error.value)
    assert "GPU" in message and "device='cpu'" in message and "\n" not in message
    with pytest.raises(rc.RConvError, match="unknown device 'gpu'"):
        rc.reconstruct(lenet, grads, (3, 32, 32), device="gpu")


def test_mixed_gradient_dtypes_are_named_not_called_a_batch(lenet, grads):
    mixed = list(grads)
    mixed[-1] = mixed[-1].float()
    with pytest.raises(rc.RConvError) as error:
        rc.reconstruct(lenet, mixed, (3, 32, 32))
    message = str(error.value)
    assert "mix dtypes" in message and "9.bias is float32" in message and "batch" not in message


def test_project_never_claims_exact_for_a_clipped_image(lenet, cache):
    normalised = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) - 0.5) * 4  # outside [0, 1]
    grads = rc.client_gradients(lenet, normalised, 1, dtype=torch.float64)
    plain = rc.reconstruct(lenet, grads, (3, 32, 32), cache=cache)
    assert plain.exact and rc.image_metrics(normalised, plain.image)["max_abs_err"] < 1e-9
    clipped = rc.reconstruct(lenet, grads, (3, 32, 32), project=True, cache=cache)
    assert rc.image_metrics(normalised, clipped.image)["max_abs_err"] > 1.0
    assert not clipped.exact
    assert "conv layer 1" in clipped.reasons[0] and "clipped" in clipped.reasons[0]
    assert clipped.layers[0].clipped > 0.1


def test_project_keeps_the_verdict_for_an_image_in_range(lenet, image, cache):
    """Clipping the rounding noise of an image inside image_range costs no exact claim."""
    for dtype in (torch.float64, torch.float32):
        grads = rc.client_gradients(lenet, image, 1, dtype=dtype)
        plain = rc.reconstruct(lenet, grads, (3, 32, 32), cache=cache)
        projected = rc.reconstruct(lenet, grads, (3, 32, 32), project=True, cache=cache)
        assert projected.exact == plain.exact, projected.reasons
    assert projected.layers[0].clipped < 1e-3


# ---------------------------------------------------------------------------------------------------------
# ConvNet, defend, summarize, filter_sweep

@pytest.mark.parametrize("change,problem", [
    (dict(strides=(1, 0)), "conv layer 2: stride must be a whole number >= 1; got 0"),
    (dict(channels=(4, 0)), r"conv layer 2: channels \(filters\) must be a whole number >= 1; got 0"),
    (dict(channels=(-2, 4)), r"conv layer 1: channels \(filters\) must be a whole number >= 1; got -2"),
    (dict(kernel_size=0), "kernel_size must be a whole number >= 1; got 0"),
    (dict(num_classes=0), "num_classes must be a whole number >= 1; got 0"),
    (dict(in_channels=0), "in_channels must be a whole number >= 1; got 0"),
    (dict(padding=-1), "padding must be a whole number >= 0; got -1"),
    (dict(strides=(1, 1.5)), "conv layer 2: stride must be a whole number"),
])
def test_convnet_refuses_sizes_no_layer_can_have(change, problem):
    settings = dict(channels=(4, 4), strides=(1, 1), activations=("relu", "relu"), in_channels=3, num_classes=10)
    with pytest.raises(rc.RConvError, match=problem):
        rc.ConvNet(**{**settings, **change})


@pytest.mark.parametrize("seed", [2 ** 70, 1.5, "50", None])
def test_build_model_refuses_seeds_torch_cannot_take(seed):
    with pytest.raises(rc.RConvError, match="seed must be a whole number"):
        rc.build_model("lenet", seed=seed)


@pytest.mark.parametrize("defence,strength", [("quantize", math.nan), ("quantize", "8"), ("gaussian", "0.1"),
                                              ("gaussian", math.inf), ("topk", None), ("topk", True)])
def test_defend_refuses_strengths_that_are_no_number(grads, defence, strength):
    with pytest.raises(rc.RConvError, match=f"the strength of {defence} must be a finite number"):
        rc.defend(grads, defence, strength)


def test_summarize_refuses_an_empty_table():
    columns = ["dataset", "model", "dtype", "first_layer", "psnr", "ssim", "exact", "seconds"]
    with pytest.raises(rc.RConvError, match="summarize got an empty table"):
        rc.summarize(pd.DataFrame(columns=columns))
    with pytest.raises(rc.RConvError, match=r"missing \['psnr', 'ssim', 'exact', 'seconds'\]"):
        rc.summarize(pd.DataFrame())


@pytest.mark.parametrize("counts", [[0], [4, -1], [], [2.5]])
def test_filter_sweep_refuses_counts_that_are_no_filters(counts):
    with pytest.raises(rc.RConvError, match="counts must be a non-empty list of filter counts"):
        rc.filter_sweep("samples", "lenet", 1, counts, [0], progress=False)


# ---------------------------------------------------------------------------------------------------------
# The command line

def cli(capsys, *argv):
    """Run the command line in this process; returns (exit status, stdout, stderr)."""
    try:
        status = rc.main(list(argv))
    except SystemExit as done:
        status = done.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_names_a_corrupt_pack(tmp_path, capsys, offline):
    path = garbage(tmp_path / "packs")
    status, out, err = cli(capsys, "-d", "cifar10", "-i", "0", "--data-root", str(tmp_path / "packs"),
                           "--out", str(tmp_path / "r.png"))
    assert status == 2 and f"error: sample pack {path} is not a readable .npz" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_cli_checks_out_before_the_attack(capsys):
    status, out, err = cli(capsys, "-d", "samples", "-i", "0", "--out", "/proc/x.png")
    assert status == 2 and "--out /proc/x.png: cannot create files in /proc" in err
    assert out == "", "the attack ran before --out was checked"


def test_cli_never_creates_the_folder_of_out(tmp_path, capsys):
    missing = tmp_path / "nonexistent_dir"
    status, out, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(missing / "x.png"))
    assert status == 2 and f"the folder {missing} does not exist" in err
    assert not missing.exists() and out == ""
    (tmp_path / "file").write_text("")
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(tmp_path / "file" / "x.png"))
    assert status == 2 and "is a file, not a folder" in err
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(tmp_path / "x.unknown"))
    assert status == 2 and "matplotlib cannot write .unknown files" in err


def test_cli_writes_inside_an_existing_folder(tmp_path, capsys):
    folder = tmp_path / "figures"
    folder.mkdir()
    status, out, _ = cli(capsys, "-d", "samples", "-i", "0", "--out", str(folder))
    assert status == 0 and f"saved {folder / 'reconstruction.png'}" in out
    assert (folder / "reconstruction.png").stat().st_size > 0
    assert not folder.with_suffix(".png").exists()


@pytest.mark.parametrize("argv,problem", [(["--dtype", "int8"], "unknown dtype 'int8'"),
                                          (["-i", "-1"], "image indices must be non-negative"),
                                          (["--model", "resnet"], "unknown model 'resnet'"),
                                          (["-d", "imagenet"], "unknown dataset 'imagenet'"),
                                          (["--seed", str(10 ** 30)], "seed must be a whole number")])
def test_cli_user_mistakes_get_one_line(capsys, argv, problem):
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", *argv)
    assert status == 2 and problem in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_prints_no_traceback_for_a_corrupt_pack(tmp_path):
    garbage(tmp_path / "packs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RCONV_DATA", None)
    done = subprocess.run([sys.executable, "-m", "rconv_core", "-d", "cifar10", "--data-root", str(tmp_path / "packs"),
                           "--out", str(tmp_path / "r.png")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "sample pack" in done.stderr


# ---------------------------------------------------------------------------------------------------------
# run_all.py: in a temporary copy of the repository

def copy_repository(target):
    """What run_all needs to run the Testing notebooks in place: the code, those notebooks and results/."""
    target.mkdir()
    for name in ("run_all.py", "rconv_core.py"):
        shutil.copy2(REPO / name, target / name)
    for folder in ("rconv", "Testing", "results"):
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
    """The issue's repro: Test_on_CIFAR10 fails in a cell after it has written metrics.csv."""
    set_parameters(repo / "Testing" / "Test_on_CIFAR10.ipynb", n_images=3, dtypes=["torch.float64"])
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
    fake_notebook(repo / "Testing" / "Test_on_CIFAR10.ipynb")
    before = snapshot(repo)
    old_summary = pd.read_csv(repo / "results" / "summary.csv")
    done = run_all_in(repo, "--only", "Test_on_CIFAR10")
    assert done.returncode == 0, done.stderr[-2000:]
    after = snapshot(repo)
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"results/testing/cifar10/metrics.csv", "results/testing/cifar10/psnr.png",
                       "results/summary.csv", "results/README.md", "Testing/Test_on_CIFAR10.ipynb"}
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
    fake_notebook(repo / "Testing" / "Test_on_CIFAR10.ipynb", after="time.sleep(120)")
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
def test_two_runs_of_one_notebook_do_not_share_a_path(repo, tmp_path):
    fake_notebook(repo / "Testing" / "Test_on_CIFAR10.ipynb", after="time.sleep(2)")
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
    with run_all._results_folder(tmp_path / "results", "quick"):
        with pytest.raises(SystemExit):
            run_all.main(["--quick", "--only", "Test_on_MNIST", "--results-dir", str(tmp_path / "results")])
    assert f"another run_all.py (process {os.getpid()}) is writing to" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted([run_all.LOCK, run_all.MARKER])
