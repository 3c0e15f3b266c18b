"""What a federated client sends instead of gradients: its weights after local training.

A Flower client's fit() returns its new weights (NumPy arrays in state_dict order, buffers included);
FedSGD clients take one SGD step, FedAvg clients several. gradients_from_update() reads the
gradients back off the weights before and after, in model.parameters() order as reconstruct takes
them, and says what they are worth: the weights' rounding leaves errors of about ulp(w) / lr in
every entry (float32 weights at a small learning rate lose most of a gradient's digits), and
several local steps average gradients taken at different weights, which no image gives exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch

from ..common.checks import whole_number
from ..common.errors import RConvError


class Update(list):
    """Gradients read off a weight update: a list of tensors in model.parameters() order (what
    reconstruct takes), carrying where they came from.

    Attributes:
        local_steps: the SGD steps the client took; above 1 the gradients are an average over weights
            that moved between the steps, so that no image (or batch) gives them exactly.
        lr: the learning rate they were divided by.
        rounding: per tensor, the RMS size of the error the weights' rounding may leave in its entries
            (the split of a batch's Linear layer counts no rank below what it could make).
        notes: what limits these gradients, in words.
    A plain list(update) keeps the tensors and drops the rest.
    """

    def __init__(self, grads, *, local_steps, lr, rounding, notes):
        super().__init__(grads)
        self.local_steps, self.lr, self.rounding, self.notes = local_steps, lr, tuple(rounding), list(notes)


class _Step(NamedTuple):
    """The local training's settings, checked."""

    lr: float
    local_steps: int
    momentum: float
    weight_decay: float


class _Named(NamedTuple):
    """One parameter of the update: its name, the weights before and after (float64), and their dtype."""

    name: str
    before: np.ndarray
    after: np.ndarray
    dtype: np.dtype


def _real(value, name, *, least, below=math.inf, strict=False):
    """A finite real number (bools refused) within [least, below), > least when strict."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < least or (strict and value == least) or value >= below:
        bounds = f"> {least:g}" if strict else f">= {least:g}"
        bounds += f" and < {below:g}" if math.isfinite(below) else ""
        raise RConvError(f"gradients_from_update: {name} must be a finite number {bounds}; got {value!r}")
    return float(value)


def _check_step(lr, local_steps, momentum, weight_decay):
    step = _Step(_real(lr, "lr", least=0.0, strict=True),
                 whole_number(local_steps, "gradients_from_update: local_steps"),
                 _real(momentum, "momentum", least=0.0, below=1.0), _real(weight_decay, "weight_decay", least=0.0))
    if step.lr * step.weight_decay >= 1:
        raise RConvError(f"gradients_from_update: lr * weight_decay = {step.lr * step.weight_decay:g} >= 1: SGD with "
                         f"these settings flips or zeroes the weights at every step; no client trains so")
    return step


def _as_array(value, what):
    """A floating NumPy array of a tensor or array (integer buffers come back as they are)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise RConvError(f"gradients_from_update: {what} is not an array of numbers ({type(value).__name__})") \
            from error
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise RConvError(f"gradients_from_update: {what} is not an array of numbers (dtype {array.dtype})")
    return array


def _by_name(model, weights, side):
    """{parameter name: array} of the weights as sent: a state dict (or any mapping by name), or a list in
    state_dict order (buffers included) or in parameters() order."""
    names = [name for name, _ in model.named_parameters()]
    entries = list(model.state_dict())
    if isinstance(weights, Mapping):
        unknown = [key for key in weights if key not in entries]
        missing = [name for name in names if name not in weights]
        if unknown or missing:
            raise RConvError(f"gradients_from_update: {side} does not match the model's state_dict: missing "
                             f"{missing}, unexpected {unknown}")
        return {name: weights[name] for name in names}
    if isinstance(weights, (str, bytes, torch.Tensor, np.ndarray)) or not hasattr(weights, "__len__"):
        raise RConvError(f"gradients_from_update: {side} must be a list of arrays (state_dict or parameters() "
                         f"order) or a state dict; got {type(weights).__name__}")
    weights = list(weights)
    if len(weights) == len(entries):
        return {key: value for key, value in zip(entries, weights) if key in names}
    if len(weights) == len(names):
        return dict(zip(names, weights))
    raise RConvError(f"gradients_from_update: {side} holds {len(weights)} arrays; the model's state_dict has "
                     f"{len(entries)} entries and its parameters() {len(names)}: is it the same model?")


def _pairs(model, before, after):
    """Every parameter's weights before and after, checked against the model's shapes."""
    if not isinstance(model, torch.nn.Module):
        raise RConvError(f"gradients_from_update: model must be a torch.nn.Module; got {type(model).__name__}")
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    if not shapes:
        raise RConvError("gradients_from_update: the model has no parameters")
    first, second = _by_name(model, before, "before"), _by_name(model, after, "after")
    pairs = []
    for name, shape in shapes.items():
        old, new = _as_array(first[name], f"before[{name!r}]"), _as_array(second[name], f"after[{name!r}]")
        for side, array in (("before", old), ("after", new)):
            if array.shape != shape:
                raise RConvError(f"gradients_from_update: {side}[{name!r}] has shape {array.shape}; the model's "
                                 f"parameter has shape {shape} (arrays out of order, or another model?)")
            if not np.issubdtype(array.dtype, np.floating):
                raise RConvError(f"gradients_from_update: {side}[{name!r}] holds {array.dtype}, not floating-point "
                                 f"weights (arrays out of order?)")
            if not np.isfinite(array).all():
                raise RConvError(f"gradients_from_update: {side}[{name!r}] holds NaN or infinite values")
        pairs.append(_Named(name, old.astype(np.float64), new.astype(np.float64), new.dtype))
    kinds = {pair.dtype for pair in pairs}
    if len(kinds) > 1:
        raise RConvError(f"gradients_from_update: the weights mix dtypes ({', '.join(sorted(map(str, kinds)))})")
    if all(np.array_equal(pair.before, pair.after) for pair in pairs):
        raise RConvError("gradients_from_update: before and after are identical: the client's weights did not "
                         "move (a zero gradient, or a learning rate too small for the weights' precision)")
    return pairs


def _read(pair, step):
    """One parameter's gradient and the RMS error the rounding of the weights leaves in it.

    Plain SGD with weight decay wd takes w <- c w - lr g with c = 1 - lr wd, so after K steps
    c^K before - after = lr sum_k c^(K-1-k) g_k: the weighted mean of the steps' gradients divides by
    lr sum_k c^(K-1-k) (for K = 1: (before - after) / lr - wd before). Momentum mu adds step k's
    gradient (1 - mu^(K-k)) / (1 - mu) times in all; its weight decay is taken at the first weights
    (exact for one step, whose momentum buffer is its own gradient).
    """
    steps, mu, wd = step.local_steps, step.momentum, step.weight_decay
    if mu == 0:
        c = 1.0 - step.lr * wd
        total = sum(c ** (steps - 1 - k) for k in range(steps))
        grad = (c ** steps * pair.before - pair.after) / (step.lr * total)
    else:
        total = sum((1 - mu ** (steps - k)) / (1 - mu) for k in range(steps))
        grad = (pair.before - pair.after) / (step.lr * total) - wd * pair.before
    # each step rounds the weights to their dtype, by at most half their spacing
    error = steps * np.spacing(pair.after.astype(pair.dtype)).astype(np.float64) / (2 * step.lr * total)
    return grad, float(np.sqrt(np.mean(error ** 2)))


def _notes(step, dtype, relative, approximate):
    notes = [f"gradients read off a weight update at lr {step.lr:g}: the {dtype} weights' rounding leaves errors "
             f"of up to {relative:.1e} of a gradient's RMS size in a tensor (a smaller learning rate, larger ones)"]
    if step.local_steps > 1:
        notes.append(f"an average over {step.local_steps} local steps, each taken at weights the steps before had "
                     f"moved: no image or batch gives these gradients exactly, so an attack on them is an "
                     f"approximation and never exact")
    if approximate:
        notes.append("momentum with weight decay over several steps: the weight decay was removed at the first "
                     "weights (to first order)")
    return notes


def gradients_from_update(model, before, after, *, lr, local_steps=1, momentum=0.0, weight_decay=0.0) -> Update:
    """The gradients a client's local SGD training applied, read off its weights before and after.

    Args:
        model: the network the server sent (its parameters and state_dict name and shape the arrays).
        before, after: the weights the server sent and the client returned, as Flower sends them: a
            list of NumPy arrays in state_dict order (buffers included) or in parameters() order, or a
            state dict (tensors or arrays by name).
        lr: the client's learning rate (> 0). The smaller it is, the fewer of a gradient's digits
            survive the difference of two float32 weights.
        local_steps: SGD steps the client took (FedSGD: 1; FedAvg: several, on one or more mini-batches).
            Above 1 the result is the (weighted) mean of the steps' gradients, each at other weights:
            no image gives it exactly, and Update.notes says so.
        momentum, weight_decay: torch.optim.SGD's (no dampening, no Nesterov). For one step
            g = (before - after) / lr - weight_decay * before, whatever the momentum.
    Returns an Update: a list of tensors in model.parameters() order, in the weights' dtype, with the
    steps, the learning rate, the weights' rounding per tensor and notes.
    """
    step = _check_step(lr, local_steps, momentum, weight_decay)
    pairs = _pairs(model, before, after)
    grads, rounding, relative = [], [], 0.0
    for pair in pairs:
        grad, error = _read(pair, step)
        size = float(np.sqrt(np.mean(grad ** 2)))
        relative = max(relative, error / size if size > 0 else 0.0)
        grads.append(torch.from_numpy(grad.astype(pair.dtype)))  # the precision the client trained in
        rounding.append(error)
    approximate = step.local_steps > 1 and step.momentum > 0 and step.weight_decay > 0
    return Update(grads, local_steps=step.local_steps, lr=step.lr, rounding=rounding,
                  notes=_notes(step, pairs[0].dtype, relative, approximate))
