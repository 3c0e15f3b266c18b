"""What a federated client shares: its gradients, in a chosen precision, under a chosen defence."""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F

from ..common.checks import as_whole
from ..common.errors import RConvError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DEFENCES = ("none", "gaussian", "topk", "quantize")


def as_dtype(dtype):
    """A torch floating dtype from a name in DTYPES ("float32", ...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise RConvError(f"gradients need a real floating dtype ({', '.join(DTYPES)}); got {dtype}")
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise RConvError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype):
    """The name of a dtype in DTYPES ("float32" for torch.float32)."""
    return str(as_dtype(dtype)).replace("torch.", "")


def _as_label(label):
    """One class label as an int64 tensor of shape (1,); floats, bools and strings are refused."""
    whole = as_whole(label)
    if whole is not None:
        return torch.tensor([whole], device=label.device if isinstance(label, torch.Tensor) else None)
    if isinstance(label, torch.Tensor) and label.numel() != 1:
        raise RConvError(f"client_gradients takes one label; got {label.numel()}")
    raise RConvError(f"label must be a whole number (a class index); got {label!r} ({type(label).__name__})")


def _as_labels(labels, count):
    """One class label per image of a batch of `count`, as an int64 tensor of shape (count,)."""
    if isinstance(labels, numbers.Integral) or (isinstance(labels, torch.Tensor) and labels.dim() == 0):
        raise RConvError(f"got a single label for a batch of {count} images; pass one image with one label, "
                         f"or labels of shape ({count},), one per image")
    if isinstance(labels, torch.Tensor):
        values = labels.reshape(-1).tolist() if labels.dim() == 1 and not labels.is_floating_point() \
            and not labels.is_complex() and labels.dtype != torch.bool else None
        if values is None:
            raise RConvError(f"labels must be whole numbers (class indices) of shape ({count},); got a tensor of "
                             f"{labels.dtype} with shape {tuple(labels.shape)}")
    else:
        try:
            values = list(labels)
        except TypeError:
            raise RConvError(f"labels must be a sequence of {count} whole numbers (class indices); "
                             f"got {labels!r} ({type(labels).__name__})") from None
    if len(values) != count:
        raise RConvError(f"a batch of {count} images needs {count} labels, one per image; got {len(values)}")
    return torch.cat([_as_label(value) for value in values])


def _first_conv(model):
    return next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)


def _check_images(model, images):
    """Real floating images (N, C, H, W), or one (C, H, W), that fit the model's first conv layer and input size."""
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[0] == 0:
        raise RConvError(f"client_gradients takes one image of shape (C, H, W) or a batch (N, C, H, W); "
                         f"got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise RConvError(f"the image must be a real floating-point tensor (float32 in [0, 1], as load_images "
                         f"gives); got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise RConvError("the image holds NaN or infinite values")
    conv = _first_conv(model)
    if conv is not None and images.shape[1] != conv.in_channels:
        raise RConvError(f"the model's first conv layer takes {conv.in_channels} channels; the image has "
                         f"{images.shape[1]} (shape {tuple(images.shape[1:])})")
    config = getattr(model, "config", None)  # ConvNet records the input side it was built for
    side = config.get("input_size") if isinstance(config, dict) else None
    if side is not None and tuple(images.shape[2:]) != (side, side):
        raise RConvError(f"the model was built for {side}x{side} images; the image is "
                         f"{images.shape[2]}x{images.shape[3]}")
    return images


def _check_label_range(labels, classes):
    """Every label a class of the model; a batch's message names the image."""
    for position, label in enumerate(labels.tolist()):
        if not 0 <= label < classes:
            which = f" (image {position})" if len(labels) > 1 else ""
            raise RConvError(f"label {label}{which} is out of range for a model with {classes} classes "
                             f"(0..{classes - 1})")


def client_gradients(model, image, label, *, dtype=torch.float32):
    """The gradients a federated-learning client shares: cross-entropy, computed in `dtype`.

    Args:
        image: one image (C, H, W) or (1, C, H, W) with one `label`, or a batch (N, C, H, W) with
            labels of shape (N,), one per image: then the gradients of the batch's mean loss
            (cross_entropy's reduction="mean"), what a client shares after one step on a mini-batch.
    Returns a list of tensors in the order of model.parameters().
    """
    images = _check_images(model, image)
    labels = _as_label(label) if len(images) == 1 else _as_labels(label, len(images))
    dtype = as_dtype(dtype)
    client = copy.deepcopy(model).to(dtype)
    client.zero_grad(set_to_none=True)
    try:
        logits = client(images.to(dtype))
    except RuntimeError as error:  # a size no layer of a general model accepts
        raise RConvError(f"the model cannot take an image of shape {tuple(images.shape[1:])}: "
                         f"{str(error).splitlines()[0]}") from error
    except (ValueError, TypeError, AttributeError) as error:  # e.g. a train-mode BatchNorm1d given one image
        raise RConvError(f"the model's forward pass failed on {len(images)} image(s) of shape "
                         f"{tuple(images.shape[1:])}: {str(error).splitlines()[0]}" +
                         (" (a train-mode BatchNorm needs several values per channel: call model.eval(), or "
                          "give a batch)" if "per channel" in str(error) else "")) from error
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != len(images):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise RConvError(f"the model returns {shape} for {len(images)} image(s); a classifier's cross-entropy "
                         f"needs logits of shape ({len(images)}, classes)")
    _check_label_range(labels, logits.shape[-1])
    loss = F.cross_entropy(logits, labels.to(logits.device))
    parameters = list(client.parameters())
    # A parameter the forward pass never reaches gets a zero gradient, as an optimiser would see it.
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(parameters, grads)]


def _check_strength(defence, strength):
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
        raise RConvError(f"the strength of {defence} must be a finite number; got {strength!r} "
                         f"({type(strength).__name__})")
    if defence == "gaussian" and strength < 0:
        raise RConvError(f"gaussian noise needs strength >= 0; got {strength}")
    if defence == "topk" and not 0 < strength <= 1:
        raise RConvError(f"topk keeps a fraction 0 < strength <= 1 of the entries; got {strength}")
    if defence == "quantize" and (strength < 2 or int(strength) != strength):
        raise RConvError(f"quantize needs a whole number of bits >= 2 (a sign and at least one magnitude "
                         f"level); got {strength}")


def _gaussian(flat, strength, generator):
    sigma = strength * float(torch.linalg.norm(flat.double())) / math.sqrt(flat.numel())
    noise = torch.randn(flat.shape, generator=generator, dtype=torch.float64) * sigma
    return (flat.double() + noise.to(flat.device)).to(flat.dtype)


def _topk(flat, strength):
    keep = max(1, round(strength * flat.numel()))
    out = torch.zeros_like(flat)
    largest = torch.topk(flat.abs(), keep).indices
    out[largest] = flat[largest]
    return out


def _quantize(flat, bits):
    levels = 2 ** (int(bits) - 1) - 1
    top = float(flat.abs().max())
    return flat if top == 0 else (torch.round(flat.double() / top * levels) * top / levels).to(flat.dtype)


def defend(grads, defence, strength, *, seed=0):
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
        raise RConvError(f"unknown defence {defence!r}; choose one of {', '.join(DEFENCES)}")
    if isinstance(grads, dict):
        return dict(zip(grads, defend(list(grads.values()), defence, strength, seed=seed)))
    if defence == "none":
        return list(grads)
    _check_strength(defence, strength)
    generator = torch.Generator().manual_seed(seed)
    defended = []
    for grad in grads:
        flat = grad.detach().reshape(-1)
        if defence == "gaussian":
            out = _gaussian(flat, strength, generator)
        elif defence == "topk":
            out = _topk(flat, strength)
        else:
            out = _quantize(flat, strength)
        defended.append(out.reshape(grad.shape))
    return defended
