"""What a recovered activation output reveals: its derivative, its pre-activation, ReLU's branch.

R-CONV knows each layer's activation output (recovered from the layer above), so the
activation's derivative and, where the activation is invertible, its input can be
written through that output.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from ..linalg.solvers import TINY, eps

RELU_TESTS = ("relative", "absolute")  # the suite's ReLU test and the published code's
# The values an activation's output can take, for project=True.
VALUE_RANGES = {"relu": (0.0, None), "sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
# The published code rounds recovered outputs to this many decimals before its ReLU test.
_PUBLISHED_DECIMALS = 7
# A unit behind ReLU counts as active only above this multiple of the layer's noise floor
# (its most negative recovered output, which only rounding produces).
NOISE_MARGIN = 3.0
# At most this many near-zero units per filter are re-decided from the bias gradient (2^n tries).
_REPAIR_MAX_UNITS = 10
# In a batch, a filter whose bias misfit exceeds this many times the median filter's has a misread
# unit, and a flip is taken only when it brings the misfit down by this factor.
_BATCH_OUTLIER = 10.0
# At most this many units of one filter are flipped (one at a time) from the batch's bias gradient.
_FLIPS_PER_FILTER = 4


class Noise(NamedTuple):
    """What the solve above tells about the rounding noise in a layer's recovered output."""

    gain: float  # how much that solve may amplify the gradients' rounding (its condition number)
    negative: float  # the most negative recovered output, before any projection


class Branches(NamedTuple):
    """The activation's derivative at every unit, and the band around zero where noise could flip a branch."""

    derivative: torch.Tensor
    band: float


def activation_grad(activation, slope, activated, relu_threshold):
    """d(activation)/d(input) written through the activation's output, which R-CONV knows."""
    if activation == "relu":
        return (activated > relu_threshold).to(activated.dtype)
    if activation == "leaky_relu":
        return torch.where(activated > 0, torch.ones_like(activated), torch.full_like(activated, slope))
    if activation == "sigmoid":
        return activated * (1 - activated)
    if activation == "tanh":
        return 1 - activated * activated
    return torch.ones_like(activated)


def _repair_branches(step, derivative, activated, activated_grad, bias_grad, band, tolerance, threshold):
    """Settle units whose recovered output is too close to the branch test's threshold (ReLU's, or
    LeakyReLU's zero) to tell their branch: per filter, choose the branches that best satisfy
    dL/db[f] = sum_pq dL/dO[f, p, q].

    The bias gradient is information the paper's method leaves unused; it resolves the few
    units that rounding noise would otherwise put on the wrong side of the threshold.
    """
    if step.activation not in ("relu", "leaky_relu") or bias_grad is None or band <= 0:
        return derivative
    low = 0.0 if step.activation == "relu" else step.slope
    derivative = derivative.clone()
    residuals = bias_grad - (activated_grad * derivative).sum((1, 2))
    for f in torch.nonzero(residuals.abs() > tolerance).flatten().tolist():
        near = torch.nonzero(activated[f].abs().flatten() <= band).flatten()
        if len(near) == 0:
            continue
        # the doubtful units sit at the branch test's threshold, not at zero, where the many units that are off
        # lie in their noise
        near = near[torch.argsort((activated[f].flatten()[near] - threshold).abs())[:_REPAIR_MAX_UNITS]]
        grads, current = activated_grad[f].flatten()[near], derivative[f].flatten()[near]
        choices = torch.tensor(list(itertools.product((low, 1.0), repeat=len(near))), dtype=grads.dtype,
                               device=grads.device)
        misfit = (residuals[f] - (choices - current) @ grads).abs()
        best = _fewest_flips(misfit, (choices != current).sum(1), tolerance)
        if float(misfit[best]) < abs(float(residuals[f])):
            derivative[f].view(-1)[near] = choices[best]
    return derivative


def _fewest_flips(misfit, changes, tolerance):
    """The best-fitting choice among those with the fewest flips whose misfit is within tolerance, else the
    best-fitting one: 2^n choices fit one number, and several wrong flips can fit its noise better than the one
    right flip; and where one flip's grain is small beside the tolerance, many single flips fit, of which the
    right one fits to rounding (a 224-px float32 layer: four dead units were turned on instead of the four live
    ones just above zero, which left a residual of 3e-4)."""
    fits = misfit <= tolerance
    if not bool(fits.any()):
        return int(torch.argmin(misfit))
    fewest = changes[fits].min()
    return int(torch.argmin(torch.where(fits & (changes == fewest), misfit, misfit.new_tensor(float("inf")))))


def _published_branches(step, activated):
    """The published code's test: outputs rounded to 7 decimals, no repair."""
    scale = 10.0 ** _PUBLISHED_DECIMALS
    rounded = torch.round(activated * scale) / scale
    if step.activation == "relu":
        return Branches((rounded > 0).to(activated.dtype), 0.0)
    if step.activation == "leaky_relu":
        return Branches(torch.where(rounded < 0, torch.full_like(activated, step.slope),
                                    torch.ones_like(activated)), 0.0)
    return Branches(activation_grad(step.activation, step.slope, activated, 0.0), 0.0)


def _flip_outliers(step, derivative, closeness, grads, bias_grad, tolerance):
    """Per filter whose bias misfit exceeds `tolerance`, flip the near-zero units (|closeness| <= 1)
    one at a time, each the one that best explains the misfit, while a flip brings it down by that
    factor of ten; the batch's version of _repair_branches, whose 2^n tries of the units nearest
    the threshold miss a misread unit among the hundreds that a batch has near it."""
    if step.activation not in ("relu", "leaky_relu"):
        return derivative
    low = 0.0 if step.activation == "relu" else step.slope
    derivative = derivative.clone()
    residuals = bias_grad - (grads * derivative).sum((1, 2))
    for f in torch.nonzero(residuals.abs() > tolerance).flatten().tolist():
        near = torch.nonzero(closeness[f].abs().flatten() <= 1.0).flatten()
        flat = derivative[f].view(-1)
        for _ in range(_FLIPS_PER_FILTER):
            residual = float(residuals[f])
            if abs(residual) <= tolerance or len(near) == 0:
                break
            flipped = torch.where(flat[near] == 1.0, torch.full_like(flat[near], low), torch.ones_like(flat[near]))
            misfit = (residual - (flipped - flat[near]) * grads[f].flatten()[near]).abs()
            best = int(torch.argmin(misfit))
            if float(misfit[best]) * _BATCH_OUTLIER > abs(residual):
                break  # no single unit explains it
            unit = near[best]
            residuals[f] -= (flipped[best] - flat[unit]) * grads[f].flatten()[unit]
            flat[unit] = flipped[best]
            near = torch.cat([near[:best], near[best + 1:]])
    return derivative


def batch_branches(step, signals, bias_grad, tolerances, relu_test):
    """Branches of every image of a batch, near-zero units settled jointly with the batch's bias gradient.

    The batch's dL/db[f] sums every image's dL/dO[f]: one equation per filter over all their
    units, which settles the few units (of any image) too close to zero to read.
    """
    read = [branches(step, s.activated, s.activated_grad, None, tolerances, s.noise, relu_test) for s in signals]
    if relu_test == "absolute" or bias_grad is None or not read:
        return read
    bands = [r.band for r in read]
    if max(bands) <= 0:
        return read
    # images side by side along the height: a filter's sum over that picture is the batch's sum;
    # each output over its own image's band, so that one band (1) tells near-zero units of all
    closeness = torch.cat([s.activated / max(b, TINY) for s, b in zip(signals, bands)], dim=1)
    grads = torch.cat([s.activated_grad for s in signals], dim=1)
    derivative = torch.cat([r.derivative for r in read], dim=1)
    # a filter's misfit far above the others' (the batch's rounding) is a misread unit, even below
    # sqrt(eps): one unit of 16 images' 1,024 barely moves the bias gradient, but all of its weight gradient
    typical = float((bias_grad - (grads * derivative).sum((1, 2))).abs().median())
    repaired = _flip_outliers(step, derivative, closeness, grads, bias_grad, _BATCH_OUTLIER * typical)
    heights = [s.activated.shape[1] for s in signals]
    return [Branches(d, b) for d, b in zip(torch.split(repaired, heights, dim=1), bands)]


def branches(step, activated, activated_grad, bias_grad, tolerances, noise, relu_test):
    """The activation's derivative at every unit of a conv step, from its recovered output.

    The "relative" test counts a ReLU unit active above the layer's floor (tolerances.relu times
    its largest output, or the noise floor if larger) and settles near-zero units of either
    ReLU kind with the bias gradient; "absolute" is the published code's rounding.
    """
    if relu_test == "absolute":
        return _published_branches(step, activated)
    scale = float(activated.abs().max()) if activated.numel() else 0.0
    threshold = max(tolerances.relu * scale, NOISE_MARGIN * noise.negative)
    derivative = activation_grad(step.activation, step.slope, activated, threshold)
    # How far a recovered output may stray: the previous solve's condition number times the
    # gradients' precision, or the noise seen behind ReLU.
    band = max(threshold, noise.gain * eps(tolerances.dtype) * scale)
    tolerance = tolerances.residual * float(torch.linalg.norm(bias_grad)) if bias_grad is not None else 0.0
    test = threshold if step.activation == "relu" else 0.0  # where activation_grad splits the branches
    derivative = _repair_branches(step, derivative, activated, activated_grad, bias_grad, band, tolerance, test)
    return Branches(derivative, band)


def preactivation(step, activated, derivative, saturation):
    """The pre-activation output O where the activation's output reveals it, and a mask of where it does."""
    activation, slope = step.activation, step.slope
    if activation == "relu":
        return activated.clamp_min(0), derivative > 0
    if activation == "leaky_relu":
        return torch.where(derivative == 1, activated, activated / slope), torch.ones_like(activated, dtype=torch.bool)
    if activation == "sigmoid":
        known = (activated > saturation) & (activated < 1 - saturation)
        clipped = activated.clamp(saturation, 1 - saturation)
        return torch.log(clipped) - torch.log1p(-clipped), known
    if activation == "tanh":
        known = activated.abs() < 1 - saturation
        return torch.atanh(activated.clamp(-1 + saturation, 1 - saturation)), known
    return activated, torch.ones_like(activated, dtype=torch.bool)
