"""Faults a careful user runs into (issue 13): each bad input gets one clear RConvError naming the
problem and the file or argument, `project=True` never claims exact for a clipped image, the
command line never prints a traceback for a user mistake, and run_all.py never loses results.

The run_all cases run in a temporary copy of the repository, so that the stored results are never at risk.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import rconv_core as rc
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
