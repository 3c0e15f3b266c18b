"""A conv layer followed by train-mode BatchNorm2d, for one image: its input, mean and deviation solved together.

Train-mode BatchNorm normalises the conv output O (F x P x Q) by the image's own statistics:
xhat_f = (O_f - mu_f) / sigma_f with mu_f the mean and sigma_f = sqrt(var_f + eps) (biased
variance), then y = gamma xhat + beta. Reading the activation gives y and dL/dy, hence
xhat = (y - beta) / gamma and BatchNorm's backward dL/dO_f = G_f / sigma_f with
G_f = gamma_f (dL/dy_f - mean(dL/dy_f) - xhat_f mean(dL/dy_f xhat_f)), known. With z = (X, m, s),
m_f = mu_f - b_f (the conv bias cancels in BatchNorm, so it is absorbed into the mean) and s = sigma:

    gradient constraints   s_f dL/dW_f - sum_u G_f[u] patch_u(X) = 0
    weight constraints     conv(X)_f - m_f - s_f xhat_f = 0

All homogeneous: BatchNorm is scale invariant, so these equations fix z only up to a factor t
(a conv bias does not help: it cancels with the mean). The factor is set by eps alone: the
true z satisfies s_f^2 - var(conv(X)_f) = eps, and t z gives t^2 (s_f^2 - var_f), so
t^2 = eps / (s_f^2 - var_f) for every filter. That is a difference of nearly equal numbers
(eps against sigma^2), so the scale keeps about log10(sigma^2 / eps) fewer digits than the
direction: fine from float64 gradients, a few digits only from float32 ones; the error bound
(rconv.attack.reconstruct's probe) measures what is left.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..common.errors import RConvError
from ..linalg.solvers import TINY, Spectrum, rank_rtol
from .activations import branches, preactivation
from .equations import GradientSystem, WeightSystem
from .systems import DENSE_MAX_UNKNOWNS

_FLOAT64_BYTES = 8
# The dense solve holds the system, the SVD's working copy of it and its factors: about three times its size.
_SVD_COPIES = 3


class NormSolve(NamedTuple):
    """A train-mode BatchNorm layer solved: its input, the statistics, and what they were checked by."""

    x: torch.Tensor  # (C, H, W) the layer's input
    output_grad: torch.Tensor  # (F, P, Q) dL/dO of the conv output: what the layer below is handed through
    derivative: torch.Tensor  # (F, P, Q) the activation's derivative as read
    mean: torch.Tensor  # (F,) mu: the conv output's mean (conv bias included)
    deviation: torch.Tensor  # (F,) sigma = sqrt(var + eps)
    spectrum: Spectrum  # of the homogeneous system: rank counts its scale direction as determined when eps set it
    residual: float  # |K z| / (|K| |z|): how far the data are from one consistent (X, mu, sigma)
    checks: float  # the largest relative misfit of dL/dgamma, dL/dbeta and the certificate var + eps = sigma^2
    scale_spread: float  # relative spread of the per-filter scales eps set: the scale's own precision
    equations: int
    unknowns: int  # C*H*W + 2F
    notes: tuple


def solve_train_norm(step, signal, grads, input_shape, options, frozen=None):
    """The NormSolve of conv step `step` (step.norm a network.TrainNorm) from the Signal the layer above handed
    down; frozen: an ActivationRead to read the activation by (the error bound's probe)."""
    wide = dict(device=options.device, dtype=torch.float64)
    norm, tolerances = step.norm, options.tolerances
    beta_grad = grads.maybe(norm.module.bias if norm.module.affine else None)
    beta_grad = beta_grad.to(**wide) if beta_grad is not None else None
    if frozen is None:
        # dL/dbeta = sum dL/dy: the bias gradient that settles near-zero units of y
        derivative, _ = branches(step, signal.activated, signal.activated_grad, beta_grad, tolerances,
                                 signal.noise, options.relu_test)
    else:
        derivative = frozen.derivative
    y, known = preactivation(step, signal.activated, derivative, tolerances.saturation)
    if not bool(known.all()):
        hidden = int((~known).sum())
        raise RConvError(f"{step.label}: its {step.activation} hides {hidden} of its train-mode BatchNorm's outputs, "
                         f"and BatchNorm's backward needs every normalised output; R-CONV inverts train-mode "
                         f"BatchNorm before an activation that reveals them all (LeakyReLU, or none)")
    y_grad = signal.activated_grad * derivative
    notes = []
    if signal.scale_from_eps and step.activation in _HOMOGENEOUS:
        # The layer above set its input's scale from eps only (a train-mode BatchNorm too), to a few digits:
        # BatchNorm's centring, mean(xhat_f) = 0, i.e. t mean(y_f) = beta_f, sets it again to the data's own
        # precision wherever beta is not zero. (Data from any other layer keep their scale, which is exact.)
        data_scale = _data_scale(y, norm.beta.to(**wide))
        if abs(data_scale - 1.0) > tolerances.residual:
            notes.append(f"{step.label}: the data the layer above handed down rescaled by {data_scale:.6g} to centre "
                         f"BatchNorm's output (mean(xhat) = 0); that layer's recovered input is off by this factor")
        y, y_grad = data_scale * y, y_grad / data_scale
    solved = _solve_statistics(step, y, y_grad, grads, input_shape, options)
    return solved._replace(derivative=derivative, notes=tuple(notes) + solved.notes)


# Activations whose output scales with their input (a positive factor keeps every branch), so that the data
# the layer above hands down can be rescaled.
_HOMOGENEOUS = ("identity", "leaky_relu", "relu")


def _data_scale(y, beta):
    """The factor t that centres xhat = (t y - beta) / gamma, t mean(y_f) = beta_f over the filters in least
    squares; 1 where beta is zero (no affine parameters, or its initial value), which leaves the scale as it was."""
    means = y.mean((1, 2))
    energy = float((means * means).sum())
    if not float((beta * beta).sum()) > 0 or not energy > 0:
        return 1.0
    scale = float((means * beta).sum()) / energy
    return scale if scale > 0 else 1.0


def _solve_statistics(step, y, y_grad, grads, input_shape, options):
    """The NormSolve (derivative unset) of data y and dL/dy (F, P, Q) as read off the activation."""
    wide = dict(device=options.device, dtype=torch.float64)
    norm, conv, tolerances = step.norm, step.conv, options.tolerances
    module = norm.module
    gamma, beta = norm.gamma.to(**wide).view(-1, 1, 1), norm.beta.to(**wide).view(-1, 1, 1)
    beta_grad = grads.maybe(module.bias if module.affine else None)
    gamma_grad = grads.maybe(module.weight if module.affine else None)
    xhat = (y - beta) / gamma
    pixels = xhat[0].numel()
    mean_grad = y_grad.mean((1, 2), keepdim=True)
    mean_product = (y_grad * xhat).mean((1, 2), keepdim=True)
    reduced = gamma * (y_grad - mean_grad - xhat * mean_product)  # G = sigma dL/dO
    checks = _parameter_checks(y_grad, xhat, gamma_grad, beta_grad)
    weight = conv.weight.detach().to(**wide)
    gradients = GradientSystem(reduced, grads.of(conv.weight).to(**wide), input_shape[1:], conv.kernel_size,
                               conv.stride, step.padding)
    weights = WeightSystem(weight, input_shape, tuple(conv.stride), tuple(step.padding))
    matrix, column_scale = _stacked(gradients, weights, xhat, step.label, options.memory_limit)
    # Pixels no kernel position reaches have empty columns: each another null direction, which the SVD could
    # return as the solution (a 16-px input at stride 2 came back with nine infinite pixels); left at zero.
    read = column_scale > TINY
    _, values, right = torch.linalg.svd(matrix[:, read], full_matrices=False)
    z = torch.zeros_like(column_scale)
    z[read] = right[-1] / column_scale[read]
    filters, channels = weight.shape[0], input_shape[0]
    x, m, s = z[:-2 * filters], z[-2 * filters:-filters], z[-filters:]
    if float(s.sum()) < 0:  # sigma > 0 picks the sign
        x, m, s = -x, -m, -s
    residual = float(values[-1] / values[0].clamp_min(TINY))
    rtol = rank_rtol(tolerances.dtype, matrix.shape)
    rank = int((values[:-1] > rtol * values[0]).sum())  # the last one is the scale direction, zero by construction
    cond = float(values[0] / values[-2].clamp_min(TINY))
    conv_out = torch.nn.functional.conv2d(x.view(1, *input_shape), weight, stride=conv.stride,
                                          padding=step.padding)[0]
    scale, spread, notes = _eps_scale(s, conv_out, norm.eps, step.label)
    if scale is not None:
        rank += 1
        x, m, s, conv_out = scale * x, scale * m, scale * s, scale * conv_out
        bias = conv.bias.detach().to(**wide) if conv.bias is not None else torch.zeros_like(m)
        certificate = (s ** 2 - norm.eps - conv_out.var((1, 2), unbiased=False)).abs() / (s ** 2)
        centre = (m - conv_out.mean((1, 2))).abs() / s
        checks = max(checks, float(certificate.max()), float(centre.max()))
        mean = m + bias
    else:
        mean = m
    output_grad = reduced / s.view(-1, 1, 1)
    equations = gradients.shape[0] * channels + filters * pixels
    return NormSolve(x.view(*input_shape), output_grad, None, mean, s, Spectrum(rank, cond), residual, checks,
                     spread, equations, matrix.shape[1], tuple(notes))


def _parameter_checks(y_grad, xhat, gamma_grad, beta_grad):
    """The relative misfits of BatchNorm's own gradients, dL/dgamma = sum dL/dy xhat and dL/dbeta = sum dL/dy,
    against the recovered dL/dy and xhat (0 without affine parameters)."""
    misfit = 0.0
    for given, recovered in ((gamma_grad, (y_grad * xhat).sum((1, 2))), (beta_grad, y_grad.sum((1, 2)))):
        if given is not None:
            given = given.to(recovered)
            misfit = max(misfit, float(torch.linalg.norm(recovered - given) /
                                       torch.linalg.norm(given).clamp_min(TINY)))
    return misfit


def _stacked(gradients, weights, xhat, label, memory_limit):
    """The dense homogeneous system K z = 0 in z = (X, m, s), each block scaled to unit norm and each column to
    unit norm (so that the singular values measure the data, not the units), and the column scales."""
    channels, filters = gradients.channels, xhat.shape[0]
    pixels, rows_per_channel = gradients.shape[1], gradients.shape[0]
    unknowns = channels * pixels + 2 * filters
    if unknowns > DENSE_MAX_UNKNOWNS:
        raise RConvError(f"{label}: a train-mode BatchNorm layer is solved densely, and its {unknowns:,} unknowns "
                         f"exceed the {DENSE_MAX_UNKNOWNS:,} a dense solve takes")
    rows = rows_per_channel * channels + xhat.numel()
    if memory_limit is not None and _FLOAT64_BYTES * rows * unknowns * _SVD_COPIES > memory_limit:
        raise RConvError(f"{label}: the train-mode BatchNorm layer's dense system ({rows:,} x {unknowns:,}) would "
                         f"exceed the memory limit")
    kernel_offsets = rows_per_channel // filters
    matrix = xhat.new_zeros(rows, unknowns)
    block = gradients.matrix
    rhs = gradients.rhs  # (F*k*k, C): dL/dW; its rows (f, i, j) carry s_f
    rows_of_channel = torch.arange(rows_per_channel, device=xhat.device)
    deviation_columns = channels * pixels + filters + rows_of_channel // kernel_offsets  # row (f, i, j) -> s_f
    for c in range(channels):
        top = c * rows_per_channel
        matrix[top:top + rows_per_channel, c * pixels:(c + 1) * pixels] = -block
        matrix[top + rows_of_channel, deviation_columns] = rhs[:, c]
    top = rows_per_channel * channels
    matrix[:top] /= torch.linalg.norm(matrix[:top]).clamp_min(TINY)
    outputs = xhat.shape[1] * xhat.shape[2]
    lower = torch.cat([weights.dense().to(xhat),
                       -torch.repeat_interleave(torch.eye(filters, dtype=xhat.dtype, device=xhat.device), outputs, 0),
                       -torch.block_diag(*xhat.reshape(filters, outputs, 1))], dim=1)
    matrix[top:] = lower / torch.linalg.norm(lower).clamp_min(TINY)
    column_scale = torch.linalg.norm(matrix, dim=0).clamp_min(TINY)
    return matrix / column_scale, column_scale


def _eps_scale(s, conv_out, eps, label):
    """The factor t that makes t^2 (s_f^2 - var_f) = eps for every filter, weighted by how precisely each filter
    gives it (its difference's noise grows as s_f^2); its relative spread over the filters; and notes.
    None when the differences do not share a positive sign: the scale is then not determined."""
    differences = s ** 2 - conv_out.var((1, 2), unbiased=False)
    weights = s ** -4
    inverse = float((weights * differences).sum() / weights.sum()) / eps  # 1 / t^2
    if not inverse > 0 or not bool((s > 0).all()):
        return None, math.inf, [f"{label}: the recovered deviations do not exceed the output's spread, so eps cannot "
                                f"set the input's scale (BatchNorm is scale invariant): the input is known only up to "
                                f"a factor"]
    scale = 1.0 / math.sqrt(inverse)
    per_filter = (eps / differences.clamp_min(TINY)).sqrt()
    spread = float((per_filter - scale).abs().max() / scale) if bool((differences > 0).all()) else math.inf
    return scale, spread, [f"{label}: train-mode BatchNorm solved jointly for the input, each filter's mean and "
                           f"deviation (gradients+weights, homogeneous); the input's scale set by eps = {eps:g} "
                           f"alone, the filters agreeing on it to {spread:.2g}"]
