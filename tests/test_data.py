"""rconv.cases.data: loading images (sample packs, a torchvision-format root, bundled photos), the offline error,
and one clear RConvError naming the file or argument for every bad pack and argument."""
import struct

import numpy as np
import pytest
import torch

import rconv_core as rc
from conftest import PACK, corrupt_pack


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


# ---------------------------------------------------------------------------------------------------------
# Sample packs that cannot be read, and load_images' arguments

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


def empty(folder):
    folder.mkdir()
    (folder / PACK).write_bytes(b"")
    return folder / PACK


def directory(folder):
    (folder / PACK).mkdir(parents=True)
    return folder / PACK


BAD_PACKS = {
    "truncated": (truncated, "not a readable .npz"),
    "garbage": (corrupt_pack, "not a readable .npz"),
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


def test_sample_photos_at_224_px():
    images, labels = rc.load_images("samples", [0, 3], size=224)
    assert images.shape == (2, 3, 224, 224) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1 and float(images.std()) > 0.05
    assert labels.tolist() == [0, 3]
