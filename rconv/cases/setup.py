"""A case: a dataset's images and the preset network a client trains on them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..common.errors import RConvError
from .data import check_indices, dataset_info, load_images
from .models import PRESET_DATASETS, build_model, preset_input_size, preset_name


class Case(NamedTuple):
    """The images a client holds, their labels, the network it trains, and the dataset's info."""

    images: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor  # int64 (N,)
    model: torch.nn.Module
    info: dict  # dataset_info(): name, channels, num_classes


def preset_dataset(model):
    """The dataset a preset is attacked on in the paper's notebooks."""
    return PRESET_DATASETS[preset_name(model)]


def setup(dataset, model, indices, seed=50, *, data_root=None, size=None, **overrides):
    """The Case of a dataset's images and a preset network sized for them.

    Args:
        dataset: MNIST, CIFAR10, CIFAR100 or samples; None means the preset's own (PRESET_DATASETS).
        model: a preset of MODELS.
        seed: seed of the model's initialisation; 50 gives the paper's networks.
        size: side the images are resized to; None: the preset's input size (32 for the paper's
            presets). The model is built for the images' side.
        overrides: build_model's overrides (channels=..., activations=...).
    """
    info = dataset_info(preset_dataset(model) if dataset is None else dataset)
    size = overrides.get("input_size", preset_input_size(model)) if size is None else size
    images, labels = load_images(info["name"], check_indices(indices), root=data_root, size=size)
    side = images.shape[-1]
    if overrides.setdefault("input_size", side) != side:
        raise RConvError(f"input_size={overrides['input_size']} does not match the images' side {side}")
    network = build_model(model, info["channels"], info["num_classes"], seed=seed, **overrides)
    return Case(images, labels, network, info)
