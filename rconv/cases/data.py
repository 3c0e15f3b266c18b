"""Training images: MNIST, CIFAR10, CIFAR100 (torchvision or offline sample packs) and bundled photos."""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..common.checks import as_whole
from ..common.errors import RConvError
from ..common.paths import repository_root, resolve_path

DATASETS = {
    "mnist": dict(torchvision="MNIST", channels=1, num_classes=10),
    "cifar10": dict(torchvision="CIFAR10", channels=3, num_classes=10),
    "cifar100": dict(torchvision="CIFAR100", channels=3, num_classes=100),
    "samples": dict(torchvision=None, channels=3, num_classes=10),
}
# Photos bundled with scikit-image (no download): colour ones first, then greyscale ones.
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "camera", "coins", "moon",
                 "brick", "grass", "gravel", "clock")


def _default_data_root():
    # torchvision downloads land in data/ of the checkout, or of the working directory
    # when the package is installed elsewhere (as in Colab).
    root = repository_root()
    return root / "data" if root is not None else Path("data")


def data_place(path):
    """A data folder: absolute as given, relative to the project's root (whatever the working directory),
    or relative to the working directory when only that holds it."""
    resolved, as_given = resolve_path(path), Path(path).expanduser()
    return as_given if not resolved.exists() and as_given.exists() else resolved


def dataset_info(dataset):
    """Channels and number of classes of a dataset name (case-insensitive)."""
    key = str(dataset).lower()
    if key not in DATASETS:
        raise RConvError(f"unknown dataset {dataset!r}; choose one of MNIST, CIFAR10, CIFAR100, samples")
    return dict(DATASETS[key], name=key)


def check_indices(indices):
    """Image indices as a non-empty list of non-negative ints; strings, bools and floats are refused."""
    if isinstance(indices, (str, bytes)) or np.ndim(indices) == 0:
        indices = [indices]
    values = []
    for index in indices:
        value = as_whole(index)
        if value is None:
            raise RConvError(f"image indices must be whole numbers; got {index!r} ({type(index).__name__})")
        values.append(value)
    if not values:
        raise RConvError("no image indices given")
    if any(i < 0 for i in values):
        raise RConvError(f"image indices must be non-negative; got {values}")
    return values


def _check_size(size):
    if size is None:
        return None
    side = as_whole(size)
    if side is None or side <= 0:
        raise RConvError(f"size must be a whole number of pixels >= 1 (or None for the dataset's own); got {size!r}")
    return side


def _preprocess(picture, size):
    # The paper's pipeline: Resize(32), CenterCrop(32), ToTensor; MNIST becomes 32x32.
    from torchvision import transforms
    steps = [transforms.Resize(size), transforms.CenterCrop(size)] if size is not None else []
    return transforms.Compose(steps + [transforms.ToTensor()])(picture)


def _sample_photo(name):
    import skimage.data
    from PIL import Image
    picture = np.asarray(getattr(skimage.data, name)())
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    return Image.fromarray(picture[..., :3].astype(np.uint8))


class _Pack(NamedTuple):
    """A sample pack's arrays, checked: images uint8 (N, H, W, C), labels (N,) in [-1, num_classes)."""

    path: Path
    images: np.ndarray
    labels: np.ndarray


def _read_pack(path):
    """The arrays of a sample pack, or an error naming the file and what is wrong with it."""
    if path.is_dir():
        raise RConvError(f"sample pack {path} is a directory, not a .npz file")
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
    try:
        loaded = np.load(path, allow_pickle=False)
    except unreadable as error:
        raise RConvError(f"sample pack {path} is not a readable .npz file ({type(error).__name__}: {error}); "
                         f"it may be truncated or corrupt") from error
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise RConvError(f"sample pack {path} holds a single array, not a .npz with 'images' and 'labels'")
    with loaded as pack:
        missing = [key for key in ("images", "labels") if key not in pack.files]
        if missing:
            raise RConvError(f"sample pack {path} must hold arrays 'images' and 'labels'; it holds "
                             f"{sorted(pack.files)}")
        try:
            return pack["images"], pack["labels"]
        except unreadable as error:
            raise RConvError(f"sample pack {path}: its arrays cannot be read ({type(error).__name__}: {error}); "
                             f"it may be truncated or corrupt") from error


def _load_pack(path, info):
    """A checked sample pack of dataset `info`."""
    images, labels = _read_pack(path)
    if images.dtype != np.uint8:
        raise RConvError(f"sample pack {path}: images must be uint8 (0-255), as torchvision's dataset.data; "
                         f"got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != info["channels"]:
        raise RConvError(f"sample pack {path}: images must have shape (N, H, W, {info['channels']}) for "
                         f"{info['name']} (channels last); got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise RConvError(f"sample pack {path}: labels must be integers of shape ({len(images)},); got "
                         f"{labels.dtype} of shape {labels.shape}")
    bad = labels[(labels < -1) | (labels >= info["num_classes"])]
    if len(bad):
        raise RConvError(f"sample pack {path}: labels must lie in 0..{info['num_classes'] - 1} for "
                         f"{info['name']} (-1: unknown); got {bad[:5].tolist()}")
    return _Pack(path, images, labels)


def _from_pack(pack, indices):
    from PIL import Image
    pictures = [Image.fromarray(pack.images[i].squeeze(-1) if pack.images.shape[-1] == 1 else pack.images[i])
                for i in indices]
    return pictures, [int(pack.labels[i]) for i in indices]


def _from_torchvision(name, root, indices, download):
    import torchvision
    try:
        data = getattr(torchvision.datasets, name)(str(root), train=True, download=download)
    except Exception:  # torchvision raises RuntimeError, URLError, ... when files are missing
        return None
    if max(indices) >= len(data):
        raise RConvError(f"{name} has {len(data)} training images; index {max(indices)} is out of range")
    items = [data[i] for i in indices]
    return [picture for picture, _ in items], [int(label) for _, label in items]


def _find(info, indices, root, download):
    """The pictures and labels from the first place that holds them, or an error listing the places."""
    places = [data_place(p) for p in (root, os.environ.get("RCONV_DATA")) if p]
    looked, short = [], None
    for place in places:
        path = place / f"{info['name']}_train_first100.npz"
        looked.append(str(path))
        found = None
        if path.exists():
            pack = _load_pack(path, info)
            if max(indices) < len(pack.images):
                found = _from_pack(pack, indices)
            else:
                short = short or pack
        if found is None:
            looked.append(f"{place} (torchvision {info['torchvision']} folder)")
            found = _from_torchvision(info["torchvision"], place, indices, download=False)
        if found is not None:
            return found
    if short is not None:
        # A pack was meant to serve these images: say why it cannot, rather than download into data/.
        raise RConvError(f"the sample pack {short.path} holds only {len(short.images)} images; index "
                         f"{max(indices)} is out of range. For more images point root= (or RCONV_DATA) at "
                         f"torchvision's {info['torchvision']} dataset folder")
    default = _default_data_root()
    looked.append(f"{default} (torchvision, download={download})")
    found = _from_torchvision(info["torchvision"], default, indices, download=download)
    if found is None:
        raise RConvError(
            f"could not load {info['torchvision']} images {indices[:5]}{'...' if len(indices) > 5 else ''}; "
            f"looked in: {'; '.join(looked)}. Offline, point RCONV_DATA (or root=) at a folder holding "
            f"torchvision's dataset folders or {info['name']}_train_first100.npz, e.g. "
            f"RCONV_DATA=../shared/datasets")
    return found


def load_images(dataset, indices, *, root=None, download=True, size=32):
    """Training images of MNIST, CIFAR10, CIFAR100 or "samples" as float32 (N, C, size, size) in [0, 1].

    Looks in `root`, then $RCONV_DATA, then data/ in the repository (downloading through
    torchvision there when `download`). Each place may hold torchvision's own dataset
    folders or sample packs named `<dataset>_train_first100.npz`. "samples" are photos
    bundled with scikit-image and need no data. An unknown label (-1 in a pack, and every
    sample photo) becomes index % num_classes, so the client's gradients stay deterministic.
    size=None keeps the dataset's own size (28 for MNIST). Returns (images, labels int64 (N,)).
    """
    info = dataset_info(dataset)
    indices = check_indices(indices)
    size = _check_size(size)
    if info["name"] == "samples":
        if size is None:
            raise RConvError("sample photos have no native size; pass size=32 (or another side)")
        if max(indices) >= len(SAMPLE_PHOTOS):
            raise RConvError(f"there are {len(SAMPLE_PHOTOS)} sample photos; index {max(indices)} is out of range")
        pictures, labels = [_sample_photo(SAMPLE_PHOTOS[i]) for i in indices], [-1] * len(indices)
    else:
        pictures, labels = _find(info, indices, root, download)
    images = torch.stack([_preprocess(p, size) for p in pictures]).float()
    if images.shape[1] != info["channels"]:
        images = images[:, :1] if info["channels"] == 1 else images.expand(-1, info["channels"], -1, -1)
    labels = torch.tensor([lab if lab >= 0 else i % info["num_classes"] for lab, i in zip(labels, indices)],
                          dtype=torch.int64)
    return images.contiguous(), labels
