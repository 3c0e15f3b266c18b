"""What the precision of the gradients allows: the attack's tolerances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..linalg.solvers import eps

# The ReLU test's floor in units of eps: measured on float32 LeNets, dead units sit within
# 1e-6 of the layer's scale while true activations go down to 1e-5 of it; 10 eps lies between.
_RELU_FLOOR_EPS = 10
# How close to 0 or 1 (Sigmoid), -1 or 1 (Tanh) an output may come and still reveal its
# pre-activation, in units of eps, and never below this absolute floor.
_SATURATION_EPS, _SATURATION_FLOOR = 10, 1e-12
# The largest max abs error (pixels in [0, 1]) of an image called exact: what float64 gradients
# allow with room to spare, and what float32 (or any coarser precision) can still reach.
EXACT_IMAGE_ERROR = {torch.float64: 1e-6}
_COARSE_IMAGE_ERROR = 1e-3


def default_relu_tol(dtype):
    """The ReLU test's floor, relative to the layer's largest output, for gradients in `dtype`.

    A unit counts as active when its recovered output exceeds both this floor times the
    layer's largest output and three times the noise seen on that layer: the magnitude of
    its most negative recovered output, which only rounding can produce behind ReLU.
    """
    return min(1e-2, max(1e-13, _RELU_FLOOR_EPS * eps(dtype)))


@dataclass(frozen=True)
class Tolerances:
    """The attack's tolerances for gradients of one precision."""

    dtype: torch.dtype  # precision of the gradients
    residual: float  # largest relative residual (and bias misfit) of an exact layer: sqrt(eps)
    relu: float  # the ReLU test's floor, relative to the layer's largest output
    saturation: float  # Sigmoid and Tanh outputs this close to their limits hide their pre-activation
    image_error: float  # the largest bound on an image's max abs error that still counts as exact

    @classmethod
    def for_dtype(cls, dtype, relu_tol=None):
        """The tolerances for gradients in `dtype`; relu_tol None picks default_relu_tol."""
        return cls(dtype=dtype, residual=math.sqrt(eps(dtype)),
                   relu=default_relu_tol(dtype) if relu_tol is None else float(relu_tol),
                   saturation=max(_SATURATION_FLOOR, _SATURATION_EPS * eps(dtype)),
                   image_error=EXACT_IMAGE_ERROR.get(dtype, _COARSE_IMAGE_ERROR))
