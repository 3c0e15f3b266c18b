import os
from pathlib import Path

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
    images, labels = rc.load_images("samples", range(4))
    return images, labels


def max_error(result, image):
    return float((result.image - image.double().reshape(result.image.shape)).abs().max())


def attack(model, image, label=0, dtype=torch.float64, **options):
    grads = rc.client_gradients(model, image, label, dtype=dtype)
    return rc.reconstruct(model, grads, tuple(image.shape[-3:]), **options)


def uniform_init(model, seed=0, low=-0.5, high=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(low, high, generator=generator)
    return model
