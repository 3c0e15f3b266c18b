"""A layer solved from its gradient constraints, refined by its weight constraints where the gradients are weakest.

A hidden layer's gradient constraints A x[c] = dL/dW[:, c] often determine its input with a few weak
directions per channel (A's smallest singular values, 1e-3 of its largest on LeNets), and the noise of
float32 gradients reaches the input mostly along them. Where the layer's outputs are known (the layer
above was solved), its weight constraints M x = O - b see those directions too. The refinement is the
least-squares fit of both kinds within the span of A's WEAK_DIRECTIONS weakest directions in every
channel, each kind weighted by the noise it is assumed to carry; the directions where the gradients
are strong are theirs alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..linalg.solvers import TINY

# A's weakest directions per channel that the weight constraints refine: more let in more of the outputs' noise
# (CIFAR100 LeNet, 30 float32 images, median error: 9.7e-5 alone, 3.6e-5 with 8, 4.4e-5 with 16, 5.4e-5 with 32;
# CIFAR10 LeNet: 2.0e-5 with 4, 2.5e-5 with 8, 2.6e-5 with 12).
WEAK_DIRECTIONS = 8
# The noise the solve assumes per known output, as a multiple of a gradient entry's (relative to the RMS of each):
# besides the client's rounding, an output carries what the layer above's solve left in it (O_CNN6, 30 float32
# images: errors 3.5e-5 at 10 times, 1.1e-4 at once, 5.7e-5 for the gradients alone). An output read back through
# its activation carries more where the derivative is small (output_scale; Tanh near saturation: far more).
OUTPUT_NOISE_RATIO = 10.0


class Refinement(NamedTuple):
    """What a refinement keeps to refine other right-hand sides: the error bound's tangents."""

    basis: torch.Tensor  # (H*W, k): A's weakest right singular directions, shared by every channel
    weak_images: torch.Tensor  # (rows of A, k): A times them
    output_images: torch.Tensor  # (known rows, C*k): M times each channel's copy of them
    normal: torch.Tensor  # (C*k, C*k): the normal matrix within their span, each row over its noise, Cholesky
    output_noise: torch.Tensor  # (known rows,): each known output's assumed noise, in units of a gradient entry's

    def correct(self, equations, x, gradient_rhs, weight_rhs):
        """x (C, H*W, r) refined: the weighted least-squares fit of both kinds within the weak span, for the
        right-hand sides gradient_rhs (F*k*k, C, r) and weight_rhs (known rows, r)."""
        channels, pixels, columns = x.shape
        matrix, known = equations.gradients.matrix, equations.known
        directions = self.basis.shape[1]
        output_misfit = weight_rhs - equations.weights.apply(x.reshape(channels * pixels, columns))[known]
        grad_misfit = gradient_rhs - torch.einsum("ap,cpr->acr", matrix, x)
        rhs = self.output_images.T @ (output_misfit / self.output_noise[:, None] ** 2) + \
            torch.einsum("ak,acr->ckr", self.weak_images, grad_misfit).reshape(channels * directions, columns)
        steps = torch.cholesky_solve(rhs, self.normal).view(channels, directions, columns)
        return x + torch.einsum("pk,ckr->cpr", self.basis, steps)


def refinement(equations, eigen, activated, derivative):
    """The Refinement of a layer whose gradient constraints were solved through eigen (solvers.Eigen of A^T A), or
    None where no output is known or the weighted system within the span is singular. activated, derivative: the
    activation's output and derivative at each of the layer's outputs (F, P, Q), as read."""
    eigenvalues, vectors = eigen.values, eigen.vectors
    known = equations.known
    if not bool(known.any()):
        return None
    directions = min(WEAK_DIRECTIONS, vectors.shape[1])
    basis, weak = vectors[:, :directions], eigenvalues[:directions].clamp_min(0)
    weights, channels = equations.weights, equations.channels
    height, width = weights.input_shape[1:]
    # M on a single channel's copy of each direction: the kernels of that channel alone, all channels at once
    kernels = weights.weight.transpose(0, 1).reshape(-1, 1, *weights.weight.shape[2:])  # (C*F, 1, kh, kw)
    images = F.conv2d(basis.T.reshape(directions, 1, height, width), kernels, stride=weights.stride,
                      padding=weights.padding)  # (k, C*F, P, Q)
    output_images = images.reshape(directions, channels, -1).permute(2, 1, 0).reshape(-1, channels * directions)
    output_images = output_images[known]
    gradient_rhs = equations.gradients.rhs
    grad_rms = float(torch.linalg.norm(gradient_rhs)) / math.sqrt(gradient_rhs.numel())
    scale = output_scale(equations, activated, derivative)
    if not (grad_rms > TINY and scale is not None):
        return None
    output_noise = OUTPUT_NOISE_RATIO * scale / grad_rms
    scaled = output_images / output_noise[:, None]
    normal = scaled.T @ scaled + torch.diag(weak.repeat(channels))
    factor, info = torch.linalg.cholesky_ex(normal)
    if int(info) != 0:
        return None
    return Refinement(basis, equations.gradients.matrix @ basis, output_images, factor, output_noise)


def output_scale(equations, activated, derivative):
    """The scale of each known output's noise (known rows,), or None where no output is known or one's derivative is
    zero. The client's sum O rounds alike everywhere (about the RMS of the outputs), and its activation output a
    rounds by a share of |a|, which reaches the pre-activation read back from it over the derivative d: so the RMS
    of |a / d| plus each one's |a / d| (for ReLU and LeakyReLU, |a / d| is |O|)."""
    known = equations.known
    if not bool(known.any()):
        return None
    slope = derivative.reshape(-1)[known].abs().to(equations.output)
    if not bool((slope > 0).all()):
        return None
    read_back = activated.reshape(-1)[known].abs().to(slope) / slope
    scale = read_back + float(torch.linalg.norm(read_back)) / math.sqrt(read_back.numel())
    return scale if bool((scale > TINY).all()) else None
