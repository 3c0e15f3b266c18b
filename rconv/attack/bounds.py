"""How far a recovered image may be from the truth: the error bound behind `exact`.

The attack is, branch by branch, a chain of linear solves, so its error is the gradients' noise
mapped through that chain. The noise is measured where the gradients contradict themselves
(the Linear layer's misfit from rank one, each conv layer's residual); its effect is measured
by a probe: the attack run again on gradients carrying noise of that size, the change in every
layer's input taken as the error that noise causes, times a margin, plus what the layer's own
solve may round.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..linalg.solvers import eps
from .network import Gradients

# The probe draws one random direction; the gradients' own noise may lie a few times closer to the
# chain's most amplified directions (measured over 624 defended attacks and the 1,400 of the
# Testing and Various_settings notebooks, the true error reached 3.7x the probe's change), hence
# this margin.
BOUND_MARGIN = 5.0
# The noise a client's own arithmetic leaves in its gradients, in units of eps of their dtype
# (the residuals of float32 LeNets show 1-3 eps; they raise the level where they are larger).
_ARITHMETIC_NOISE_EPS = 1.0
# The attack's own float64 rounding, carried down the chain, acts like this much noise on the
# gradients, in float64 eps (clean float64 gradients: errors of 1e-13 to 1e-12 on LeNets).
_ATTACK_ROUNDING_EPS = 10.0
# A layer's own solve rounds its input by up to about cond * eps(float64) of its largest value;
# its bound adds this many times that (the paper's weight-constrained first layer, cond 1e8:
# errors of 1e-8 to 5e-8 from clean float64 gradients).
_ROUNDING_MARGIN = 10.0
# Fixed seed: the same gradients always get the same bound.
_PROBE_SEED = 20240605
# The probe's noise stays this many float64 eps above zero, so that its effect stands out from the
# attack's own rounding; the bound scales it back to the gradients' noise (the chain is linear).
_PROBE_FLOOR_EPS = 1e3
# The probe's noise is at least a layer's residual over this, so that it moves every residual
# measurably (and stays small enough for the chain's branches to hold).
_PROBE_RESIDUAL_RATIO = 10.0
# A residual within this many float64 eps is rounding, not noise to explain.
_CONSISTENT_EPS = 1e3
_TINY = 1e-300


class ErrorBound(NamedTuple):
    """A bound on the max abs error of the image and of every conv layer's input (first to last)."""

    image: float
    layers: tuple
    noise: float  # relative noise of the gradients the probe assumed


class Measured(NamedTuple):
    """What the bound needs of one conv layer's solve."""

    input: torch.Tensor  # the recovered input
    residual: float  # relative residual of its system (the bias misfit, over a few filters, is too coarse here)
    cond: float  # condition number of its system


def unbounded(layers, noise=math.nan):
    """No bound, for `layers` conv layers: the probe was not run (noise nan: other checks failed already)
    or could not measure the effect of the gradients' `noise`."""
    return ErrorBound(math.inf, (math.inf,) * layers, noise)


def noise_level(misfits, dtype):
    """The gradients' relative noise: the largest misfit they show, and never below their rounding.

    misfits: relative misfits of the gradients against the recovered data (the Linear layer's
    misfit from rank one, the relative residuals of layers solved from gradient constraints alone).
    """
    floor = max(_ARITHMETIC_NOISE_EPS * eps(dtype), _ATTACK_ROUNDING_EPS * eps(torch.float64))
    return max([floor] + [m for m in misfits if math.isfinite(m)])


def probe_level(level, residuals):
    """The probe's relative noise: the gradients' own, but large enough to be measured beside the
    attack's rounding and to move every layer's residual (residuals: each conv layer's)."""
    return max([level, _PROBE_FLOOR_EPS * eps(torch.float64)] +
               [r / _PROBE_RESIDUAL_RATIO for r in residuals if math.isfinite(r)])


def perturbed(parameters, grads, level):
    """`grads` (Gradients) with random noise of relative size `level` added to every tensor, in float64.

    Half the noise's power is spread evenly over the entries (as differential privacy adds it), half
    in proportion to each entry's size (as rounding leaves it), so the probe resembles either kind.
    """
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    noisy = []
    for parameter in parameters:
        grad = grads.of(parameter).to(torch.float64)
        even = _unit(torch.randn(grad.shape, generator=generator, dtype=torch.float64).to(grad.device))
        sized = _unit(grad * torch.randn(grad.shape, generator=generator, dtype=torch.float64).to(grad.device))
        noisy.append(grad + level * float(torch.linalg.norm(grad)) * _unit(even + sized))
    return Gradients(parameters, noisy)


def keep_rank(grads, noisy, linear, rank):
    """`noisy` (Gradients) with the Linear layer's noise projected onto the rank-`rank` matrices
    tangent at its gradients [dL/dW, dL/db]: a batch's probe.

    B images leave that matrix rank B. Noise off the tangent would raise its rank, which the split
    reads as more images (and refuses); to first order it moves no member's feature, so the
    bound loses nothing by leaving it out.
    """
    weight, bias = linear.weight, linear.bias
    clean = torch.cat([grads.of(weight).to(torch.float64), grads.of(bias).to(torch.float64)[:, None]], dim=1)
    noise = torch.cat([noisy.of(weight), noisy.of(bias)[:, None]], dim=1) - clean
    left, _, right = torch.linalg.svd(clean, full_matrices=False)
    left, right = left[:, :rank], right[:rank].T
    noise = left @ (left.T @ noise) + (noise @ right) @ right.T - left @ (left.T @ noise @ right) @ right.T
    kept = clean + noise
    replaced = {id(weight): kept[:, :-1], id(bias): kept[:, -1]}
    parameters = list(noisy.parameters)
    return Gradients(parameters, [replaced.get(id(p), noisy.of(p)) for p in parameters])


def _unit(tensor):
    return tensor / max(float(torch.linalg.norm(tensor)), _TINY)


def _explaining(residual, probed_residual, probed_level):
    """The relative noise of the probe's kind that would leave `residual` on a layer.

    The probe's noise adds to the gradients' own, so the probe's residual is about sqrt(r^2 + p^2),
    where p is what noise of probed_level produces alone; a residual far above p needs more noise
    than the misfits showed (or a kind the probe does not imitate, such as zeroed entries), and
    the bound grows with it.
    """
    if not residual > _CONSISTENT_EPS * eps(torch.float64):
        return 0.0  # consistent to rounding: nothing to explain
    alone = math.sqrt(max(probed_residual ** 2 - residual ** 2, 0.0))
    return probed_level * residual / alone if alone > 0.0 else math.inf


def probe_bound(measured, probed, level, probed_level):
    """The ErrorBound from what the attack and its rerun on noisier gradients measured.

    measured, probed: Measured per conv layer, first to last, of the attack and of the rerun.
    level: the gradients' estimated noise; probed_level: the noise the rerun added.
    """
    noise = max([level] + [_explaining(m.residual, p.residual, probed_level) for m, p in zip(measured, probed)])
    scale = BOUND_MARGIN * noise / probed_level  # the chain is linear: its change scales with the noise
    layers = tuple(scale * float((m.input - p.input).abs().max()) + _rounding(m) if m.input.numel() else 0.0
                   for m, p in zip(measured, probed))
    return ErrorBound(layers[0], layers, noise)


def _rounding(measured):
    """What a layer's own solve may add to its input's error by rounding."""
    return _ROUNDING_MARGIN * measured.cond * eps(torch.float64) * float(measured.input.abs().max())


def bound_reasons(bound, tolerances):
    """Why the image is not exact by its bound (none when the bound is within tolerances.image_error)."""
    if bound.image <= tolerances.image_error or math.isnan(bound.noise):
        return []  # within the bound, or no bound measured (other reasons say why)
    worst = max(range(len(bound.layers)), key=lambda n: bound.layers[n] if math.isfinite(bound.layers[n]) else -1)
    return [f"error bound: the image may be off by up to {bound.image:.2g} (max abs), above the "
            f"{tolerances.image_error:g} that exact allows for {str(tolerances.dtype).replace('torch.', '')} "
            f"gradients; the gradients' noise ({bound.noise:.2g} relative) is amplified most by conv layer "
            f"{worst + 1} and below"]
