"""A last Linear layer without a bias: its output gradient read off its weight gradient alone.

With a bias, dL/db is the Linear layer's output gradient g and x = dL/dW / dL/db. Without one,
dL/dW = g x^T is still rank one, so its top singular pair gives x = t u and g = sigma v / t up to
one scale t > 0. When the layer's output is the logits of a cross-entropy loss, g = softmax(W x) -
onehot(label) = softmax(t W u) - onehot(label): only the label's entry is negative (which names
the label and fixes the pair's sign), and the label's entry alone, t (1 - p_label(t)) = sigma |v_label|,
is a one-dimensional root for t. The rest of the attack then runs as if g were the bias gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp

from ..common.errors import RConvError

# t lies between sigma |v_label| (as 1 - p_label <= 1) and that over 1 - p_label; this many decades above
# the lower end covers any softmax float64 can tell from one.
_DECADES = 16.0
# Points per decade of the grid on which the root's sign changes are looked for.
_GRID_PER_DECADE = 64
# brentq's relative precision: a few float64 ulps.
_ROOT_RTOL = 4.0 * np.finfo(np.float64).eps
# Another root fits as well as the best when its misfit is within this factor of the best's, or below this
# floor (float64 rounding): the gradient cannot tell the two images apart (two classes always allow it).
_RIVAL_RATIO, _RIVAL_FLOOR = 10.0, 1e-12
# Roots this close, relatively, are the same root found from neighbouring grid cells.
_SAME_SCALE = 1e-9


class LogitGradient(NamedTuple):
    """The Linear layer's output gradient g, read off its weight gradient; features = dL/dW^T g / |g|^2."""

    grad: torch.Tensor  # (classes,) float64: dL/dlogits
    label: int
    scale: float  # t = |x|
    misfit: float  # |t (softmax(t W u) - onehot) - sigma v| / sigma: how well one image's cross-entropy explains it


def logit_gradient(weight, weight_grad, label_name):
    """The LogitGradient of a bias-free last Linear layer from its weights and weight gradient (one image's
    cross-entropy gradients); label_name names the layer in errors."""
    grad = weight_grad.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(grad).all() or not np.abs(grad).max() > 0.0:
        raise RConvError(f"the Linear layer {label_name} has no bias and a zero weight gradient (the loss is "
                         f"saturated), so its input cannot be recovered")
    left, singular, right = np.linalg.svd(grad, full_matrices=False)
    sigma, v, u = float(singular[0]), left[:, 0], right[0]
    logits_per_scale = weight.detach().to(torch.float64).cpu().numpy() @ u
    # (v, u) and (-v, -u) are the same pair: each sign names its own label
    found = sorted(_roots(v, logits_per_scale, sigma) + _roots(-v, -logits_per_scale, sigma), key=lambda c: c.misfit)
    if not found:
        raise RConvError(f"the Linear layer {label_name} has no bias, and no scale of its weight gradient's top "
                         f"singular vector gives a cross-entropy output gradient softmax(W x) - onehot(label); "
                         f"R-CONV reads a bias-free Linear layer only as the last one, for one image's gradients")
    best = found[0]
    rivals = [c for c in found[1:] if c.misfit <= max(_RIVAL_RATIO * best.misfit, _RIVAL_FLOOR)
              and (c.label != best.label or abs(c.scale - best.scale) > _SAME_SCALE * best.scale)]
    if rivals:
        raise RConvError(f"the Linear layer {label_name} has no bias, and its weight gradient fits two images' "
                         f"cross-entropy gradients equally well (label {best.label} with |x| = {best.scale:.6g}, "
                         f"label {rivals[0].label} with |x| = {rivals[0].scale:.6g}); with {len(v)} classes its "
                         f"input cannot be told apart")
    return best._replace(grad=torch.as_tensor(best.grad, dtype=torch.float64, device=weight_grad.device))


def _roots(v, logits_per_scale, sigma):
    """Every LogitGradient with x = t u, g = sigma v / t (v's sign chosen by the caller) that roots the label's
    entry, each with the misfit of all entries."""
    label = int(np.argmin(v))
    if not v[label] < 0.0:
        return []
    others = np.arange(len(v)) != label
    target = sigma * abs(float(v[label]))

    def excess(t):
        # t (1 - p_label(t)) - sigma |v_label|, with 1 - p_label as the other classes' softmax mass
        z = t * logits_per_scale
        return t * math.exp(logsumexp(z[others]) - logsumexp(z)) - target

    grid = target * np.logspace(0.0, _DECADES, int(_DECADES * _GRID_PER_DECADE) + 1)
    values = np.array([excess(t) for t in grid])
    changes = np.nonzero(np.sign(values[:-1]) * np.sign(values[1:]) <= 0)[0]
    roots = []
    for k in changes:
        t = brentq(excess, grid[k], grid[k + 1], xtol=np.finfo(np.float64).tiny, rtol=_ROOT_RTOL)
        z = t * logits_per_scale
        fitted = np.exp(z - logsumexp(z)) - np.eye(len(v))[label]
        roots.append(LogitGradient(sigma * v / t, label, float(t), float(np.linalg.norm(t * fitted - sigma * v)) / sigma))
    return roots
