"""What a federated client shares: its gradients, in a chosen precision, under a chosen defence."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from .errors import RConvError

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DEFENCES = ("none", "gaussian", "topk", "quantize")


def as_dtype(dtype):
    """A torch floating dtype from a name in DTYPES ("float32", ...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPES:
        raise RConvError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype):
    """The name of a dtype in DTYPES ("float32" for torch.float32)."""
    return str(as_dtype(dtype)).replace("torch.", "")


def client_gradients(model, image, label, dtype=torch.float32):
    """The gradients a federated-learning client shares for one image: cross-entropy, computed in `dtype`.

    Returns a list of tensors in the order of model.parameters().
    """
    image = torch.as_tensor(image)
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise RConvError(f"client_gradients takes one image of shape (C, H, W) or (1, C, H, W); "
                         f"got shape {tuple(image.shape)}")
    label = torch.as_tensor(label, dtype=torch.int64).reshape(-1)
    if label.numel() != 1:
        raise RConvError(f"client_gradients takes one label; got {label.numel()}")
    dtype = as_dtype(dtype)
    client = copy.deepcopy(model).to(dtype)
    client.zero_grad(set_to_none=True)
    loss = F.cross_entropy(client(image.to(dtype)), label.to(image.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(client.parameters()))]


def _check_strength(defence, strength):
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
