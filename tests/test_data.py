"""Loading images: sample packs, a torchvision-format root, bundled photos, and the offline error."""
import gzip
import struct

import numpy as np
import pytest
import torch

import rconv_core as rc


def test_packs_load_in_the_papers_preprocessing(packs):
    mnist, mnist_labels = rc.load_images("MNIST", range(5), root=packs)
    assert mnist.shape == (5, 1, 32, 32) and mnist.dtype == torch.float32
    assert mnist_labels.tolist() == [5, 0, 4, 1, 9]  # the true MNIST labels
    cifar, cifar_labels = rc.load_images("cifar10", [0, 11, 99], root=packs)
    assert cifar.shape == (3, 3, 32, 32)
    assert 0 <= float(cifar.min()) and float(cifar.max()) <= 1
    assert cifar_labels.tolist() == [0, 1, 9]  # unknown labels: index % 10
    _, labels100 = rc.load_images("Cifar100", [0, 57, 99], root=packs)
    assert labels100.tolist() == [0, 57, 99]
    with np.load(packs / "cifar10_train_first100.npz") as pack:
        raw = pack["images"][11]
    # CIFAR is already 32x32, so the pipeline only rescales to [0, 1]
    assert torch.equal((cifar[1] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(raw))


def test_rconv_data_environment_variable(packs, monkeypatch):
    monkeypatch.setenv("RCONV_DATA", str(packs))
    images, _ = rc.load_images("cifar100", [3])
    assert images.shape == (1, 3, 32, 32)


def write_idx(path, array, kind):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_format_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    pictures = np.random.default_rng(0).integers(0, 256, size=(6, 28, 28))
    labels = np.array([3, 1, 4, 1, 5, 9])
    write_idx(raw / "train-images-idx3-ubyte", pictures, "images")
    write_idx(raw / "train-labels-idx1-ubyte", labels, "labels")
    write_idx(raw / "t10k-images-idx3-ubyte", pictures[:2], "images")
    write_idx(raw / "t10k-labels-idx1-ubyte", labels[:2], "labels")
    images, got = rc.load_images("mnist", [2, 5], root=tmp_path, download=False)
    assert got.tolist() == [4, 9]
    assert images.shape == (2, 1, 32, 32)
    native, _ = rc.load_images("mnist", [2], root=tmp_path, download=False, size=None)
    assert torch.equal((native[0, 0] * 255).round().to(torch.uint8), torch.from_numpy(pictures[2].astype(np.uint8)))


def test_offline_error_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("RCONV_DATA", raising=False)
    with pytest.raises(rc.RConvError) as error:
        rc.load_images("cifar10", [0], root=tmp_path, download=False)
    message = str(error.value)
    assert "RCONV_DATA" in message and str(tmp_path) in message and "cifar10_train_first100.npz" in message


def test_pack_too_short_says_how_many_images_it_holds(packs, monkeypatch):
    monkeypatch.delenv("RCONV_DATA", raising=False)
    with pytest.raises(rc.RConvError, match="cifar10_train_first100.npz holds only 100 images; index 150"):
        rc.load_images("cifar10", [150], root=packs, download=False)


def test_samples_are_bundled_and_deterministic():
    first, labels = rc.load_images("samples", range(len(rc.SAMPLE_PHOTOS)))
    again, _ = rc.load_images("samples", [0, 1])
    assert first.shape == (len(rc.SAMPLE_PHOTOS), 3, 32, 32)
    assert torch.equal(first[:2], again)
    assert labels.tolist() == [i % 10 for i in range(len(rc.SAMPLE_PHOTOS))]
    assert float(first.std()) > 0.05  # real photos, not blanks
    with pytest.raises(rc.RConvError, match="out of range"):
        rc.load_images("samples", [len(rc.SAMPLE_PHOTOS)])


def test_bad_dataset_and_indices():
    with pytest.raises(rc.RConvError, match="unknown dataset 'imagenet'"):
        rc.load_images("imagenet", [0])
    with pytest.raises(rc.RConvError, match="non-negative"):
        rc.load_images("samples", [-1])
    with pytest.raises(rc.RConvError, match="no image indices"):
        rc.load_images("samples", [])
