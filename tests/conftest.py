"""Shared fixtures and helpers: the sample packs, the networks and gradients many tests attack, and the attack."""
import math
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

import rconv_core as rc
from rconv.cases.data import data_place

REPO = Path(__file__).resolve().parents[1]


def _packs_root():
    for candidate in (os.environ.get("RCONV_DATA"), REPO.parent / "shared" / "datasets"):
        if candidate and (data_place(candidate) / "cifar10_train_first100.npz").exists():
            return data_place(candidate)
    return None


@pytest.fixture(scope="session")
def packs():
    """The folder of the offline sample packs (first 100 training images); skips when absent."""
    root = _packs_root()
    if root is None:
        pytest.skip("no sample packs: set RCONV_DATA to a folder with <dataset>_train_first100.npz")
    return root


@pytest.fixture(scope="session")
def samples():
    """The first four bundled sample photos and their labels (no data needed)."""
    images, labels = rc.load_images("samples", range(4))
    return images, labels


@pytest.fixture
def offline(monkeypatch):
    """No $RCONV_DATA, and a check that nothing created data/ in the repository."""
    monkeypatch.delenv("RCONV_DATA", raising=False)
    existed = (REPO / "data").exists()
    yield
    assert (REPO / "data").exists() == existed, "loading images created data/ in the repository"


# The networks and gradients many units' tests attack. Session-wide: a test that changes a model's weights
# or dtype builds its own (or a deep copy) instead.

@pytest.fixture(scope="session")
def cifar_image():
    """A random 3 x 32 x 32 image in [0, 1] (seed 7), the size of a CIFAR image."""
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def lenet():
    """The paper's LeNet (preset "lenet") for 3-channel images and 10 classes."""
    return rc.build_model("lenet", 3, 10)


@pytest.fixture(scope="session")
def lenet_grads(lenet, cifar_image):
    """lenet's float64 gradients on cifar_image with label 2."""
    return rc.client_gradients(lenet, cifar_image, 2, dtype=torch.float64)


@pytest.fixture(scope="session")
def lenet_c10():
    """The paper's CIFAR10 network of its Testing notebooks (preset "lenet_c10")."""
    return rc.build_model("lenet_c10", 3, 10)


@pytest.fixture(scope="session")
def lenet_c10_grads(lenet_c10, cifar_image):
    """lenet_c10's float64 gradients on cifar_image with label 3."""
    return rc.client_gradients(lenet_c10, cifar_image, 3, dtype=torch.float64)


@pytest.fixture(scope="session")
def lenet_c10_cache():
    """What depends only on lenet_c10's weights, shared between its reconstructions (reconstruct's cache)."""
    return {}


PACK = "cifar10_train_first100.npz"


def corrupt_pack(folder):
    """A CIFAR10 sample pack in `folder` whose bytes are no zip archive; returns its path."""
    folder.mkdir()
    (folder / PACK).write_bytes(b"these bytes are not a zip archive " * 20)
    return folder / PACK


def max_error(result, image):
    """The largest absolute pixel error of a Reconstruction against the image it should be."""
    return float((result.image - image.double().reshape(result.image.shape)).abs().max())


def attack(model, image, label=0, dtype=torch.float64, **options):
    """reconstruct() on the client's gradients of one image."""
    grads = rc.client_gradients(model, image, label, dtype=dtype)
    return rc.reconstruct(model, grads, tuple(image.shape[-3:]), **options)


def uniform_init(model, seed=0, low=-0.5, high=0.5):
    """Every parameter of `model` drawn from U(low, high), as the paper initialises its networks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(low, high, generator=generator)
    return model


def federated_table():
    """A federated study's metrics as federated_round writes them: two plain settings, two private ones."""
    rows = []
    for scenario, lr, steps, noise, epsilon, method, psnr, exact in [
            ("fedsgd", 0.1, 1, 0.0, math.inf, "rconv", 95.0, True), ("fedsgd", 0.001, 1, 0.0, math.inf, "rconv", 40.0, False),
            ("fedavg", 0.1, 2, 0.0, math.inf, "rconv", 3.0, False),
            ("dp_sgd", 0.1, 1, 0.0, math.inf, "rconv", 75.0, False),
            ("dp_sgd", 0.1, 1, 0.0, math.inf, "inverting_gradients", 5.0, False),
            ("dp_sgd", 0.1, 1, 1e-6, 5.5e11, "rconv", math.nan, False),
            ("dp_sgd", 0.1, 1, 1e-6, 5.5e11, "inverting_gradients", 4.0, False)]:
        for member in range(2):
            rows.append(dict(scenario=scenario, lr=lr, local_steps=steps, noise_multiplier=noise,
                             max_grad_norm=0.2 if scenario == "dp_sgd" else math.nan, epsilon=epsilon, method=method,
                             psnr=psnr, image_exact=exact, seconds=1.0, member=member))
    return pd.DataFrame(rows)


def unpadded_stride_two(filters=128):
    """conv(3->12, 3x3, padded) + LeakyReLU, conv(12->filters, 3x3, stride 2, unpadded) + ReLU, Linear: the second
    layer's 16-px input has a last row and column that no kernel position reaches."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, 1, 1), torch.nn.LeakyReLU(0.2),
                               torch.nn.Conv2d(12, filters, 3, 2, 0), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(filters * 7 * 7, 10))
