"""R-CONV: recover a CNN's training image analytically from one step of its gradients.

R-CONV (Eltaras et al., WISE 2024, arXiv 2406.04227) inverts a convolutional network
layer by layer, from the fully connected layer down to the image. Every step is a
linear system: the fully connected layer gives its input as a ratio of gradients, and
each convolution layer gives its input from the gradient constraints
dL/dW = sum dL/dO * X (one matrix shared by every input channel) and, where the
pre-activation output is known, from the weight constraints O = conv(X, W) + b.

The module reads top to bottom: models, data, client gradients, constraints and
solvers, the attack, metrics and reports, plotting, command line.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The public API; everything else is a building block that may change.
__all__ = [
    "ConvNet", "MODELS", "build_model", "ACTIVATIONS",  # models
    "load_images", "dataset_info",  # data
    "client_gradients", "defend", "DEFENCES", "as_dtype", "DTYPES",  # client gradients
    "grad_constraints", "weight_constraints", "min_filters", "default_relu_tol",  # constraints
    "reconstruct", "reconstruct_batch", "Reconstruction", "LayerReport",  # the attack
    "FIRST_LAYER_METHODS", "RELU_TESTS",
    "BASELINES", "run_baseline", "compare_baselines",  # optimisation baselines
    "image_metrics", "constraint_report", "solve_steps", "layer_inputs", "output_gradients",  # metrics, reports
    "attack_grid", "attack_images", "filter_sweep", "summarize", "success_rates", "breaking_points",
    "filter_summary", "BROKEN_PSNR",  # experiment loops
    "plot_reconstruction", "plot_grid", "plot_methods", "plot_psnr", "plot_precision", "plot_defences",
    "plot_filters", "plot_success",  # plotting
    "main",  # command line
]

REPO_ROOT = Path(__file__).resolve().parent

# -----------------------------------------------------------------------------
# Models
# -----------------------------------------------------------------------------

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
}


def activation_name(name):
    """Normalise an activation name ("ReLU", "LeakyReLU", "leaky", ...) to one of ACTIVATIONS."""
    key = str(name).lower().replace("_", "").replace("-", "")
    aliases = {"relu": "relu", "leakyrelu": "leaky_relu", "leaky": "leaky_relu", "lrelu": "leaky_relu",
               "sigmoid": "sigmoid", "tanh": "tanh", "identity": "identity", "linear": "identity",
               "none": "identity"}
    if key not in aliases:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
    return aliases[key]


def _activation_module(name):
    name = activation_name(name)
    return {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE), "sigmoid": nn.Sigmoid,
            "tanh": nn.Tanh, "identity": nn.Identity}[name]()


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def _conv_output_size(size, kernel_size, stride, padding):
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in
                 zip(size, _pair(kernel_size), _pair(stride), _pair(padding)))


class ConvNet(nn.Sequential):
    """A stack of Conv2d + activation blocks, then Flatten and one Linear layer with a bias.

    Args:
        channels: filters of each conv layer; strides and activations give one entry per layer.
        activations: names from ACTIVATIONS (case and underscores are ignored).
        padding: zero padding of every conv layer; None means kernel_size // 2.
        input_size: side of the square input image, used to size the Linear layer.
    """

    def __init__(self, channels, strides, activations, in_channels, num_classes, kernel_size=5,
                 padding=None, input_size=32, dtype=None):
        channels, strides, activations = list(channels), list(strides), list(activations)
        if not (len(channels) == len(strides) == len(activations)):
            raise ValueError(f"channels, strides and activations need one entry per conv layer; got "
                             f"{len(channels)}, {len(strides)} and {len(activations)}")
        padding = kernel_size // 2 if padding is None else padding
        layers, size, previous = [], (input_size, input_size), in_channels
        for i, (out, stride, act) in enumerate(zip(channels, strides, activations)):
            layers += [nn.Conv2d(previous, out, kernel_size, stride=stride, padding=padding, dtype=dtype),
                       _activation_module(act)]
            size = _conv_output_size(size, kernel_size, stride, padding)
            if min(size) < 1:
                raise ValueError(f"conv layer {i + 1} leaves no output pixels for a {input_size}x"
                                 f"{input_size} input (kernel {kernel_size}, stride {stride}, padding {padding})")
            previous = out
        layers += [nn.Flatten(), nn.Linear(previous * size[0] * size[1], num_classes, dtype=dtype)]
        super().__init__(*layers)
        self.config = dict(channels=tuple(channels), strides=tuple(strides),
                           activations=tuple(activation_name(a) for a in activations),
                           in_channels=in_channels, num_classes=num_classes, kernel_size=kernel_size,
                           padding=padding, input_size=input_size)


def _preset(name):
    key = str(name).lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; available presets: {', '.join(MODELS)}")
    return key


def build_model(name, in_channels=3, num_classes=10, seed=50, **overrides):
    """A preset from MODELS with the paper's initialisation U(-0.5, 0.5), deterministic for a seed.

    Any ConvNet argument but dtype can be overridden, e.g. activations=("leaky_relu",) * 4. The
    model comes back in float32, the precision a server sends to its clients.
    """
    if "dtype" in overrides:
        raise ValueError("build_model always returns float32 weights; convert the model afterwards "
                         "(model.double()) or pass dtype to client_gradients")
    settings = {**MODELS[_preset(name)], **overrides}
    # The published code seeds PyTorch, builds the network in float64 (PyTorch's default
    # initialisation draws first), then redraws every weight and bias from U(-0.5, 0.5).
    # Following the same random stream gives the paper's networks for seed 50. The
    # result is rounded to float32, the precision a federated server sends to clients,
    # so that float32 and float64 gradients come from the very same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(in_channels=in_channels, num_classes=num_classes, dtype=torch.float64, **settings)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.uniform_(-0.5, 0.5)
    return model.float()


# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------

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
    # when the module is installed elsewhere (as in Colab).
    return REPO_ROOT / "data" if (REPO_ROOT / "run_all.py").exists() else Path("data")


def _data_place(path):
    # RCONV_DATA is documented relative to the project's root; accept the working directory too.
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def dataset_info(dataset):
    """Channels and number of classes of a dataset name (case-insensitive)."""
    key = str(dataset).lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of MNIST, CIFAR10, CIFAR100, samples")
    return dict(DATASETS[key], name=key)


def _indices(indices):
    values = [int(indices)] if np.ndim(indices) == 0 else [int(i) for i in indices]
    if not values:
        raise ValueError("no image indices given")
    if any(i < 0 for i in values):
        raise ValueError(f"image indices must be non-negative; got {values}")
    return values


def _progress(items=None, *, total=None, desc, unit, enabled, mininterval=1.0):
    """A tqdm progress bar over items (or a manual one of `total` steps); a silent one unless enabled."""
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit=unit, mininterval=mininterval, disable=not enabled)


def _preprocess(picture, size):
    # The paper's pipeline: Resize(32), CenterCrop(32), ToTensor; MNIST becomes 32x32.
    from torchvision import transforms
    steps = [transforms.Resize(size), transforms.CenterCrop(size)] if size is not None else []
    return transforms.Compose(steps + [transforms.ToTensor()])(picture)


def _sample_photo(name):
    from PIL import Image
    import skimage.data
    picture = np.asarray(getattr(skimage.data, name)())
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    return Image.fromarray(picture[..., :3].astype(np.uint8))


def _from_pack(path, indices):
    with np.load(path) as pack:
        images, labels = pack["images"], pack["labels"]
    if max(indices) >= len(images):
        return None
    from PIL import Image
    pictures = [Image.fromarray(images[i].squeeze(-1) if images.shape[-1] == 1 else images[i])
                for i in indices]
    return pictures, [int(labels[i]) for i in indices]


def _from_torchvision(name, root, indices, download):
    import torchvision
    try:
        data = getattr(torchvision.datasets, name)(str(root), train=True, download=download)
    except Exception:  # torchvision raises RuntimeError, URLError, ... when files are missing
        return None
    if max(indices) >= len(data):
        raise ValueError(f"{name} has {len(data)} training images; index {max(indices)} is out of range")
    items = [data[i] for i in indices]
    return [picture for picture, _ in items], [int(label) for _, label in items]


def load_images(dataset, indices, root=None, download=True, size=32):
    """Training images of MNIST, CIFAR10, CIFAR100 or "samples" as float32 (N, C, size, size) in [0, 1].

    Looks in `root`, then $RCONV_DATA, then data/ in the repository (downloading through
    torchvision there when `download`). Each place may hold torchvision's own dataset
    folders or sample packs named `<dataset>_train_first100.npz`. "samples" are photos
    bundled with scikit-image and need no data. An unknown label (-1 in a pack, and every
    sample photo) becomes index % num_classes, so the client's gradients stay deterministic.
    size=None keeps the dataset's own size (28 for MNIST). Returns (images, labels int64 (N,)).
    """
    info = dataset_info(dataset)
    indices = _indices(indices)
    if not indices:
        raise ValueError("no image indices given")
    if info["name"] == "samples":
        if size is None:
            raise ValueError("sample photos have no native size; pass size=32 (or another side)")
        if max(indices) >= len(SAMPLE_PHOTOS):
            raise ValueError(f"there are {len(SAMPLE_PHOTOS)} sample photos; index {max(indices)} is out of range")
        found = [_sample_photo(SAMPLE_PHOTOS[i]) for i in indices], [-1] * len(indices)
    else:
        places = [_data_place(p) for p in (root, os.environ.get("RCONV_DATA")) if p]
        found, looked = None, []
        for place in places:
            pack = place / f"{info['name']}_train_first100.npz"
            looked.append(str(pack))
            if pack.exists():
                found = _from_pack(pack, indices)
            if found is None:
                looked.append(f"{place} (torchvision {info['torchvision']} folder)")
                found = _from_torchvision(info["torchvision"], place, indices, download=False)
            if found is not None:
                break
        if found is None:
            default = _default_data_root()
            looked.append(f"{default} (torchvision, download={download})")
            found = _from_torchvision(info["torchvision"], default, indices, download=download)
        if found is None:
            raise ValueError(
                f"could not load {info['torchvision']} images {indices[:5]}{'...' if len(indices) > 5 else ''}; "
                f"looked in: {'; '.join(looked)}. Offline, point RCONV_DATA (or root=) at a folder holding "
                f"torchvision's dataset folders or {info['name']}_train_first100.npz, e.g. "
                f"RCONV_DATA=../shared/datasets")
    pictures, labels = found
    images = torch.stack([_preprocess(p, size) for p in pictures]).float()
    if images.shape[1] != info["channels"]:
        images = images[:, :1] if info["channels"] == 1 else images.expand(-1, info["channels"], -1, -1)
    labels = torch.tensor([lab if lab >= 0 else i % info["num_classes"] for lab, i in zip(labels, indices)],
                          dtype=torch.int64)
    return images.contiguous(), labels


# -----------------------------------------------------------------------------
# Client gradients
# -----------------------------------------------------------------------------

def client_gradients(model, image, label, dtype=torch.float32):
    """The gradients a federated-learning client shares for one image: cross-entropy, computed in `dtype`.

    Returns a list of tensors in the order of model.parameters().
    """
    image = torch.as_tensor(image)
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"client_gradients takes one image of shape (C, H, W) or (1, C, H, W); "
                         f"got shape {tuple(image.shape)}")
    label = torch.as_tensor(label, dtype=torch.int64).reshape(-1)
    if label.numel() != 1:
        raise ValueError(f"client_gradients takes one label; got {label.numel()}")
    dtype = as_dtype(dtype)
    client = copy.deepcopy(model).to(dtype)
    client.zero_grad(set_to_none=True)
    loss = F.cross_entropy(client(image.to(dtype)), label.to(image.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(client.parameters()))]


DEFENCES = ("none", "gaussian", "topk", "quantize")


def defend(grads, defence, strength, seed=0):
    """The gradients a client shares under a common defence, per tensor.

    Args:
        defence: "none"; "gaussian": add noise whose norm is about `strength` times the tensor's
            (standard deviation strength * |g| / sqrt(g.numel()), as differential-privacy training
            adds); "topk": keep the `strength` fraction (0 < strength <= 1) of entries largest in
            magnitude, zero the rest; "quantize": round to `strength` bits (>= 2), uniform levels
            symmetric around zero up to the tensor's largest magnitude.
    grads: a list of tensors, or a dict name -> tensor (then a dict comes back).
        seed: seed of the Gaussian noise.
    """
    if defence not in DEFENCES:
        raise ValueError(f"unknown defence {defence!r}; choose one of {', '.join(DEFENCES)}")
    if isinstance(grads, dict):
        return dict(zip(grads, defend(list(grads.values()), defence, strength, seed=seed)))
    if defence == "none":
        return list(grads)
    if defence == "gaussian" and strength < 0:
        raise ValueError(f"gaussian noise needs strength >= 0; got {strength}")
    if defence == "topk" and not 0 < strength <= 1:
        raise ValueError(f"topk keeps a fraction 0 < strength <= 1 of the entries; got {strength}")
    if defence == "quantize" and (strength < 2 or int(strength) != strength):
        raise ValueError(f"quantize needs a whole number of bits >= 2 (a sign and at least one magnitude "
                         f"level); got {strength}")
    generator = torch.Generator().manual_seed(seed)
    defended = []
    for grad in grads:
        flat = grad.detach().reshape(-1)
        if defence == "gaussian":
            sigma = strength * float(torch.linalg.norm(flat.double())) / math.sqrt(flat.numel())
            noise = torch.randn(flat.shape, generator=generator, dtype=torch.float64) * sigma
            out = (flat.double() + noise.to(flat.device)).to(flat.dtype)
        elif defence == "topk":
            keep = max(1, round(strength * flat.numel()))
            out = torch.zeros_like(flat)
            largest = torch.topk(flat.abs(), keep).indices
            out[largest] = flat[largest]
        else:
            levels = 2 ** (int(strength) - 1) - 1
            top = float(flat.abs().max())
            out = flat if top == 0 else (torch.round(flat.double() / top * levels) * top / levels).to(flat.dtype)
        defended.append(out.reshape(grad.shape))
    return defended


# -----------------------------------------------------------------------------
# Constraints and solvers
# -----------------------------------------------------------------------------

def grad_constraints(output_grad, input_size, kernel_size, stride=1, padding=0):
    """The matrix A of a conv layer's gradient constraints, shared by every input channel c.

    A @ x[c].flatten() == weight_grad[:, c].flatten(), because
    dL/dW[f, c, i, j] = sum_pq output_grad[f, p, q] * x_padded[c, s*p + i, s*q + j].

    Args:
        output_grad: dL/dO of the layer's pre-activation output, shape (F, P, Q).
        input_size: (H, W) of the layer's input.
    Returns a (F*kh*kw, H*W) tensor; rows are ordered (f, i, j) like weight_grad[:, c].
    """
    if output_grad.dim() != 3:
        raise ValueError(f"output_grad must have shape (F, P, Q); got {tuple(output_grad.shape)}")
    filters, out_h, out_w = output_grad.shape
    (h, w), (kh, kw), (sh, sw), (ph, pw) = _pair(input_size), _pair(kernel_size), _pair(stride), _pair(padding)
    expected = _conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw))
    if (out_h, out_w) != tuple(expected):
        raise ValueError(f"output_grad is {out_h}x{out_w}, but a {kh}x{kw} kernel with stride {(sh, sw)} and "
                         f"padding {(ph, pw)} on a {h}x{w} input gives {expected[0]}x{expected[1]}")
    padded = output_grad.new_zeros(filters, kh, kw, h + 2 * ph + kh, w + 2 * pw + kw)
    for i in range(kh):
        for j in range(kw):
            padded[:, i, j, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw] = output_grad
    return padded[..., ph:ph + h, pw:pw + w].reshape(filters * kh * kw, h * w)


def _weight_entries(weight, input_size, stride, padding):
    """Nonzeros of the weight-constraint matrix: rows (f, p, q), columns (c, y, x), values W[f, c, i, j]."""
    filters, channels, kh, kw = weight.shape
    (h, w), (sh, sw), (ph, pw) = _pair(input_size), _pair(stride), _pair(padding)
    out_h, out_w = _conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw))
    device = weight.device
    p, q = torch.arange(out_h, device=device), torch.arange(out_w, device=device)
    f_offset = torch.arange(filters, device=device)[:, None, None] * (out_h * out_w)
    c_offset = torch.arange(channels, device=device)[None, :, None] * (h * w)
    rows, cols, values = [], [], []
    for i in range(kh):
        y = sh * p + i - ph
        inside_y = (y >= 0) & (y < h)
        for j in range(kw):
            x = sw * q + j - pw
            inside_x = (x >= 0) & (x < w)
            outputs = (p[inside_y, None] * out_w + q[None, inside_x]).flatten()
            pixels = (y[inside_y, None] * w + x[None, inside_x]).flatten()
            shape = (filters, channels, len(outputs))
            rows.append((f_offset + outputs).expand(shape).flatten())
            cols.append((c_offset + pixels).expand(shape).flatten())
            values.append(weight[:, :, i, j, None].expand(shape).flatten())
    return torch.cat(rows), torch.cat(cols), torch.cat(values), (filters * out_h * out_w, channels * h * w)


def weight_constraints(weight, input_size, stride=1, padding=0):
    """The matrix M of a conv layer's weight constraints: M @ x.flatten() + bias == O.flatten().

    O is the layer's pre-activation output (F, P, Q); x its input (C, H, W).
    Returns a dense (F*P*Q, C*H*W) tensor.
    """
    if weight.dim() != 4:
        raise ValueError(f"weight must have shape (F, C, kh, kw); got {tuple(weight.shape)}")
    if min(_conv_output_size(_pair(input_size), weight.shape[2:], _pair(stride), _pair(padding))) < 1:
        raise ValueError(f"a {tuple(weight.shape[2:])} kernel does not fit a {tuple(_pair(input_size))} input "
                         f"with padding {padding}")
    return _dense(*_weight_entries(weight, input_size, stride, padding))


def _dense(rows, cols, values, shape):
    matrix = values.new_zeros(shape)
    matrix[rows, cols] = values
    return matrix


def min_filters(input_size, kernel_size, stride=1, padding=0):
    """The fewest filters whose gradient constraints can determine a layer's input (a counting bound).

    With stride s, pixel (y, x) meets only kernel offsets i = y + padding (mod s), so the
    gradient constraints split into s*s independent groups, one per residue class; each
    group needs filters * (its offsets) >= (its pixels). Returns math.inf when some pixel
    meets no kernel position at all. ReLU zeros in the output gradient raise the real need.
    """
    need = 0
    counts = []
    for size, kernel, step, pad in zip(_pair(input_size), _pair(kernel_size), _pair(stride), _pair(padding)):
        out = (size + 2 * pad - kernel) // step + 1
        offsets, pixels = [0] * step, [0] * step
        for i in range(kernel):
            offsets[i % step] += 1
        for y in range(size):
            if any(0 <= (y + pad - i) // step < out and (y + pad - i) % step == 0 for i in range(kernel)):
                pixels[(y + pad) % step] += 1
            else:
                return math.inf
        counts.append((offsets, pixels))
    (offsets_y, pixels_y), (offsets_x, pixels_x) = counts
    for ry in range(len(offsets_y)):
        for rx in range(len(offsets_x)):
            pixels = pixels_y[ry] * pixels_x[rx]
            if pixels:
                need = max(need, math.ceil(pixels / (offsets_y[ry] * offsets_x[rx])))
    return need


def _eps(dtype):
    return torch.finfo(dtype).eps


def default_relu_tol(dtype):
    """The ReLU test's floor, relative to the layer's largest output, for gradients in `dtype`.

    A unit counts as active when its recovered output exceeds both this floor times the
    layer's largest output and three times the noise seen on that layer: the magnitude of
    its most negative recovered output, which only rounding can produce behind ReLU.
    """
    # Measured on float32 LeNets: dead units sit within 1e-6 of the layer's scale, while true
    # activations go down to 1e-5 of it; 10 eps lies between.
    return min(1e-2, max(1e-13, 10 * _eps(dtype)))


def _rank_rtol(dtype, shape):
    # numpy's matrix_rank rule, max(m, n) * eps, at the precision of the gradients; capped
    # so that half-precision gradients still get a best-effort solution.
    return min(1e-2, max(shape) * _eps(dtype))


# The smallest singular-value ratio a Gram matrix K^T K resolves in float64 (its
# eigenvalues are then 1e-12 apart from the largest, well above rounding).
_GRAM_RESOLVES = 1e-6
# Gram matrices up to this size are diagonalised (exact rank and condition number);
# larger ones are Cholesky-factorised and their condition number is estimated.
_EIGH_MAX = 1100
_REFINE_STEPS = 3
# Systems that couple all channels (weight constraints) are solved densely; beyond this many
# unknowns (a 64x64 greyscale image) a rank-deficient one would take minutes to analyse.
_JOINT_MAX_UNKNOWNS = 4096
# At most this many near-zero units per filter are re-decided from the bias gradient (2^n tries).
_REPAIR_MAX_UNITS = 10
# The hybrid first layer corrects the weight-constraint solution within the span of this many
# of M's smallest singular directions (see _deflated_hybrid).
_DEFLATION_SIZE = 128
_SUBSPACE_ITERATIONS = 1


@dataclass
class _Spectrum:
    rank: int
    cond: float  # condition number of K: largest over smallest singular value


def _spectrum(sigma, rtol):
    """Rank and condition number from singular values sorted in any order."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    if top <= 0.0:
        return _Spectrum(0, math.inf)
    low = float(sigma.min())
    return _Spectrum(int((sigma > rtol * top).sum()), top / low if low > 0 else math.inf)


class _System:
    """Least squares K x = b, with K given by its action on x of shape (n, r).

    r right-hand sides share K (the input channels of a gradient-constraint system).
    gram (K^T K) and matrix (K itself) are built on demand unless given.
    """

    def __init__(self, shape, apply, apply_t, rhs, gram=None, matrix=None):
        self.shape, self.apply, self.apply_t, self.rhs = shape, apply, apply_t, rhs
        self._gram, self._matrix = gram, matrix

    @property
    def gram(self):
        if self._gram is None:
            k = self.matrix
            self._gram = k.T @ k
        elif callable(self._gram):
            self._gram = self._gram()
        return self._gram

    @property
    def matrix(self):
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    def residual(self, x):
        return float(torch.linalg.norm(self.apply(x) - self.rhs) / torch.linalg.norm(self.rhs).clamp_min(1e-300))

    def refine(self, x, solve_normal):
        """Corrected semi-normal equations: correct x with residuals of K itself, not of K^T K."""
        for _ in range(_REFINE_STEPS):
            step = solve_normal(self.apply_t(self.rhs - self.apply(x)))
            x = x + step
            if float(torch.linalg.norm(step)) <= 1e-15 * float(torch.linalg.norm(x)) + 1e-300:
                break
        return x


def _norm_2(matrix, iterations=6):
    """The largest singular value of a small dense matrix, by power iteration."""
    v = matrix.new_ones(matrix.shape[1], 1)
    norm = 0.0
    for _ in range(iterations):
        v = matrix.T @ (matrix @ v)
        norm = float(torch.linalg.norm(v))
        if norm == 0:
            return 0.0
        v = v / norm
    return math.sqrt(norm)


def _power_estimates(n, like, apply_gram, solve_gram, iterations=12):
    """Largest and smallest eigenvalue of K^T K by power and inverse iteration."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    start = torch.randn(n, 1, dtype=like.dtype, device=like.device, generator=generator)
    largest, inverse_largest = 0.0, 0.0
    v, u = start, start.clone()
    for _ in range(iterations):
        v = apply_gram(v)
        largest = float(torch.linalg.norm(v))
        u = solve_gram(u)
        inverse_largest = float(torch.linalg.norm(u))
        if not (math.isfinite(largest) and math.isfinite(inverse_largest)) or largest == 0 or inverse_largest == 0:
            return None
        v, u = v / largest, u / inverse_largest
    return largest, 1.0 / inverse_largest


def _count_below(symmetric, threshold):
    """How many eigenvalues of a symmetric matrix lie below `threshold` (Sylvester's law of inertia)."""
    n = symmetric.shape[0]
    shifted = symmetric - threshold * torch.eye(n, dtype=symmetric.dtype, device=symmetric.device)
    factor, pivots, _ = torch.linalg.ldl_factor_ex(shifted)
    diagonal = factor.diagonal().cpu().numpy()
    below_diagonal = factor.diagonal(-1).cpu().numpy()
    pivots = pivots.cpu().numpy()
    count, i = 0, 0
    while i < n:
        if pivots[i] < 0 and i + 1 < n:  # a 2x2 block of D
            a, b, c = diagonal[i], below_diagonal[i], diagonal[i + 1]
            determinant = a * c - b * b
            count += 1 if determinant < 0 else (2 if a < 0 else 0)
            i += 2
        else:
            count += int(diagonal[i] < 0)
            i += 1
    return count


class _Factor:
    """A factorisation of K for least squares that resolves singular values K^T K cannot.

    Sparse LU (SuperLU, CPU) or dense LU when K is square, dense QR when it is tall; when
    K is rank-deficient at the tolerance, a truncated pseudo-inverse instead (SVD of K, or
    the eigenvectors of K^T K for large K, whose rank is then counted no finer than the
    Gram matrix resolves). Reused across images when K depends only on the weights.

    Args:
        matrix: dense K, or a function building it (called only when needed).
        apply, apply_t: K @ v and K^T @ v, when cheaper than the dense products.
        sparse: K as a scipy sparse matrix, for the sparse LU.
    """

    def __init__(self, shape, rtol, matrix, apply=None, apply_t=None, sparse=None, deficient=False):
        self.shape, self._matrix, self.kind = shape, matrix, None
        self.apply = apply or (lambda v: self.matrix @ v)
        self.apply_t = apply_t or (lambda v: self.matrix.T @ v)
        self._subspace = None
        m, n = shape
        if deficient:  # already known to be rank-deficient at the tolerance
            pass
        elif m == n and sparse is not None:
            from scipy.sparse.linalg import splu
            try:
                self.splu = splu(sparse.tocsc(), permc_spec="COLAMD")
                self.kind = "splu"
            except RuntimeError:  # exactly singular
                self.kind = None
        elif m >= n:
            if m == n:
                self.lu, self.pivots, _ = torch.linalg.lu_factor_ex(self.matrix)
                diagonal = self.lu.diagonal()
            else:
                self.q, self.r = torch.linalg.qr(self.matrix)
                diagonal = self.r.diagonal()
            if bool(torch.isfinite(diagonal).all()) and bool((diagonal != 0).all()):
                self.kind = "lu" if m == n else "qr"
        if self.kind is not None:
            like = torch.empty(0, dtype=torch.float64, device=self._device())
            estimates = _power_estimates(n, like, lambda v: self.apply_t(self.apply(v)), self._solve_gram)
            cond = math.sqrt(estimates[0] / estimates[1]) if estimates and estimates[1] > 0 else math.inf
            if cond < 1.0 / rtol:
                self.spectrum, self.sigma_max = _Spectrum(n, cond), math.sqrt(estimates[0])
            else:
                self.kind = None
        if self.kind is None:
            self._pseudo_inverse(rtol)

    @property
    def matrix(self):
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    def _device(self):
        return self._matrix.device if isinstance(self._matrix, torch.Tensor) else torch.device("cpu")

    def _pseudo_inverse(self, rtol):
        matrix = self.matrix
        if matrix.shape[1] > _EIGH_MAX:
            return self._ridge(matrix.T @ matrix, max(rtol, _GRAM_RESOLVES))
        self.kind = "svd"
        self.u, sigma, self.vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = sigma > rtol * float(sigma.max().clamp_min(1e-300))
        self.sigma = sigma
        self.spectrum, self.sigma_max = _spectrum(sigma, rtol), float(sigma.max())
        self.spectrum.rank = int(keep.sum())
        self.inverse = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))

    def _ridge(self, gram, cut):
        """Large and rank-deficient: iterated Tikhonov at the cut, with the rank counted exactly by
        Sylvester's law of inertia (an LDL^T factorisation), in a fraction of an eigendecomposition."""
        n = gram.shape[0]
        identity = torch.eye(n, dtype=gram.dtype, device=gram.device)
        estimates = _power_estimates(n, gram, lambda v: gram @ v, lambda v: v)
        largest = estimates[0] if estimates else 0.0
        if not largest > 0:  # nothing to solve with: a zero (or non-finite) matrix
            self.kind, self.sigma_max, self.spectrum = "ridge", 0.0, _Spectrum(0, math.inf)
            self.ridge = identity
            return
        shift = cut * cut * largest
        self.kind, self.sigma_max = "ridge", math.sqrt(largest)
        self.ridge = torch.linalg.cholesky(gram + shift * identity)
        below = _count_below(gram, shift)
        cond = math.inf
        unshifted, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:  # merely ill-conditioned: its smallest eigenvalue is still within reach
            smallest = _power_estimates(n, gram, lambda v: gram @ v, lambda v: torch.linalg.solve_triangular(
                unshifted.T, torch.linalg.solve_triangular(unshifted, v, upper=False), upper=True))[1]
            cond = math.sqrt(largest / smallest) if smallest > 0 else math.inf
        self.spectrum = _Spectrum(n - below, cond)

    def _splu_solve(self, y, trans="N"):
        array = np.ascontiguousarray(y.detach().cpu().numpy())
        return torch.from_numpy(self.splu.solve(array, trans=trans)).to(y.device)

    def _solve_gram(self, y):
        """(K^T K)^-1 y."""
        if self.kind == "splu":
            return self._splu_solve(self._splu_solve(y, "T"))
        if self.kind == "lu":
            return torch.linalg.lu_solve(self.lu, self.pivots, torch.linalg.lu_solve(
                self.lu, self.pivots, y, adjoint=True))
        if self.kind == "qr":
            step = torch.linalg.solve_triangular(self.r.T, y, upper=False)
            return torch.linalg.solve_triangular(self.r, step, upper=True)
        if self.kind == "svd":
            return self.vh.T @ (self.inverse[:, None] ** 2 * (self.vh @ y))
        return torch.linalg.solve_triangular(self.ridge.T, torch.linalg.solve_triangular(self.ridge, y, upper=False),
                                             upper=True)

    def least_squares(self, b):
        """The least-squares (minimum-norm when truncated) solution of K x = b."""
        if self.kind == "splu":
            return self._splu_solve(b)
        if self.kind == "lu":
            return torch.linalg.lu_solve(self.lu, self.pivots, b)
        if self.kind == "qr":
            return torch.linalg.solve_triangular(self.r, self.q.T @ b, upper=True)
        if self.kind == "svd":
            return self.vh.T @ (self.inverse[:, None] * (self.u.T @ b))
        return self._solve_gram(self.apply_t(b))

    def solve(self, system):
        x = self.least_squares(system.rhs)
        if self.kind in ("svd", "ridge"):  # LU and QR are backward stable already
            for _ in range(_REFINE_STEPS - 1):
                x = x + self.least_squares(system.rhs - system.apply(x))
        return x

    def small_subspace(self, k):
        """An orthonormal basis S (n, k) of K's k smallest right singular directions, with K S and
        their singular values (ascending), by block inverse iteration through the factorisation."""
        if self._subspace is None or self._subspace[0].shape[1] < k:
            if self.kind == "svd":  # the decomposition holds them already
                basis = self.vh.T[:, torch.argsort(self.sigma)[:k]]
            else:
                generator = torch.Generator().manual_seed(1)
                basis = torch.randn(self.shape[1], k, dtype=torch.float64, generator=generator).to(self._device())
                for _ in range(_SUBSPACE_ITERATIONS):
                    basis, _ = torch.linalg.qr(self._solve_gram(basis))
            images = self.apply(basis)
            left, sigma, right = torch.linalg.svd(images, full_matrices=False)
            order = torch.argsort(sigma)
            rotation = right.T[:, order]
            self._subspace = (basis @ rotation, left[:, order] * sigma[order], sigma[order])
        return self._subspace


def _diverged(system):
    """What a layer returns when its data are not finite: an earlier solve diverged."""
    rhs = system.rhs
    return torch.full((system.shape[1], rhs.shape[1]), math.nan, dtype=rhs.dtype, device=rhs.device), \
        _Spectrum(0, math.inf)


def _solve_eigh(system, rtol):
    eigenvalues, vectors = torch.linalg.eigh(system.gram)
    sigma = eigenvalues.clamp_min(0).sqrt()
    spectrum = _spectrum(sigma, rtol)
    if rtol < _GRAM_RESOLVES and spectrum.cond > 1.0 / _GRAM_RESOLVES:
        return None  # below what K^T K resolves: decide on K itself
    keep = sigma > rtol * float(sigma.max().clamp_min(1e-300))
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(1e-300), torch.zeros_like(eigenvalues))

    def solve_normal(y):
        return vectors @ (inverse[:, None] * (vectors.T @ y))

    return system.refine(solve_normal(system.apply_t(system.rhs)), solve_normal), spectrum


def _solve_cholesky(system, rtol):
    factor, info = torch.linalg.cholesky_ex(system.gram)
    if int(info) != 0:
        return None

    def solve_normal(y):
        # two triangular solves: much faster than cholesky_solve for a few right-hand sides
        return torch.linalg.solve_triangular(factor.T, torch.linalg.solve_triangular(factor, y, upper=False),
                                             upper=True)

    n = system.shape[1]
    estimates = _power_estimates(n, system.gram, lambda v: system.gram @ v, solve_normal)
    if estimates is None:
        return None
    spectrum = _spectrum(torch.tensor(estimates, dtype=torch.float64).clamp_min(0).sqrt(), rtol)
    if spectrum.cond > 1.0 / max(rtol, _GRAM_RESOLVES):
        return None
    spectrum.rank = n
    return system.refine(solve_normal(system.apply_t(system.rhs)), solve_normal), spectrum


def _solve(system, rtol, fast_only=False):
    """Least-squares solution of a _System with its numerical rank and condition number.

    Fast paths work on K^T K; when that cannot decide the rank at the gradients'
    precision, K itself is factorised (LU, QR or, if rank-deficient, SVD), unless
    fast_only, which then returns None.
    """
    if not bool(torch.isfinite(system.rhs).all()):
        return _diverged(system)
    if system.shape[0] == 0:  # no equation at all (weight constraints where every ReLU unit is off)
        return system.rhs.new_zeros(system.shape[1], system.rhs.shape[1]), _Spectrum(0, math.inf)
    if not bool(torch.isfinite(system.gram).all()):
        return _diverged(system)
    solved = (_solve_eigh if system.shape[1] <= _EIGH_MAX else _solve_cholesky)(system, rtol)
    if solved is not None or fast_only:
        return solved
    # K^T K could not decide: at float64 precision K itself may resolve more; at lower precisions
    # K^T K resolves the tolerance, so the system is known to be rank-deficient.
    factor = _Factor(system.shape, rtol, lambda: system.matrix, system.apply, system.apply_t,
                     deficient=rtol >= _GRAM_RESOLVES and system.shape[1] > _EIGH_MAX)
    return factor.solve(system), factor.spectrum


# -----------------------------------------------------------------------------
# The attack
# -----------------------------------------------------------------------------

FIRST_LAYER_METHODS = ("weights", "gradients", "hybrid")
RELU_TESTS = ("relative", "absolute")  # the suite's ReLU test and the published code's
_INVERTIBLE = (nn.Conv2d, nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Flatten, nn.Linear)
_ACTIVATION_TYPES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


@dataclass
class _ConvStep:
    number: int  # 1 for the first conv layer
    position: int  # index among the model's layers, for error messages
    conv: nn.Conv2d
    activation: str = "identity"
    slope: float = 0.0
    padding: tuple = (0, 0)


@dataclass
class _Network:
    steps: list
    linear: nn.Linear
    parameter_names: list


def _flat_layers(model):
    for child in model.children():
        if isinstance(child, nn.Sequential):
            yield from _flat_layers(child)
        else:
            yield child


def _conv_padding(conv, position):
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if all(k % 2 == 1 for k in conv.kernel_size):
            return tuple(k // 2 for k in conv.kernel_size)
        raise ValueError(f"layer {position} (Conv2d): padding='same' with an even kernel pads unevenly; "
                         f"use an explicit padding")
    return tuple(conv.padding)


def _parse_network(model):
    """Check that R-CONV can invert `model` and list its conv steps and final Linear layer."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"reconstruct needs an nn.Sequential (or ConvNet) of Conv2d, activations, Flatten "
                         f"and one final Linear; got {type(model).__name__}")
    steps, linear = [], None
    layers = list(_flat_layers(model))
    for position, layer in enumerate(layers):
        kind = type(layer).__name__
        if not isinstance(layer, _INVERTIBLE):
            raise ValueError(f"layer {position} ({kind}) cannot be inverted by R-CONV; supported layers are "
                             f"Conv2d, ReLU, LeakyReLU, Sigmoid, Tanh, Identity, Flatten and one final Linear")
        if linear is not None:
            raise ValueError(f"layer {position} ({kind}) follows the Linear layer; R-CONV needs the Linear "
                             f"layer to be the last one")
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or any(d != 1 for d in layer.dilation) or layer.padding_mode != "zeros":
                raise ValueError(f"layer {position} (Conv2d): only groups=1, dilation=1 and zero padding are "
                                 f"supported; got groups={layer.groups}, dilation={layer.dilation}, "
                                 f"padding_mode={layer.padding_mode!r}")
            steps.append(_ConvStep(len(steps) + 1, position, layer, padding=_conv_padding(layer, position)))
        elif type(layer) in _ACTIVATION_TYPES:
            if not steps or steps[-1].activation != "identity":
                raise ValueError(f"layer {position} ({kind}) must directly follow a Conv2d layer")
            if isinstance(layer, nn.LeakyReLU) and layer.negative_slope <= 0:
                raise ValueError(f"layer {position} (LeakyReLU): negative_slope must be positive to be "
                                 f"invertible; got {layer.negative_slope}")
            steps[-1].activation = _ACTIVATION_TYPES[type(layer)]
            steps[-1].slope = float(getattr(layer, "negative_slope", 0.0))
        elif isinstance(layer, nn.Linear):
            if layer.bias is None:
                raise ValueError(f"layer {position} (Linear) has no bias; R-CONV recovers the Linear layer's "
                                 f"input as dL/dW / dL/db and needs the bias gradient")
            linear = layer
    if linear is None:
        raise ValueError("the model has no final Linear layer; R-CONV starts from the Linear layer's gradients")
    names = [name for name, _ in model.named_parameters()]
    return _Network(steps, linear, names)


def _check_gradients(model, network, grads):
    parameters = list(model.parameters())
    if isinstance(grads, dict):
        missing = [name for name in network.parameter_names if name not in grads]
        extra = [name for name in grads if name not in network.parameter_names]
        if missing or extra:
            raise ValueError(f"gradients by name must match model.named_parameters(): missing {missing}, "
                             f"unexpected {extra}")
        grads = [grads[name] for name in network.parameter_names]
    grads = list(grads)
    if len(grads) != len(parameters):
        raise ValueError(f"expected {len(parameters)} gradient tensors (one per parameter of the model, in "
                         f"model.parameters() order); got {len(grads)}")
    for name, parameter, grad in zip(network.parameter_names, parameters, grads):
        if not isinstance(grad, torch.Tensor):
            raise ValueError(f"gradient of {name} is a {type(grad).__name__}, not a tensor")
        if tuple(grad.shape) != tuple(parameter.shape):
            raise ValueError(f"gradient of {name} has shape {tuple(grad.shape)}; the parameter has shape "
                             f"{tuple(parameter.shape)}")
        if not torch.isfinite(grad).all():
            raise ValueError(f"gradient of {name} holds NaN or infinite values")
    by_id = {id(p): g for p, g in zip(parameters, grads)}
    return by_id


def _check_input_shape(network, input_shape):
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) or (1, C, H, W); got {tuple(input_shape)}")
    sizes = [shape]
    for step in network.steps:
        channels, height, width = sizes[-1]
        if channels != step.conv.in_channels:
            raise ValueError(f"layer {step.position} (Conv2d) expects {step.conv.in_channels} input channels; "
                             f"input_shape {shape} gives {channels}")
        out = _conv_output_size((height, width), step.conv.kernel_size, step.conv.stride, step.padding)
        if min(out) < 1:
            raise ValueError(f"layer {step.position} (Conv2d) leaves no output for an input of {height}x{width}")
        sizes.append((step.conv.out_channels, *out))
    features = math.prod(sizes[-1])
    if features != network.linear.in_features:
        raise ValueError(f"input_shape {shape} gives {features} features at the Linear layer, which expects "
                         f"{network.linear.in_features}")
    return sizes


def _activation_grad(activation, slope, output, relu_threshold):
    """d(activation)/d(input) written through the activation's output, which R-CONV knows."""
    if activation == "relu":
        return (output > relu_threshold).to(output.dtype)
    if activation == "leaky_relu":
        return torch.where(output > 0, torch.ones_like(output), torch.full_like(output, slope))
    if activation == "sigmoid":
        return output * (1 - output)
    if activation == "tanh":
        return 1 - output * output
    return torch.ones_like(output)


def _repair_branches(derivative, activation, slope, output, output_grad, bias_grad, band, tolerance):
    """Settle units whose recovered output is too close to zero to tell ReLU's (or LeakyReLU's)
    branch: per filter, choose the branches that best satisfy dL/db[f] = sum_pq dL/dO[f, p, q].

    The bias gradient is information the paper's method leaves unused; it resolves the few
    units that rounding noise would otherwise put on the wrong side of zero.
    """
    if activation not in ("relu", "leaky_relu") or bias_grad is None or band <= 0:
        return derivative
    low = 0.0 if activation == "relu" else slope
    derivative = derivative.clone()
    residuals = bias_grad - (output_grad * derivative).sum((1, 2))
    for f in torch.nonzero(residuals.abs() > tolerance).flatten().tolist():
        near = torch.nonzero(output[f].abs().flatten() <= band).flatten()
        if len(near) == 0:
            continue
        near = near[torch.argsort(output[f].abs().flatten()[near])[:_REPAIR_MAX_UNITS]]
        grads, current = output_grad[f].flatten()[near], derivative[f].flatten()[near]
        choices = torch.tensor(list(itertools.product((low, 1.0), repeat=len(near))), dtype=grads.dtype,
                               device=grads.device)
        misfit = (residuals[f] - (choices - current) @ grads).abs()
        best = int(torch.argmin(misfit))
        if float(misfit[best]) < abs(float(residuals[f])):
            derivative[f].view(-1)[near] = choices[best]
    return derivative


def _preactivation(activation, slope, output, derivative, saturation):
    """The pre-activation O where the activation's output reveals it, and a mask of where it does."""
    if activation == "relu":
        return output.clamp_min(0), derivative > 0
    if activation == "leaky_relu":
        return torch.where(derivative == 1, output, output / slope), torch.ones_like(output, dtype=torch.bool)
    if activation == "sigmoid":
        known = (output > saturation) & (output < 1 - saturation)
        clipped = output.clamp(saturation, 1 - saturation)
        return torch.log(clipped) - torch.log1p(-clipped), known
    if activation == "tanh":
        known = output.abs() < 1 - saturation
        return torch.atanh(output.clamp(-1 + saturation, 1 - saturation)), known
    return output, torch.ones_like(output, dtype=torch.bool)


@dataclass
class LayerReport:
    """How one conv layer's input was recovered."""

    layer: int  # conv layer number, 1 = the first
    method: str  # "gradients", "weights", "hybrid" or "gradients+weights"
    equations: int
    unknowns: int
    rank: int  # numerical rank at the gradients' precision
    cond: float
    residual: float  # relative residual of the solved system
    bias_residual: float  # |sum dL/dO - dL/db| / |dL/db|: checks the recovered output gradient
    known_outputs: float  # fraction of pre-activation outputs the activation reveals
    seconds: float = 0.0

    @property
    def full_rank(self):
        return self.rank == self.unknowns


@dataclass
class Reconstruction:
    """A recovered image with the per-layer diagnostics that justify (or not) trusting it."""

    image: torch.Tensor  # (1, C, H, W) float64
    layers: list = field(default_factory=list)  # LayerReport per conv layer, first to last
    exact: bool = False  # every layer full rank with small residuals
    seconds: float = 0.0
    method: str = "rconv"
    features: torch.Tensor | None = None  # the recovered input of the Linear layer
    linear_misfit: float = 0.0  # |dL/dW - dL/db x^T| / |dL/dW|: zero for one image's gradients
    notes: list = field(default_factory=list)  # what limits this reconstruction, in words
    inputs: list = field(default_factory=list)  # recovered input of each conv layer, first to last
    iterations: int = 0  # optimisation steps taken (the baselines); R-CONV takes none

    def report(self):
        """The per-layer diagnostics as a pandas DataFrame, in solving order (last layer first)."""
        import pandas as pd
        rows = [vars(r) | {"full_rank": r.full_rank} for r in reversed(self.layers)]
        return pd.DataFrame(rows)


def _tolerances(dtype, relu_tol):
    eps = _eps(dtype)
    return dict(dtype=dtype, residual=math.sqrt(eps),
                relu=default_relu_tol(dtype) if relu_tol is None else float(relu_tol),
                saturation=max(1e-12, 10 * eps))


def _weights_key(step, weight, bias, input_size):
    # Keyed on the weights' bytes, so a cache entry can never outlive a change of weights.
    digest = hashlib.sha1(weight.detach().cpu().numpy().tobytes())
    if bias is not None:
        digest.update(bias.detach().cpu().numpy().tobytes())
    return ("weights", digest.hexdigest(), tuple(step.conv.stride), step.padding, tuple(input_size),
            str(weight.device))


class _WeightSystem:
    """A conv layer's weight constraints M x + b = O, and what depends only on its weights.

    M is applied as a convolution and stored by its nonzeros; dense and sparse copies,
    factorisations and the deflation subspace are built when first needed and then reused.
    """

    def __init__(self, weight, input_shape, stride, padding):
        self.weight, self.input_shape, self.stride, self.padding = weight, tuple(input_shape), stride, padding
        self.rows, self.cols, self.values, self.shape = _weight_entries(weight, input_shape[1:], stride, padding)
        self.output_shape = (weight.shape[0], *_conv_output_size(input_shape[1:], weight.shape[2:], stride, padding))
        self.row_norms = torch.zeros(self.shape[0], dtype=weight.dtype, device=weight.device).index_add_(
            0, self.rows, self.values * self.values)
        self.factors, self._gram = {}, None

    def apply(self, x):
        images = x.T.reshape(x.shape[1], *self.input_shape)
        return F.conv2d(images, self.weight, stride=self.stride, padding=self.padding).reshape(x.shape[1], -1).T

    def apply_t(self, y):
        outputs = y.T.reshape(y.shape[1], *self.output_shape)
        inputs = torch.nn.grad.conv2d_input((y.shape[1], *self.input_shape), self.weight, outputs,
                                            stride=self.stride, padding=self.padding)
        return inputs.reshape(y.shape[1], -1).T

    def dense(self):
        return _dense(self.rows, self.cols, self.values, self.shape)

    def sparse(self, known=None):
        import scipy.sparse
        matrix = scipy.sparse.csr_matrix((self.values.cpu().numpy(), (self.rows.cpu().numpy(),
                                          self.cols.cpu().numpy())), shape=self.shape)
        return matrix if known is None else matrix[known.cpu().numpy()]

    def gram(self, known):
        """M^T M over the rows in `known`, through sparse products on the CPU."""
        everything = bool(known.all())
        if everything and self._gram is not None:
            return self._gram
        if self.weight.device.type == "cpu":
            selected = self.sparse(None if everything else known)
            gram = torch.from_numpy((selected.T @ selected).toarray())
        else:
            selected = self.dense() if everything else self.dense()[known]
            gram = selected.T @ selected
        if everything:
            self._gram = gram
        return gram

    def factor(self, rtol):
        """A cached _Factor of M with all rows (M does not depend on the image)."""
        if rtol not in self.factors:
            square_on_cpu = self.shape[0] == self.shape[1] and self.weight.device.type == "cpu"
            self.factors[rtol] = _Factor(self.shape, rtol, self.dense, self.apply, self.apply_t,
                                         sparse=self.sparse() if square_on_cpu else None)
        return self.factors[rtol]


def _weight_system(step, weight, input_shape, cache):
    key = _weights_key(step, weight, step.conv.bias, input_shape)
    if cache is not None and key in cache:
        return cache[key]
    system = _WeightSystem(weight, input_shape, tuple(step.conv.stride), step.padding)
    if cache is not None:
        cache[key] = system
    return system


def _gradient_system(output_grad, weight_grad, input_size, step):
    matrix = grad_constraints(output_grad, input_size, step.conv.kernel_size, step.conv.stride, step.padding)
    rhs = weight_grad.permute(0, 2, 3, 1).reshape(matrix.shape[0], -1)
    return matrix, rhs


def _hybrid_scales(grad_matrix, weights, known, channels):
    # Each kind of constraint is scaled to unit Frobenius norm so that neither dominates. A kind
    # that offers no equation at all (every ReLU unit off) keeps scale 1: scaling zero up would
    # overflow its Gram matrix into NaN instead of reporting rank 0.
    grad_norm = math.sqrt(channels) * float(torch.linalg.norm(grad_matrix))
    weight_norm = float(weights.row_norms[known].sum().sqrt())
    return (1.0 / grad_norm if grad_norm > 0 else 1.0), (1.0 / weight_norm if weight_norm > 0 else 1.0)


def _joint_system(grad_part, weights, known, weight_rhs, channels):
    """Gradient constraints (per channel, optional) stacked on weight constraints, on x (C*H*W, 1)."""
    parts = []  # (scale, apply, apply_t, rhs, gram, matrix)
    grad_scale, weight_scale = _hybrid_scales(grad_part[0], weights, known, channels) if grad_part else (1.0, 1.0)
    if grad_part is not None:
        matrix, b = grad_part
        pixels = matrix.shape[1]
        parts.append((grad_scale,
                      lambda x: (matrix @ x.view(channels, pixels).T).T.reshape(-1, 1),
                      lambda y: (matrix.T @ y.view(channels, -1).T).T.reshape(-1, 1),
                      b.T.reshape(-1, 1),
                      lambda: torch.block_diag(*[matrix.T @ matrix] * channels),
                      lambda: torch.block_diag(*[matrix] * channels)))

    def scatter(y):
        full = y.new_zeros(weights.shape[0], y.shape[1])
        full[known] = y
        return weights.apply_t(full)

    parts.append((weight_scale, lambda x: weights.apply(x)[known], scatter, weight_rhs.reshape(-1, 1),
                  lambda: weights.gram(known), lambda: weights.dense()[known]))
    sizes = [len(part[3]) for part in parts]

    def apply(x):
        return torch.cat([s * f(x) for s, f, *_ in parts])

    def apply_t(y):
        return sum(s * f(piece) for (s, _, f, *_), piece in zip(parts, torch.split(y, sizes)))

    return _System((sum(sizes), weights.shape[1]), apply, apply_t, torch.cat([s * b for s, _, _, b, *_ in parts]),
                   gram=lambda: sum(s * s * g() for s, _, _, _, g, _ in parts),
                   matrix=lambda: torch.cat([s * m() for s, *_, m in parts]))


def _deflated_hybrid(grad_part, weights, weight_rhs, channels, dtype):
    """The hybrid first layer, fast: weight constraints solved through a factorisation cached per
    model, then corrected by the least-squares fit of both kinds of constraints within the span of
    M's smallest singular directions, the only ones where the weights alone are unreliable."""
    known = torch.ones(weights.shape[0], dtype=torch.bool, device=weights.weight.device)
    system = _joint_system(grad_part, weights, known, weight_rhs, channels)
    factor = weights.factor(_rank_rtol(torch.float64, weights.shape))
    basis, weight_images, ritz = factor.small_subspace(min(weights.shape[1], _DEFLATION_SIZE))
    grad_scale, weight_scale = _hybrid_scales(grad_part[0], weights, known, channels)
    matrix = grad_part[0]
    directions = basis.shape[1]
    grad_images = (matrix @ basis.view(channels, matrix.shape[1], directions)).reshape(-1, directions)
    reduced = torch.cat([grad_scale * grad_images, weight_scale * weight_images])
    x = factor.least_squares(weight_rhs.reshape(-1, 1))
    eigenvalues, vectors = torch.linalg.eigh(reduced.T @ reduced)
    sigma = eigenvalues.clamp_min(0).sqrt()
    # Directions outside the subspace keep at least the weights' k-th smallest singular value.
    top = math.hypot(weight_scale * factor.sigma_max, grad_scale * math.sqrt(channels) * _norm_2(matrix))
    top = max(top, float(sigma.max()))
    floor = min(float(sigma.min()), weight_scale * float(ritz.max())) if directions < weights.shape[1] \
        else float(sigma.min())
    rtol = _rank_rtol(dtype, system.shape)
    keep = sigma > rtol * top
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(1e-300), torch.zeros_like(eigenvalues))
    for _ in range(2):
        coefficients = vectors @ (inverse[:, None] * (vectors.T @ (reduced.T @ (system.rhs - system.apply(x)))))
        x = x + basis @ coefficients
    spectrum = _Spectrum(weights.shape[1] - int((~keep).sum()), top / floor if floor > 0 else math.inf)
    return x, spectrum, system


def _fc_features(weight_grad, bias_grad):
    """The Linear layer's input from x_n = dL/dW[m, n] / dL/db[m], all outputs m in least squares."""
    energy = float(bias_grad @ bias_grad)
    if energy == 0.0:
        raise ValueError("the Linear layer's bias gradient is zero (the loss is saturated), so its input "
                         "cannot be recovered")
    features = bias_grad @ weight_grad / energy
    misfit = float(torch.linalg.norm(weight_grad - torch.outer(bias_grad, features)) /
                   torch.linalg.norm(weight_grad).clamp_min(1e-300))
    return features, misfit


def _batch_tolerance(dtype):
    return min(0.05, 1e3 * _eps(dtype))


# The values an activation's output can take, for project=True.
_VALUE_RANGES = {"relu": (0.0, None), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}


def _branches(step, output, output_grad, bias_grad, tol, noise_gain, relu_test, negative):
    """The activation's derivative at every unit of a layer, and the band around zero where rounding
    noise could flip a ReLU or LeakyReLU branch. `negative` is the most negative recovered output
    (before any projection), which behind ReLU only noise produces."""
    if relu_test == "absolute":  # the published code: outputs rounded to 7 decimals, no repair
        rounded = torch.round(output * 1e7) / 1e7
        if step.activation == "relu":
            return (rounded > 0).to(output.dtype), 0.0
        if step.activation == "leaky_relu":
            return torch.where(rounded < 0, torch.full_like(output, step.slope), torch.ones_like(output)), 0.0
        return _activation_grad(step.activation, step.slope, output, 0.0), 0.0
    scale = float(output.abs().max()) if output.numel() else 0.0
    threshold = max(tol["relu"] * scale, 3.0 * negative)
    derivative = _activation_grad(step.activation, step.slope, output, threshold)
    # How far a recovered output may stray: the previous solve's condition number times the
    # gradients' precision, or the noise seen behind ReLU.
    band = max(threshold, noise_gain * _eps(tol["dtype"]) * scale)
    tolerance = tol["residual"] * float(torch.linalg.norm(bias_grad)) if bias_grad is not None else 0.0
    derivative = _repair_branches(derivative, step.activation, step.slope, output, output_grad, bias_grad, band,
                                  tolerance)
    return derivative, band


def reconstruct(model, grads, input_shape, *, first_layer="hybrid", relu_tol=None, relu_test="relative",
                project=False, image_range=(0.0, 1.0), device=None, check_batch=True, cache=None):
    """Recover the training image behind one client's gradients with R-CONV.

    Args:
        model: the network the client trained (nn.Sequential of Conv2d, activations, Flatten, Linear).
        grads: gradients in model.parameters() order (list) or by parameter name (dict).
        input_shape: (C, H, W) of the image.
        first_layer: how to recover the first conv layer's input: "weights" (the paper: O = conv(x) + b),
            "gradients" (gradient constraints only) or "hybrid" (both, each scaled to unit norm).
        relu_tol: the ReLU test's floor: outputs at or below relu_tol * (the layer's largest output), or
            three times the layer's noise floor if that is larger, count as inactive; None picks
            default_relu_tol for the gradients' dtype. Ignored by relu_test="absolute".
        relu_test: "relative" (relu_tol, the layer's noise floor, and the bias gradient to settle
            near-zero units) or "absolute" (the published code: outputs rounded to 7 decimals).
        project: clip every recovered layer input to the values it can take (the image to
            image_range, ReLU outputs to >= 0, Sigmoid to [0, 1], Tanh to [-1, 1]). The truth
            lies in that box, so clipping never moves an estimate away from it: a regularisation
            for noisy or defended gradients. Off by default, so exactness is judged unaided.
        device: where to solve ("cpu", "cuda"); None means the gradients' device.
        check_batch: refuse gradients whose Linear layer is not rank one (a batch of several images).
        cache: a dict shared between calls on the same model, holding what depends only on the weights.
    Returns a Reconstruction.
    """
    start = time.perf_counter()
    if first_layer not in FIRST_LAYER_METHODS:
        raise ValueError(f"first_layer must be one of {', '.join(FIRST_LAYER_METHODS)}; got {first_layer!r}")
    if relu_test not in RELU_TESTS:
        raise ValueError(f"relu_test must be one of {', '.join(RELU_TESTS)}; got {relu_test!r}")
    network = _parse_network(model)
    by_id = _check_gradients(model, network, grads)
    sizes = _check_input_shape(network, input_shape)
    grad_dtype = next(iter(by_id.values())).dtype
    if not grad_dtype.is_floating_point:
        raise ValueError(f"gradients must be floating point; got {grad_dtype}")
    tol = _tolerances(grad_dtype, relu_tol)
    device = torch.device(device) if device is not None else next(iter(by_id.values())).device
    wide = dict(device=device, dtype=torch.float64)

    def grad_of(parameter):
        return by_id[id(parameter)].to(**wide)

    linear = network.linear
    features, misfit = _fc_features(grad_of(linear.weight), grad_of(linear.bias))
    if check_batch and misfit > _batch_tolerance(grad_dtype):
        raise ValueError(f"the Linear layer's weight gradient is not rank one (relative misfit {misfit:.2g}); "
                         f"these look like the gradients of a batch of more than one image, and R-CONV "
                         f"recovers a single image (pass check_batch=False to try anyway)")
    notes = []
    largest = float(grad_of(linear.bias).abs().max())
    if largest < torch.finfo(grad_dtype).tiny:
        notes.append(f"the loss is saturated: the Linear layer's bias gradient is subnormal in {_dtype_name(grad_dtype)} "
                     f"(largest entry {largest:.2g}), so the gradients keep only a few significant bits")
    output = features.view(sizes[-1])
    output_grad = (linear.weight.detach().to(**wide).T @ grad_of(linear.bias)).view(sizes[-1])
    inputs, reports = [None] * len(network.steps), [None] * len(network.steps)
    noise_gain = 10.0  # the Linear layer's ratio is well conditioned
    negative = max(0.0, -float(output.min()))
    for step in reversed(network.steps):
        layer_start = time.perf_counter()
        channels, height, width = sizes[step.number - 1]
        weight = step.conv.weight.detach().to(**wide)
        bias = step.conv.bias.detach().to(**wide) if step.conv.bias is not None else None
        bias_grad = grad_of(step.conv.bias) if step.conv.bias is not None else None
        derivative, band = _branches(step, output, output_grad, bias_grad, tol, noise_gain, relu_test, negative)
        pre_grad = output_grad * derivative
        preact, known = _preactivation(step.activation, step.slope, output, derivative, tol["saturation"])
        if step.activation == "relu" and relu_test == "relative":
            known &= output > band  # a pre-activation read off a near-zero output may be a dead unit's
        weight_grad = grad_of(step.conv.weight)
        grad_part = _gradient_system(pre_grad, weight_grad, (height, width), step)
        known_rows = known.reshape(-1)
        weight_rhs = (preact - (bias.view(-1, 1, 1) if bias is not None else 0.0)).reshape(-1)[known_rows]
        weights = _weight_system(step, weight, (channels, height, width), cache)
        method = first_layer if step.number == 1 else "gradients"
        x, spectrum, residual = _solve_layer(method, grad_part, weights, known_rows, weight_rhs, channels,
                                             tol["dtype"])
        unknowns = channels * height * width
        # Fall back on weight constraints when the gradient constraints are deficient.
        if spectrum.rank < unknowns and step.number > 1 and \
                bool(known.any()) and unknowns <= _JOINT_MAX_UNKNOWNS:
            repaired = _solve_layer("hybrid", grad_part, weights, known_rows, weight_rhs, channels, tol["dtype"],
                                    fallback=True)
            if repaired is not None and repaired[1].rank > spectrum.rank:
                method = "gradients+weights"
                x, spectrum, residual = repaired
        x = x.reshape(channels, height, width)
        negative = max(0.0, -float(x.min())) if x.numel() else 0.0
        if project:
            previous = network.steps[step.number - 2].activation if step.number > 1 else None
            low, high = _VALUE_RANGES.get(previous, (None, None)) if previous else image_range
            if low is not None or high is not None:
                x = x.clamp(low, high)
        noise_gain = 10.0 * min(spectrum.cond, 1.0 / _eps(grad_dtype))
        bias_residual = 0.0
        if bias_grad is not None:
            bias_residual = float(torch.linalg.norm(pre_grad.sum((1, 2)) - bias_grad) /
                                  torch.linalg.norm(bias_grad).clamp_min(1e-300))
        equations = (grad_part[0].shape[0] * channels if method != "weights" else 0) + \
            (int(known.sum()) if method != "gradients" else 0)
        reports[step.number - 1] = LayerReport(
            layer=step.number, method=method, equations=equations, unknowns=unknowns, rank=spectrum.rank,
            cond=spectrum.cond, residual=residual, bias_residual=bias_residual,
            known_outputs=float(known.double().mean()), seconds=time.perf_counter() - layer_start)
        inputs[step.number - 1] = x
        output_grad = torch.nn.grad.conv2d_input((1, channels, height, width), weight, pre_grad[None],
                                                 stride=step.conv.stride, padding=step.padding)[0]
        output = x
    exact = all(r.full_rank and r.residual <= tol["residual"] and r.bias_residual <= tol["residual"]
                for r in reports)
    image = output.detach().cpu()[None]
    return Reconstruction(image=image, layers=reports, exact=exact, seconds=time.perf_counter() - start,
                          features=features.cpu(), linear_misfit=misfit, notes=notes,
                          inputs=[t.cpu() for t in inputs])


def _solve_layer(method, grad_part, weights, known, weight_rhs, channels, dtype, fallback=False):
    """Solve one conv layer for its input, returned as (C, H*W), with its spectrum and residual.

    fallback: an attempt to repair rank-deficient gradient constraints; gives up (None) rather
    than analyse a large system that is rank-deficient too.
    """
    matrix, rhs = grad_part
    pixels = matrix.shape[1]
    if method == "hybrid" and not bool(known.any()):
        method = "gradients"  # no weight constraint left (every ReLU unit off): the per-channel solve is the same
    if method == "gradients":
        system = _System(matrix.shape, lambda x: matrix @ x, lambda y: matrix.T @ y, rhs, matrix=matrix)
        x, spectrum = _solve(system, _rank_rtol(dtype, matrix.shape))
        return x.T, _Spectrum(spectrum.rank * channels, spectrum.cond), system.residual(x)
    if bool(known.all()) and weights.shape[0] >= weights.shape[1]:
        # M alone could determine the input and does not depend on the image: factorise it once.
        if method == "hybrid":
            x, spectrum, system = _deflated_hybrid(grad_part, weights, weight_rhs, channels, dtype)
        else:
            system = _joint_system(None, weights, known, weight_rhs, channels)
            factor = weights.factor(_rank_rtol(dtype, weights.shape))
            x, spectrum = factor.solve(system), factor.spectrum
    else:
        if channels * pixels > _JOINT_MAX_UNKNOWNS:
            raise ValueError(f"the {method} system couples all {channels * pixels} input values of a conv layer "
                             f"in one dense solve (at most {_JOINT_MAX_UNKNOWNS} here); use first_layer="
                             f"'gradients' with enough filters (see min_filters) for inputs this large")
        system = _joint_system(grad_part if method == "hybrid" else None, weights, known, weight_rhs, channels)
        solved = _solve(system, _rank_rtol(dtype, system.shape), fast_only=fallback)
        if solved is None:
            return None
        x, spectrum = solved
    return x.view(channels, pixels), spectrum, system.residual(x)


def reconstruct_batch(model, grads_list, input_shape, *, progress=False, **options):
    """reconstruct() for many clients' gradients on one model, sharing what depends only on the weights.

    Returns one Reconstruction per entry of grads_list; options are reconstruct()'s keywords.
    """
    cache = options.pop("cache", None)
    cache = {} if cache is None else cache
    return [reconstruct(model, grads, input_shape, cache=cache, **options)
            for grads in _progress(grads_list, desc="R-CONV", unit="image", enabled=progress)]


# Optimisation attacks from the breaching package (Geiping et al.), on the same gradients.
# name -> (breaching attack config, overrides)
BASELINES = {
    "dlg": ("deepleakage", []),  # Zhu et al. 2019: image and label optimised jointly with L-BFGS
    "idlg": ("deepleakage", ["attack.attack_type=optimization", "attack.label_strategy=iDLG"]),  # label first
    "inverting_gradients": ("invertinggradients", []),  # Geiping et al. 2020: cosine loss, TV, boxed Adam
}


def run_baseline(name, model, grads, input_shape, label=None, iterations=None, seed=0):
    """An optimisation attack of the breaching package on the same gradients, as a Reconstruction.

    Args:
        name: one of BASELINES: "dlg", "idlg" or "inverting_gradients".
        label: the true label, if the attacker is to be given it; None lets the attack find it
            (DLG optimises it, iDLG and Inverting Gradients read it off the last layer's gradient).
        iterations: optimisation steps; None keeps breaching's default (DLG 1200, Inverting
            Gradients 24000, far beyond a CPU budget).
        seed: seed of the random starting image.
    The breaching package is optional: pip install -r requirements-baselines.txt.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    try:
        import breaching
        from omegaconf import OmegaConf
    except ImportError as error:
        raise ImportError("the baselines need the breaching package: pip install -r requirements-baselines.txt") \
            from error
    import contextlib
    import io
    import logging
    network = _parse_network(model)
    by_id = _check_gradients(model, network, grads)
    grads = [by_id[id(parameter)] for parameter in model.parameters()]
    shape = _check_input_shape(network, input_shape)[0]
    attack, overrides = BASELINES[name]
    overrides = [f"attack={attack}", "case=1_single_image_small", "attack.optim.callback=100000", *overrides]
    notes = []
    if iterations is not None:
        overrides.append(f"attack.optim.max_iterations={int(iterations)}")
    if name == "inverting_gradients" and shape[0] != 3:
        overrides.append("attack.regularization.total_variation.scale=0.0")
        notes.append("total variation off: breaching's implementation handles 3-channel images only")
    logging.getLogger("breaching").setLevel(logging.WARNING)
    chatter = io.StringIO()  # breaching prints its configuration and progress
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        config = breaching.get_config(overrides=overrides)
    setup = dict(device=torch.device("cpu"), dtype=torch.float32)
    attacker = breaching.attacks.prepare_attack(copy.deepcopy(model).float(), nn.CrossEntropyLoss(), config.attack,
                                                setup)
    metadata = OmegaConf.create(dict(shape=list(shape), modality="vision", task="classification",
                                     classes=network.linear.out_features, mean=[0.0] * shape[0],
                                     std=[1.0] * shape[0]))
    payload = [dict(parameters=[p.detach().float() for p in model.parameters()], buffers=None, metadata=metadata)]
    labels = None if label is None else torch.as_tensor([int(label)])
    shared = [dict(gradients=[g.detach().float().clone() for g in grads], buffers=None,
                   metadata=dict(num_data_points=1, labels=labels, local_hyperparams=None))]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.manual_seed(seed)
        output, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    found = output.get("labels")
    found = int(found.reshape(-1)[0].argmax() if found is not None and found.dtype.is_floating_point
                else found.reshape(-1)[0]) if found is not None else None
    return Reconstruction(image=output["data"][:1].detach().double().cpu(), exact=False, seconds=seconds,
                          method=name, iterations=int(config.attack.optim.max_iterations),
                          notes=[f"label found: {found}", *notes])


def compare_baselines(dataset, model_name, indices, *, iterations=None, dtype="float32", first_layer="hybrid",
                      seed=50, data_root=None, progress=True):
    """R-CONV and the BASELINES on the same clients' gradients.

    iterations: a dict baseline name -> optimisation steps (missing: breaching's default).
    Returns (table, reconstructions): one row per image and method (dataset, model, method,
    index, label, psnr, ssim, seconds, iterations, exact; reconstructions clipped to [0, 1]
    before they are measured) and a dict method -> list of recovered images, "original" first.
    """
    import pandas as pd
    info = dataset_info(dataset)
    indices = _indices(indices)
    images, labels = load_images(dataset, indices, root=data_root)
    model = build_model(model_name, info["channels"], info["num_classes"], seed=seed)
    iterations = dict(iterations or {})
    rows, shown, cache = [], {"original": list(images)}, {}
    items = _progress(list(zip(indices, images, labels)), desc=f"{info['name']} {model_name}", unit="image",
                      enabled=progress, mininterval=5.0)
    for index, image, label in items:
        grads = client_gradients(model, image, label, dtype=as_dtype(dtype))
        results = {"rconv": reconstruct(model, grads, image.shape, first_layer=first_layer, cache=cache)}
        for name in BASELINES:
            results[name] = run_baseline(name, model, grads, image.shape, iterations=iterations.get(name), seed=index)
        for method, result in results.items():
            metrics = image_metrics(image, result.image.clamp(0, 1))
            rows.append(dict(dataset=info["name"], model=model_name, method=method, index=index, label=int(label),
                             psnr=metrics["psnr"], ssim=metrics["ssim"], seconds=result.seconds,
                             iterations=result.iterations, exact=result.exact))
            shown.setdefault(method, []).append(result.image)
    return pd.DataFrame(rows), shown


# -----------------------------------------------------------------------------
# Metrics and reports
# -----------------------------------------------------------------------------

# PSNR below this no longer shows the image: where the suite says a defence stops the attack.
BROKEN_PSNR = 20.0


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def as_dtype(dtype):
    """A torch floating dtype from a name in DTYPES ("float32", ...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _dtype_name(dtype):
    return str(as_dtype(dtype)).replace("torch.", "")


def _as_image(image, name):
    array = torch.as_tensor(image).detach().cpu().double()
    if array.dim() == 4:
        if array.shape[0] != 1:
            raise ValueError(f"{name} must be one image; got a batch of shape {tuple(array.shape)}")
        array = array[0]
    if array.dim() != 3:
        raise ValueError(f"{name} must have shape (C, H, W) or (1, C, H, W); got {tuple(array.shape)}")
    return array


def image_metrics(original, reconstructed):
    """mse, psnr (dB, data range 1), ssim (scikit-image, data range 1) and max_abs_err of two images in [0, 1]."""
    from skimage.metrics import structural_similarity
    a, b = _as_image(original, "original"), _as_image(reconstructed, "reconstructed")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: original {tuple(a.shape)}, reconstructed {tuple(b.shape)}")
    difference = (a - b).numpy()
    mse = float(np.mean(difference ** 2))
    finite = np.isfinite(difference).all()
    psnr = math.inf if mse == 0 else (10 * math.log10(1.0 / mse) if finite else -math.inf)
    # SSIM compares what a viewer sees, so the reconstruction is clipped to the image range.
    ssim = float(structural_similarity(a.permute(1, 2, 0).numpy(), np.clip(np.nan_to_num(b.permute(1, 2, 0).numpy()), 0, 1),
                                       channel_axis=2, data_range=1.0)) if min(a.shape[1:]) >= 7 else math.nan
    return dict(mse=mse, psnr=psnr, ssim=ssim, max_abs_err=float(np.abs(difference).max()))


def layer_inputs(model, image):
    """The true input of every conv layer (first to last) and of the Linear layer, for one image (float64)."""
    model = copy.deepcopy(model).double()
    network = _parse_network(model)
    seen = {}
    hooks = [step.conv.register_forward_hook(lambda module, args, out, n=step.number: seen.__setitem__(n, args[0]))
             for step in network.steps]
    hooks.append(network.linear.register_forward_hook(lambda module, args, out: seen.__setitem__("linear", args[0])))
    try:
        with torch.no_grad():
            image = torch.as_tensor(image)
            model(image.reshape(1, *image.shape[-3:]).double())
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[step.number][0] for step in network.steps], seen["linear"][0]


def solve_steps(result, model=None, image=None):
    """R-CONV's steps in solving order (Linear layer, then conv layers last to first) as a DataFrame.

    With the model and the true image, each step also shows the largest error of what it
    recovered (the layer's input) against the truth.
    """
    import pandas as pd
    truth = layer_inputs(model, image) if model is not None and image is not None else None
    rows = [dict(step="linear", method="dL/dW / dL/db", equations=None, unknowns=len(result.features), rank=None,
                 cond=None, residual=result.linear_misfit, bias_residual=None)]
    if truth is not None:
        rows[0]["max_abs_err"] = float((result.features.double() - truth[1].reshape(-1)).abs().max())
    for report in reversed(result.layers):
        row = dict(step=f"conv {report.layer}", method=report.method, equations=report.equations,
                   unknowns=report.unknowns, rank=report.rank, cond=report.cond, residual=report.residual,
                   bias_residual=report.bias_residual)
        if truth is not None:
            recovered = result.inputs[report.layer - 1].double()
            row["max_abs_err"] = float((recovered - truth[0][report.layer - 1].reshape(recovered.shape)).abs().max())
        rows.append(row)
    return pd.DataFrame(rows)


def constraint_report(model, input_shape):
    """What each conv layer offers R-CONV: unknowns against gradient and weight constraints.

    One row per conv layer. gradient_constraints counts dL/dW entries (F*k*k per input
    channel, all channels); weight_constraints counts pre-activation outputs (F*P*Q).
    min_filters is the counting bound of min_filters(); gradients_suffice / weights_suffice
    say whether the counts alone could determine the input (a necessary condition; ReLU
    reveals the pre-activation only where active, so weights_need_active gives the
    fraction of outputs that must be active).
    """
    import pandas as pd
    network = _parse_network(model)
    sizes = _check_input_shape(network, input_shape)
    rows = []
    for step in network.steps:
        channels, height, width = sizes[step.number - 1]
        filters, out_h, out_w = sizes[step.number]
        kh, kw = step.conv.kernel_size
        unknowns = channels * height * width
        covered = torch.zeros(height + 2 * step.padding[0] + kh, width + 2 * step.padding[1] + kw, dtype=torch.bool)
        for i in range(kh):
            for j in range(kw):
                covered[i:i + step.conv.stride[0] * (out_h - 1) + 1:step.conv.stride[0],
                        j:j + step.conv.stride[1] * (out_w - 1) + 1:step.conv.stride[1]] = True
        uncovered = int((~covered[step.padding[0]:step.padding[0] + height,
                                  step.padding[1]:step.padding[1] + width]).sum())
        needed = min_filters((height, width), (kh, kw), step.conv.stride, step.padding)
        gradient_constraints = filters * kh * kw * channels
        weight_constraints_count = filters * out_h * out_w
        rows.append(dict(
            layer=step.number, input=f"{channels}x{height}x{width}", filters=filters, kernel=f"{kh}x{kw}",
            stride=step.conv.stride[0], padding=step.padding[0], activation=step.activation,
            unknowns=unknowns, gradient_constraints=gradient_constraints,
            weight_constraints=weight_constraints_count, uncovered_pixels=uncovered * channels,
            min_filters=needed, gradients_suffice=filters >= needed,
            weights_suffice=weight_constraints_count >= unknowns and uncovered == 0 and step.activation != "relu",
            weights_need_active=min(1.0, unknowns / weight_constraints_count)))
    return pd.DataFrame(rows)


def _check_choices(name, values, valid):
    unknown = [value for value in values if value not in valid]
    if unknown or not len(values):
        raise ValueError(f"{name} must be a non-empty list drawn from {', '.join(map(str, valid))}; "
                         f"got {list(values)}")


def attack_grid(dataset, model_name, indices, *, dtypes=("float32",), first_layers=("hybrid",),
                relu_tests=("relative",), defences=(("none", 0),), projects=(False,), seeds=(50,), data_root=None,
                keep=False, progress=True, **model_overrides):
    """R-CONV on dataset images over every combination of settings; the suite's tidy results.

    Every image is attacked as a client of the preset would leak it, for each seed (of the
    model's initialisation), gradient dtype, defence (name, strength) as in defend(), first
    layer method, ReLU test and projection. Returns a pandas DataFrame with one row per image
    and setting: dataset, model, activations, seed, index, label, dtype, first_layer,
    relu_test, defence, strength, project, mse, psnr, ssim, max_abs_err, exact,
    rank_deficient, seconds, notes. With keep=True also the list of Reconstructions, one per
    row. A setting that raises ValueError (say, top-k leaves no bias gradient) gets a row
    with its error in notes and NaN metrics; settings that could never run (an unknown first
    layer, ReLU test, defence or dtype) raise ValueError before any work.
    """
    import pandas as pd
    info = dataset_info(dataset)
    indices = _indices(indices)
    _check_choices("first_layers", first_layers, FIRST_LAYER_METHODS)
    _check_choices("relu_tests", relu_tests, RELU_TESTS)
    _check_choices("defences", [d for d, _ in defences], DEFENCES)
    dtypes = [as_dtype(dtype) for dtype in dtypes]
    for defence, strength in defences:
        defend([torch.zeros(1)], defence, strength)  # refuses impossible strengths before any work
    images, labels = load_images(dataset, indices, root=data_root)
    variants = list(itertools.product(first_layers, relu_tests, projects))
    total = len(seeds) * len(dtypes) * len(indices) * len(defences) * len(variants)
    bar = _progress(total=total, desc=f"{info['name']} {model_name}", unit="attack", enabled=progress)
    rows, kept = [], []
    for seed in seeds:
        model = build_model(model_name, info["channels"], info["num_classes"], seed=seed, **model_overrides)
        setting = dict(dataset=info["name"], model=model_name, activations="-".join(model.config["activations"]),
                       seed=seed)
        cache = {}
        for dtype in dtypes:
            for index, image, label in zip(indices, images, labels):
                grads = client_gradients(model, image, label, dtype=as_dtype(dtype))
                for defence, strength in defences:
                    shared = defend(grads, defence, strength, seed=index)
                    for first_layer, relu_test, project in variants:
                        row = dict(setting, index=index, label=int(label), dtype=_dtype_name(dtype),
                                   first_layer=first_layer, relu_test=relu_test, defence=defence, strength=strength,
                                   project=project)
                        try:
                            result = reconstruct(model, shared, image.shape, first_layer=first_layer,
                                                 relu_test=relu_test, project=project, cache=cache,
                                                 check_batch=defence == "none")
                        except ValueError as error:
                            result = None
                            row.update(mse=math.nan, psnr=math.nan, ssim=math.nan, max_abs_err=math.nan,
                                       exact=False, rank_deficient=False, seconds=math.nan, notes=str(error))
                        if result is not None:
                            row.update(**image_metrics(image, result.image), exact=result.exact,
                                       rank_deficient=not all(r.full_rank for r in result.layers),
                                       seconds=result.seconds, notes="; ".join(result.notes))
                        rows.append(row)
                        if keep:
                            kept.append(result)
                        bar.update()
    bar.close()
    table = pd.DataFrame(rows)
    return (table, kept) if keep else table


def attack_images(dataset, model_name, indices, *, dtypes=("float64", "float32"), first_layer="hybrid", seed=50,
                  data_root=None, progress=True, **model_overrides):
    """attack_grid() for one first layer method and seed, keeping the reconstructions.

    Returns (table, reconstructions), reconstructions a dict dtype name -> list of
    Reconstruction (None where the attack raised) in the order of indices. The first image of each dtype pays the
    one-time factorisations (see seconds).
    """
    table, results = attack_grid(dataset, model_name, indices, dtypes=dtypes, first_layers=(first_layer,),
                                 seeds=(seed,), data_root=data_root, keep=True, progress=progress, **model_overrides)
    reconstructions = {}
    for dtype, result in zip(table["dtype"], results):
        reconstructions.setdefault(dtype, []).append(result)
    return table, reconstructions


def output_gradients(model, image, label, dtype=torch.float64):
    """The true dL/dO of every conv layer's pre-activation output (first to last) for one image."""
    dtype = as_dtype(dtype)
    model = copy.deepcopy(model).to(dtype)
    network = _parse_network(model)
    outputs = {}

    def keep(module, args, out, number):
        out.retain_grad()
        outputs[number] = out

    hooks = [step.conv.register_forward_hook(lambda m, a, o, n=step.number: keep(m, a, o, n))
             for step in network.steps]
    try:
        image = torch.as_tensor(image).to(dtype)
        loss = F.cross_entropy(model(image.reshape(1, *image.shape[-3:])), torch.as_tensor([int(label)]))
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[step.number].grad[0].detach() for step in network.steps]


def filter_sweep(dataset, model_name, position, counts, indices, *, seeds=(50,), data_root=None, progress=True):
    """How many filters conv layer `position` (1 = first) needs for its gradient constraints alone.

    For each filter count, seed and image, the layer's true output gradient (float64) gives its
    gradient-constraint matrix; the row says whether it is full rank at float64 precision.
    Columns: dataset, model, activation, position, filters, seed, index, unknowns (pixels per
    channel), rank, full_rank, min_filters (the counting bound), rgap_filters (the filters a
    count of weight constraints, as R-GAP's rank analysis, asks for: C*H*W / (P*Q)).
    """
    import pandas as pd
    info = dataset_info(dataset)
    indices = _indices(indices)
    images, labels = load_images(dataset, indices, root=data_root)
    base = MODELS[_preset(model_name)]
    if not 1 <= position <= len(base["channels"]):
        raise ValueError(f"position must be 1..{len(base['channels'])} for {model_name}; got {position}")
    rows = []
    bar = _progress(total=len(counts) * len(seeds) * len(indices), desc=f"{model_name} layer {position}",
                    unit="image", enabled=progress)
    for filters in counts:
        channels = list(base["channels"])
        channels[position - 1] = int(filters)
        for seed in seeds:
            model = build_model(model_name, info["channels"], info["num_classes"], seed=seed, channels=channels)
            network = _parse_network(model)
            sizes = _check_input_shape(network, images.shape[1:])
            step = network.steps[position - 1]
            c_in, height, width = sizes[position - 1]
            _, out_h, out_w = sizes[position]
            needed = min_filters((height, width), step.conv.kernel_size, step.conv.stride, step.padding)
            for index, image, label in zip(indices, images, labels):
                grad = output_gradients(model, image, label)[position - 1]
                matrix = grad_constraints(grad, (height, width), step.conv.kernel_size, step.conv.stride,
                                          step.padding)
                sigma = torch.linalg.svdvals(matrix)
                rank = int((sigma > _rank_rtol(torch.float64, matrix.shape) * sigma.max()).sum())
                rows.append(dict(dataset=info["name"], model=model_name, activation=step.activation,
                                 position=position, filters=int(filters), seed=seed, index=index,
                                 unknowns=height * width, rank=rank, full_rank=rank == height * width,
                                 min_filters=needed, rgap_filters=math.ceil(c_in * height * width / (out_h * out_w))))
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def breaking_points(table, threshold=BROKEN_PSNR, by=("dataset", "defence", "project")):
    """Per defence: the weakest strength whose median PSNR falls below `threshold` dB (NaN if none)."""
    import pandas as pd
    missing = [column for column in ("defence", "strength", "psnr") if column not in table.columns]
    if missing:
        raise ValueError(f"breaking_points needs a table with columns defence, strength and psnr; missing {missing}")
    rows = []
    # every group holds one defence: their strengths run in opposite directions
    by = list(dict.fromkeys([column for column in by if column in table.columns] + ["defence"]))
    for key, group in table[table.defence != "none"].groupby(by, sort=False):
        medians = group.groupby("strength").psnr.median()
        # gaussian grows stronger with strength; top-k and quantisation with smaller keep ratios or bits
        ordered = medians.sort_index(ascending=group.defence.iloc[0] == "gaussian")
        broken = ordered[ordered < threshold]
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)),
                         breaks_at=broken.index[0] if len(broken) else math.nan,
                         strongest_tested=ordered.index[-1], psnr_at_strongest=ordered.iloc[-1]))
    return pd.DataFrame(rows)


def filter_summary(table, level=0.95):
    """Per model and conv position: the fewest filters full rank for at least `level` of images and seeds,
    against the counting bound and the weight-constraint (R-GAP style) count."""
    import pandas as pd
    rows = []
    for (model, position), part in table.groupby(["model", "position"], sort=False):
        shares = part.groupby("filters").full_rank.mean()
        enough = shares[shares >= level]
        measured = int(enough.index.min()) if len(enough) else math.nan
        rgap = int(part.rgap_filters.iloc[0])
        rows.append(dict(model=model, position=position, activation=part.activation.iloc[0],
                         pixels_per_channel=int(part.unknowns.iloc[0]), min_filters=int(part.min_filters.iloc[0]),
                         measured_filters=measured, rgap_filters=rgap,
                         share_of_rgap=measured / rgap if rgap and not math.isnan(measured) else math.nan))
    return pd.DataFrame(rows)


def success_rates(table):
    """Per model and dtype: attacks, the share recovered exactly, the share reported rank-deficient,
    and the median PSNR of the attacks that were not exact."""
    import pandas as pd
    rows = []
    for (model, dtype), part in table.groupby(["model", "dtype"], sort=False):
        rest = part[~part.exact]
        rows.append(dict(model=model, dtype=dtype, attacks=len(part), seeds=part.seed.nunique(),
                         images=part["index"].nunique(), exact=part.exact.mean(),
                         rank_deficient=(part.rank_deficient & ~part.exact).mean(),
                         median_psnr=part.psnr.median(),
                         median_psnr_not_exact=rest.psnr.median() if len(rest) else math.nan))
    return pd.DataFrame(rows)


def summarize(table, by=("dataset", "model", "dtype", "first_layer")):
    """Per setting: attacks (rows; images when a setting holds one seed and defence), exact count,
    rank-deficient count, median PSNR and SSIM, median seconds."""
    by = [column for column in by if column in table.columns]
    grouped = table.groupby(by, sort=False)
    summary = grouped.agg(images=("psnr", "size"), exact=("exact", "sum"),
                          median_psnr=("psnr", "median"), median_ssim=("ssim", "median"),
                          median_seconds=("seconds", "median"))
    if "rank_deficient" in table.columns:
        summary.insert(2, "rank_deficient", grouped["rank_deficient"].sum())
    return summary.reset_index()


# -----------------------------------------------------------------------------
# Plotting
# -----------------------------------------------------------------------------

def _pyplot():
    # Imported late: matplotlib picks Agg by itself without a display, and inline in notebooks.
    import matplotlib.pyplot as plt
    return plt


def _show_image(axis, image):
    array = _as_image(image, "image").clamp(0, 1).permute(1, 2, 0).numpy()
    axis.imshow(array[..., 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def plot_reconstruction(original, reconstructed, path=None, title=None):
    """Original beside reconstructed and their absolute difference, with the metrics; saved to path if given."""
    plt = _pyplot()
    metrics = image_metrics(original, reconstructed)
    difference = (_as_image(original, "original") - _as_image(reconstructed, "reconstructed")).abs()
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    _show_image(axes[0], original)
    axes[0].set_title("original\n", fontsize=9)
    _show_image(axes[1], reconstructed)
    axes[1].set_title(f"reconstructed\nPSNR {metrics['psnr']:.1f} dB, SSIM {metrics['ssim']:.4f}", fontsize=9)
    shown = axes[2].imshow(difference.max(0).values.numpy(), cmap="magma", interpolation="nearest")
    axes[2].set_title(f"|difference|\nmax {metrics['max_abs_err']:.1e}", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path, rect=(0, 0, 1, 0.93 if title else 1))


def plot_grid(originals, reconstructions, path=None, columns=10, title=None):
    """Originals (odd rows) above their reconstructions (even rows); saved to path if given."""
    plt = _pyplot()
    originals = [getattr(image, "image", image) for image in originals]
    reconstructions = [getattr(image, "image", image) for image in reconstructions]
    if not originals or len(originals) != len(reconstructions):
        raise ValueError(f"plot_grid needs as many reconstructions as originals, at least one; got "
                         f"{len(originals)} and {len(reconstructions)}")
    count = len(originals)
    columns = min(columns, count)
    blocks = math.ceil(count / columns)
    figure, axes = plt.subplots(2 * blocks, columns, figsize=(columns * 0.9, blocks * 1.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for k, (original, reconstructed) in enumerate(zip(originals, reconstructions)):
        row, column = 2 * (k // columns), k % columns
        for offset, image in ((0, original), (1, reconstructed)):
            axis = axes[row + offset, column]
            axis.axis("on")
            _show_image(axis, image)
        if column == 0:
            axes[row, 0].set_ylabel("orig.", fontsize=7)
            axes[row + 1, 0].set_ylabel("recon.", fontsize=7)
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi=110)


def plot_methods(originals, reconstructions, path=None, title=None, columns=10):
    """One row per method (after the originals), one column per image.

    reconstructions: a dict method name -> list of images (or Reconstructions), aligned with originals.
    """
    plt = _pyplot()
    count = min(columns, len(originals))
    rows = [("original", list(originals[:count]))] + [
        (name, [getattr(r, "image", r) for r in images[:count]]) for name, images in reconstructions.items()]
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.95, len(rows) * 1.05), squeeze=False)
    for row, (name, images) in enumerate(rows):
        for column, image in enumerate(images):
            axis = axes[row, column]
            if image is None or not bool(torch.isfinite(torch.as_tensor(image)).all()):
                axis.axis("off")
                continue
            _show_image(axis, image)
        axes[row, 0].set_ylabel(name.replace("_", "\n"), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def plot_psnr(table, path=None, by="dtype", title=None):
    """PSNR of every image (dots) per group of `by` (e.g. dtype), from a results table or CSV path."""
    plt = _pyplot()
    table = _table(table)
    groups = list(dict.fromkeys(table[by]))
    figure, axis = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.6))
    generator = np.random.default_rng(0)
    for k, group in enumerate(groups):
        values = table.loc[table[by] == group, "psnr"].to_numpy(dtype=float)
        values = np.where(np.isfinite(values), values, np.nan)
        exact = table.loc[table[by] == group, "exact"].to_numpy(dtype=bool) if "exact" in table else None
        jitter = k + generator.uniform(-0.18, 0.18, len(values))
        colours = np.where(exact, "tab:green", "tab:red") if exact is not None else "tab:blue"
        axis.scatter(jitter, values, s=9, c=colours, alpha=0.7, linewidths=0)
        if np.isfinite(values).any():
            axis.hlines(np.nanmedian(values), k - 0.3, k + 0.3, colors="black", linewidth=1.5)
    axis.set_xticks(range(len(groups)), [str(g) for g in groups])
    axis.set_ylabel("PSNR (dB, data range 1)")
    axis.axhline(BROKEN_PSNR, color="grey", linestyle=":", linewidth=1)
    axis.set_title(title or "PSNR per image (green: exact, red: not; bar: median)", fontsize=9)
    return _save(figure, path)


def _table(source):
    import pandas as pd
    return pd.read_csv(source) if isinstance(source, (str, Path)) else source


def _save(figure, path, dpi=120, rect=None):
    figure.tight_layout(rect=rect)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    return figure


def plot_precision(table, path=None):
    """PSNR per gradient dtype for each first-layer method and ReLU test, one panel per dataset."""
    plt = _pyplot()
    table = _table(table)
    datasets = list(dict.fromkeys(table.dataset))
    dtypes = [d for d in DTYPES if d in set(table.dtype)]
    methods = list(dict.fromkeys(zip(table.first_layer, table.relu_test)))
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(methods))
    for axis, dataset in zip(axes[0], datasets):
        part = table[table.dataset == dataset]
        for m, (first_layer, relu_test) in enumerate(methods):
            for d, dtype in enumerate(dtypes):
                values = part[(part.first_layer == first_layer) & (part.relu_test == relu_test) &
                              (part.dtype == dtype)].psnr.to_numpy(dtype=float)
                values = np.clip(values[np.isfinite(values)], -50, None)
                x = d - 0.4 + width * (m + 0.5)
                if len(values):
                    axis.scatter(np.full(len(values), x), values, s=4, color=colours(m), alpha=0.35, linewidths=0)
                    axis.hlines(np.median(values), x - width / 2, x + width / 2, color=colours(m), linewidth=2,
                                label=f"{first_layer}, {relu_test} ReLU test" if d == 0 else None)
        axis.set_xticks(range(len(dtypes)), dtypes)
        axis.axhline(BROKEN_PSNR, color="grey", linestyle=":", linewidth=1)
        axis.set_title(dataset)
    axes[0, 0].set_ylabel("PSNR (dB, data range 1; floored at -50)")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    figure.suptitle("R-CONV by the precision of the client's gradients (bars: medians)", fontsize=10)
    return _save(figure, path)


def plot_defences(table, path=None, threshold=BROKEN_PSNR):
    """Median PSNR and SSIM against defence strength, plain and projected solves, per dataset."""
    plt = _pyplot()
    table = _table(table)
    defences = [d for d in DEFENCES if d != "none" and d in set(table.defence)]
    figure, axes = plt.subplots(2, len(defences), figsize=(4.4 * len(defences), 6.4), squeeze=False)
    styles = {False: "-", True: "--"}
    colours = plt.get_cmap("tab10")
    datasets = list(dict.fromkeys(table.dataset))
    labels = {"gaussian": "noise norm / gradient norm", "topk": "fraction of entries kept", "quantize": "bits"}
    for column, defence in enumerate(defences):
        part = table[table.defence == defence]
        for k, dataset in enumerate(datasets):
            for project in sorted(set(part.project)):
                rows = part[(part.dataset == dataset) & (part.project == project)]
                medians = rows.groupby("strength")[["psnr", "ssim"]].median().sort_index()
                for row, metric in enumerate(("psnr", "ssim")):
                    axes[row, column].plot(medians.index, medians[metric], styles[bool(project)], marker=".",
                                           color=colours(k),
                                           label=f"{dataset}{', projected' if project else ''}")
        for row in range(2):
            axis = axes[row, column]
            if defence != "quantize":
                axis.set_xscale("log")
            if defence != "gaussian":
                axis.invert_xaxis()  # stronger defence to the right
            axis.set_xlabel(labels[defence])
        axes[0, column].axhline(threshold, color="grey", linestyle=":", linewidth=1)
        axes[0, column].set_title(defence)
    axes[0, 0].set_ylabel("median PSNR (dB)")
    axes[1, 0].set_ylabel("median SSIM")
    axes[0, -1].legend(fontsize=7)
    figure.suptitle(f"R-CONV under defences (right: stronger; dotted: {threshold:g} dB)", fontsize=10)
    return _save(figure, path)


def plot_filters(table, path=None):
    """Fraction of images and seeds whose gradient constraints are full rank, against filter count."""
    plt = _pyplot()
    table = _table(table)
    positions = sorted(set(table.position))
    figure, axes = plt.subplots(1, len(positions), figsize=(3.6 * len(positions), 3.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    for axis, position in zip(axes[0], positions):
        part = table[table.position == position]
        for k, (model, rows) in enumerate(part.groupby("model", sort=False)):
            fraction = rows.groupby("filters").full_rank.mean()
            axis.plot(fraction.index, fraction.values, marker="o", color=colours(k),
                      label=f"{model} ({rows.activation.iloc[0]})")
            axis.axvline(rows.rgap_filters.iloc[0], color=colours(k), linestyle=":", linewidth=1.5,
                         label="weight-constraint count" if k == 0 else None)
        axis.axvline(part.min_filters.iloc[0], color="black", linestyle="--", linewidth=1, label="counting bound")
        axis.set_title(f"conv layer {position}")
        axis.set_xlabel("filters")
        axis.set_ylim(-0.05, 1.05)
    axes[0, 0].set_ylabel("fraction full rank")
    axes[0, -1].legend(fontsize=7)
    figure.suptitle("How many filters the gradient constraints need", fontsize=10)
    return _save(figure, path)


def plot_success(table, path=None):
    """Per preset and dtype: the share recovered exactly, reported rank-deficient, and otherwise not exact."""
    plt = _pyplot()
    table = _table(table)
    groups = list(table.groupby(["model", "dtype"], sort=False))
    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(groups) + 1.2))
    for k, ((model, dtype), rows) in enumerate(groups):
        exact = rows.exact.mean()
        deficient = (rows.rank_deficient & ~rows.exact).mean()
        other = 1 - exact - deficient
        left = 0.0
        for share, colour, label in ((exact, "tab:green", "exact"), (deficient, "tab:orange", "rank-deficient"),
                                     (other, "tab:red", "full rank, not exact")):
            axis.barh(k, share, left=left, color=colour, label=label if k == 0 else None)
            left += share
        rest = rows[~rows.exact].psnr
        note = f"{exact:.0%} exact" + (f"; rest median {rest.median():.0f} dB" if len(rest) else "")
        axis.text(1.01, k, note, va="center", fontsize=7)
    axis.set_yticks(range(len(groups)), [f"{m} {d}" for (m, d), _ in groups], fontsize=8)
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("share of images x seeds")
    axis.legend(fontsize=7, loc="lower left")
    axis.set_title("How often each architecture leaks its training image", fontsize=10)
    return _save(figure, path)


# -----------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------

def main(argv=None):
    """python -m rconv_core -d CIFAR100 -i 92 -a ReLU: recover one image and save reconstruction.png."""
    parser = argparse.ArgumentParser(prog="python -m rconv_core", description=main.__doc__.split(":")[1].strip())
    parser.add_argument("-d", "--dataset", default="CIFAR100", help="MNIST, CIFAR10, CIFAR100 or samples")
    parser.add_argument("-i", "--index", type=int, default=25, help="index of the training image")
    parser.add_argument("-a", "--activation", default=None,
                        help="activation of the last two conv layers (ReLU, LeakyReLU, Sigmoid, Tanh); "
                             "default: the model's own")
    parser.add_argument("--model", default="lenet_c10", help=f"preset: {', '.join(MODELS)}")
    parser.add_argument("--dtype", default="float32", help="precision of the client's gradients")
    parser.add_argument("--first-layer", default="hybrid", choices=FIRST_LAYER_METHODS)
    parser.add_argument("--seed", type=int, default=50, help="seed of the model's initialisation")
    parser.add_argument("--data-root", default=None, help="folder with datasets or sample packs "
                                                           "(default: $RCONV_DATA, then data/)")
    parser.add_argument("--out", default="reconstruction.png", help="where to save the figure")
    args = parser.parse_args(argv)
    try:
        info = dataset_info(args.dataset)
        overrides = {}
        if args.activation is not None:
            activations = list(MODELS[_preset(args.model)]["activations"])
            activations[-2:] = [activation_name(args.activation)] * 2
            overrides["activations"] = tuple(activations)
        model = build_model(args.model, info["channels"], info["num_classes"], seed=args.seed, **overrides)
        images, labels = load_images(args.dataset, [args.index], root=args.data_root)
        grads = client_gradients(model, images[0], labels[0], dtype=as_dtype(args.dtype))
        result = reconstruct(model, grads, images.shape[1:], first_layer=args.first_layer)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    metrics = image_metrics(images[0], result.image)
    import pandas as pd
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.report().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\n{info['name']} image {args.index} (label {int(labels[0])}), model {args.model} "
          f"({'-'.join(model.config['activations'])}), {args.dtype} gradients, first layer {args.first_layer}")
    print(f"MSE {metrics['mse']:.3e}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.6f}  "
          f"max |error| {metrics['max_abs_err']:.3e}  exact: {result.exact}  time {result.seconds:.2f} s")
    for note in result.notes:
        print(f"note: {note}")
    plot_reconstruction(images[0], result.image, path=args.out,
                        title=f"R-CONV on {info['name']} #{args.index} ({args.model}, {args.dtype})")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
