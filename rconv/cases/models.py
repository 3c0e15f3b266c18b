"""The networks R-CONV attacks: ConvNet, the paper's presets, and their initialisation."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..common.checks import whole_number
from ..common.errors import RConvError
from ..common.geometry import conv_output_size
from .networks import NETWORKS

LEAKY_SLOPE = 0.2  # the paper's LeakyReLU slope
ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "identity")

_LEAKY, _RELU = "leaky_relu", "relu"
MODELS = {
    # The paper's settings; ConvNet's defaults give its 5x5 kernels with padding 2, and
    # build_model its initialisation U(-0.5, 0.5) of weights and biases.
    "lenet": dict(channels=(12, 16, 12, 12), strides=(2, 2, 1, 1), activations=(_LEAKY, _LEAKY, _RELU, _RELU)),
    "lenet_c10": dict(channels=(12, 16, 12, 3), strides=(2, 2, 1, 1), activations=(_LEAKY, _LEAKY, _RELU, _RELU)),
    "lenet_o": dict(channels=(12, 16, 3, 3), strides=(2, 2, 1, 1), activations=(_LEAKY, _LEAKY, _RELU, _RELU)),
    "o_cnn6": dict(channels=(12, 16, 3, 3, 3, 3), strides=(2, 2, 1, 1, 1, 1),
                   activations=(_LEAKY, _LEAKY, _RELU, _RELU, _RELU, _RELU)),
    "lenet_4_relu": dict(channels=(12, 22, 3, 3), strides=(2, 2, 1, 1), activations=(_LEAKY, _RELU, _RELU, _RELU)),
    "lenet_all_relu": dict(channels=(77, 22, 3, 3), strides=(2, 2, 1, 1), activations=(_RELU,) * 4),
    # DLG's network (Zhu et al. 2019): three 5x5 conv layers of 12 filters with sigmoid.
    "dlg_net": dict(channels=(12, 12, 12), strides=(2, 2, 1), activations=("sigmoid",) * 3),
    # LeNet-style networks recoverable at high resolution: a stride-4 first layer with more
    # filters than 3 * 4 * 4 is determined by its weight constraints alone (padding 3 lets its
    # 5x5 kernels reach every pixel); the layers after it are small enough for their gradient
    # constraints, with filters above the counting bound (min_filters). PyTorch's default
    # initialisation keeps their logits moderate (the paper's U(-0.5, 0.5) saturates the softmax).
    "lenet_hr64": dict(channels=(64, 24, 16, 12), strides=(4, 2, 1, 1), padding=(3, 2, 2, 2),
                       activations=(_LEAKY, _LEAKY, _RELU, _RELU), input_size=64, init="default"),
    "lenet_hr128": dict(channels=(64, 80, 32, 16), strides=(4, 2, 2, 1), padding=(3, 2, 2, 2),
                        activations=(_LEAKY, _LEAKY, _RELU, _RELU), input_size=128, init="default"),
    "lenet_hr224": dict(channels=(64, 208, 96, 32), strides=(4, 2, 2, 1), padding=(3, 2, 2, 2),
                        activations=(_LEAKY, _LEAKY, _RELU, _RELU), input_size=224, init="default"),
    # A LeNet for mini-batches: its first two layers have more weight constraints than inputs (24
    # and 128 filters), so each image's input is determined on its own; the last two have 48
    # filters, whose 48 * 25 gradient constraints per channel serve a batch of up to 18 images of
    # 8x8 inputs jointly. PyTorch's default initialisation, as the paper's saturates the softmax.
    "lenet_batch": dict(channels=(24, 128, 48, 48), strides=(2, 2, 1, 1), activations=(_LEAKY, _LEAKY, _RELU, _RELU),
                        init="default"),
}
# How build_model initialises weights and biases: the paper's U(-0.5, 0.5), or PyTorch's default.
INITS = ("paper", "default")
# The dataset each preset is attacked on in the paper's notebooks (Various_settings; lenet_c10
# is its Testing network for CIFAR10). dlg_net goes with CIFAR10, as in DLG's paper.
PRESET_DATASETS = {"lenet": "cifar100", "lenet_c10": "cifar10", "lenet_o": "cifar100", "o_cnn6": "cifar10",
                   "lenet_4_relu": "cifar100", "lenet_all_relu": "cifar100", "dlg_net": "cifar10",
                   "lenet_hr64": "samples", "lenet_hr128": "samples", "lenet_hr224": "samples",
                   "lenet_batch": "cifar100", **{name: preset.dataset for name, preset in NETWORKS.items()}}
# The preset the paper's Testing notebooks attack on each dataset.
TESTING_PRESETS = {"mnist": "lenet", "cifar10": "lenet_c10", "cifar100": "lenet"}

_ALIASES = {"relu": "relu", "leakyrelu": "leaky_relu", "leaky": "leaky_relu", "lrelu": "leaky_relu",
            "sigmoid": "sigmoid", "tanh": "tanh", "identity": "identity", "linear": "identity", "none": "identity"}


def activation_name(name):
    """Normalise an activation name ("ReLU", "LeakyReLU", "leaky", ...) to one of ACTIVATIONS."""
    key = str(name).lower().replace("_", "").replace("-", "")
    if key not in _ALIASES:
        raise RConvError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return _ALIASES[key]


def activation_module(name):
    """The nn.Module of an activation name (LeakyReLU with the paper's slope)."""
    name = activation_name(name)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE), "sigmoid": nn.Sigmoid,
            "tanh": nn.Tanh, "identity": nn.Identity}[name]()


def _per_layer(value, count, name):
    """One entry per conv layer: a single value repeated, or a sequence of `count` entries."""
    values = list(value) if isinstance(value, (tuple, list)) else [value] * count
    if len(values) != count:
        raise RConvError(f"{name} needs one entry per conv layer ({count}); got {len(values)}")
    return values


class ConvNet(nn.Sequential):
    """A stack of Conv2d + activation blocks, then Flatten and one Linear layer with a bias.

    Args:
        channels: filters of each conv layer; strides and activations give one entry per layer.
        activations: names from ACTIVATIONS (case and underscores are ignored).
        kernel_size: side of every conv layer's square kernel, or one per layer.
        padding: zero padding of every conv layer, or one per layer; None means kernel_size // 2.
        input_size: side of the square input image, used to size the Linear layer.
    """

    def __init__(self, channels, strides, activations, in_channels, num_classes, kernel_size=5,
                 padding=None, input_size=32, dtype=None):
        channels, strides, activations = list(channels), list(strides), list(activations)
        if not (len(channels) == len(strides) == len(activations)):
            raise RConvError(f"channels, strides and activations need one entry per conv layer; got "
                             f"{len(channels)}, {len(strides)} and {len(activations)}")
        kernels = _per_layer(kernel_size, len(channels), "kernel_size")
        paddings = [k // 2 if p is None else p for k, p in zip(kernels, _per_layer(padding, len(channels), "padding"))]
        _check_sizes(channels, strides, kernels, paddings, in_channels, num_classes, input_size)
        layers, size, previous = [], (input_size, input_size), in_channels
        for i, (out, kernel, stride, pad, act) in enumerate(zip(channels, kernels, strides, paddings, activations)):
            layers += [nn.Conv2d(previous, out, kernel, stride=stride, padding=pad, dtype=dtype),
                       activation_module(act)]
            size = conv_output_size(size, kernel, stride, pad)
            if min(size) < 1:
                raise RConvError(f"conv layer {i + 1} leaves no output pixels for a {input_size}x"
                                 f"{input_size} input (kernel {kernel}, stride {stride}, padding {pad})")
            previous = out
        layers += [nn.Flatten(), nn.Linear(previous * size[0] * size[1], num_classes, dtype=dtype)]
        super().__init__(*layers)
        self.config = dict(channels=tuple(channels), strides=tuple(strides),
                           activations=tuple(activation_name(a) for a in activations),
                           in_channels=in_channels, num_classes=num_classes, kernel_size=kernel_size,
                           padding=paddings[0] if len(set(paddings)) == 1 else tuple(paddings),
                           input_size=input_size)


_SEEDS = (-2 ** 63, 2 ** 64 - 1)  # the seeds torch.manual_seed takes


def _check_sizes(channels, strides, kernels, paddings, in_channels, num_classes, input_size):
    """Refuse sizes no conv layer can have (0 filters, stride 0, ...) before torch divides by them."""
    for number, (out, stride, kernel, pad) in enumerate(zip(channels, strides, kernels, paddings), start=1):
        whole_number(out, f"conv layer {number}: channels (filters)")
        whole_number(stride, f"conv layer {number}: stride")
        whole_number(kernel, f"conv layer {number}: kernel_size")
        whole_number(pad, f"conv layer {number}: padding", least=0)
    whole_number(in_channels, "in_channels")
    whole_number(num_classes, "num_classes")
    whole_number(input_size, "input_size")


def preset_name(name):
    """The key of a preset in MODELS or NETWORKS (case-insensitive), or an error listing the presets."""
    key = str(name).lower()
    if key not in MODELS and key not in NETWORKS:
        raise RConvError(f"unknown model {name!r}; available presets: {', '.join([*MODELS, *NETWORKS])}")
    return key


def convnet_settings(name):
    """A ConvNet preset's settings (MODELS), for the studies that vary its layers; an error for the others."""
    key = preset_name(name)
    if key not in MODELS:
        raise RConvError(f"{name!r} is a network as people train it (NETWORKS), not a ConvNet preset whose layers "
                         f"this study can vary; choose one of {', '.join(MODELS)}")
    return MODELS[key]


def preset_input_size(name):
    """The image side a preset is built for (32 unless it says otherwise)."""
    key = preset_name(name)
    return NETWORKS[key].input_size if key in NETWORKS else MODELS[key].get("input_size", 32)


def build_model(name, in_channels=3, num_classes=10, *, seed=50, **overrides):
    """A preset from MODELS, deterministic for a seed, in float32 (what a server sends its clients).

    Any ConvNet argument but dtype can be overridden, e.g. activations=("leaky_relu",) * 4, and
    init: "paper" (U(-0.5, 0.5) for every weight and bias, the paper's initialisation and the
    default of its presets) or "default" (PyTorch's own, the high-resolution presets' default).
    """
    if "dtype" in overrides:
        raise RConvError("build_model always returns float32 weights; convert the model afterwards "
                         "(model.double()) or pass dtype to client_gradients")
    whole_number(seed, "seed", least=_SEEDS[0], most=_SEEDS[1], hint=" (torch's seeds)")
    if preset_name(name) in NETWORKS:
        return _build_network(NETWORKS[preset_name(name)], name, in_channels, num_classes, seed, overrides)
    settings = {**MODELS[preset_name(name)], **overrides}
    init = settings.pop("init", "paper")
    if init not in INITS:
        raise RConvError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    # The published code seeds PyTorch, builds the network in float64 (PyTorch's default
    # initialisation draws first), then redraws every weight and bias from U(-0.5, 0.5).
    # Following the same random stream gives the paper's networks for seed 50. The
    # result is rounded to float32, the precision a federated server sends to clients,
    # so that float32 and float64 gradients come from the very same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(in_channels=in_channels, num_classes=num_classes, dtype=torch.float64, **settings)
        if init == "paper":
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.uniform_(-0.5, 0.5)
    return model.float()


def _build_network(preset, name, in_channels, num_classes, seed, overrides):
    """A NETWORKS preset with PyTorch's default initialisation for `seed`, in float32."""
    if overrides.pop("input_size", preset.input_size) != preset.input_size:
        raise RConvError(f"{name!r} is built for {preset.input_size}-px images")
    if overrides:
        raise RConvError(f"{name!r} is built as people train it; it takes no ConvNet settings ({', '.join(overrides)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = preset.build(in_channels, num_classes)
    return model.float().train(not preset.eval_mode)
