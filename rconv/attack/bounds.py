"""How far a recovered image may be from the truth: the error bound behind `exact`.

The attack is, branch by branch, a chain of linear solves, so its error is the gradients' noise
mapped through that chain. The noise is measured where the gradients contradict themselves
(the Linear layer's misfit from rank one, each conv layer's residual).

One image: the linearised bound. The chain's Jacobian (rconv.attack.tangents) is applied to a few
random noise directions on each source of noise (the Linear layer's gradients, each conv layer's
weight gradient), reusing the attack's factorisations; each source is scaled to the level its
residual shows (SourceLevels); a layer whose solve reads its known outputs also gets the rounding the
client's forward pass left in them; and the largest move over the probes, times LINEARISED_MARGIN,
plus what the layer's own solve may round, bounds each layer's input.

A batch: the probe. The batch's attack is run again on gradients carrying noise of the size the
residuals show, and the change in every image's layer inputs, times BOUND_MARGIN, is its bound.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..linalg.solvers import eps
from .network import Gradients

# A batch's probe draws one random direction; the gradients' own noise may lie a few times closer to
# the chain's most amplified directions (measured over 624 defended attacks and the 1,400 of the
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
# The linearised bound's noise directions per source: the larger move of two stands for the noise's
# (one is cheaper, but its largest error/bound over the defended sweep was 1.3 times two's).
LINEARISED_PROBES = 2
# The linearised bound's margin over the largest move of its probes: with it the true error reached
# at most 0.47 of the bound over 624 defended attacks (benchmarks/bound_sweep.py) and 0.89 over 100 float32
# MNIST images on LeNet, whose refined hidden layers (rconv.attack.refined) reached 1.04 of it with 3; a larger
# margin leaves more claims at less than a tenth of their bound.
LINEARISED_MARGIN = 3.5
# A hidden layer's input, computed by the client in the gradients' precision, is rounded by about this
# many eps of its largest value (float32 LeNets: up to 10 eps at the fourth conv layer), invisibly to
# every residual: the gradients are consistent with the rounded input.
_FORWARD_ROUNDING_EPS = 20.0
# A layer's outputs, computed by the client in the gradients' precision, are rounded by about this many eps of
# their RMS (float32 LeNets and O_CNN6: 0.7-1.5 eps at the first layer's outputs, what one layer's sums and
# activation leave), with a margin: it reaches the input of a layer whose solve reads its outputs.
_OUTPUT_ROUNDING_EPS = 3.0
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
    return _like(grads, parameters, noisy)


def _like(grads, parameters, tensors):
    """Gradients of `tensors` that keep what `grads` carry from a weight update (its rounding, its steps)."""
    return Gradients(parameters, tensors, [grads.rounding_of(p) for p in parameters], grads.local_steps)


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
    return _like(grads, parameters, [replaced.get(id(p), noisy.of(p)) for p in parameters])


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


class NoiseDirections(NamedTuple):
    """Random noise directions on the gradients of some parameters: `probes` columns each, of unit norm
    relative to the gradient they lie on. Each is a view (*shape, probes) of contiguous (probes, *shape)."""

    of: dict  # id(parameter) -> (*its shape, probes)

    def __call__(self, parameter):
        return self.of.get(id(parameter))


def noise_directions(parameters, grads, probes=LINEARISED_PROBES, cache=None):
    """NoiseDirections on the gradients of `parameters`.

    Half of each direction's power is spread evenly over the entries (as differential privacy adds
    noise), half in proportion to each entry (as rounding leaves it), so that it resembles either kind.
    The random draws depend only on the shapes (a fixed seed): `cache`, a dict kept per model, keeps them.
    """
    wanted = [grads.of(parameter).to(torch.float64) for parameter in parameters]
    key = ("noise directions", probes, tuple(tuple(grad.shape) for grad in wanted), str(wanted[0].device))
    draws = cache.get(key) if cache is not None else None
    if draws is None:
        draws = _draws(wanted, probes)
        if cache is not None:
            cache[key] = draws
    of = {}
    for parameter, grad, (even, random) in zip(parameters, wanted, draws):
        # Worked on as rows (probes, entries), the draws read across: an elementwise operation along a last axis
        # of 2 probes runs several times slower, and so do einsum's copies of such views downstream. The same
        # numbers as unit(grad * random) + even, unit, times |grad|; in place, as a 224-px net's Linear gradient
        # has 25M entries per direction.
        rows = grad.reshape(1, -1) * random.reshape(-1, probes).T
        direction = _unit_rows_(_unit_rows_(rows).add_(even.reshape(-1, probes).T))
        of[id(parameter)] = direction.mul_(float(torch.linalg.norm(grad))).T.view(*grad.shape, probes)
    return NoiseDirections(of)


def _draws(grads, probes):
    """Per gradient: `probes` even unit directions, and the random factors of the sized ones."""
    # one draw for every direction: many small draws cost more in overhead than in numbers
    total = sum(grad.numel() for grad in grads) * probes
    numbers = torch.randn(2, total, generator=torch.Generator().manual_seed(_PROBE_SEED), dtype=torch.float64)
    draws, start = [], 0
    for grad in grads:
        shape, size = (*grad.shape, probes), grad.numel() * probes
        pair = numbers[:, start:start + size].to(grad.device)
        # normalised in place: both halves stay views of the numbers, drawn once (800 MB on a 224-px net)
        _unit_rows_(pair[0].view(-1, probes).T)
        draws.append((pair[0].view(shape), pair[1].view(shape)))
        start += size
    return draws


def _unit_rows_(tensor):
    """Each row of `tensor` (probes, entries) divided by its norm, in place."""
    return tensor.div_(tensor.norm(dim=1, keepdim=True).clamp_min(_TINY))


class SourceLevels:
    """The relative noise level of each source of noise (the Linear layer's gradients, then each conv
    layer's weight gradient, top down), from the residual it leaves where it enters.

    own: the part of a layer's measured residual that the noise fixed above does not leave is put down
    to its own source, scaled by the mean residual its directions leave. assumed: a source not
    measured apart (its layer's solve is expensive) gets the largest level found above it. Neither
    falls below the gradients' rounding: one eps of their precision, or the source's own floor (what
    a weight update's rounding left in it). explain: the factor by which all the noise so far must be
    scaled to leave the residual measured: above 1 where the data show more (the attack's own
    rounding acts as noise too), below where they show less (a layer above took its solve's rounding
    for noise of its gradients; float64 gradients only, see __init__).

    floors: relative noise levels the sources cannot be below, in the order they are asked for.
    """

    def __init__(self, dtype, floors=()):
        self.floor = _ARITHMETIC_NOISE_EPS * eps(dtype)
        # the rounding the client's forward pass leaves in a layer's known outputs, in units of refined.output_scale
        self.output_rounding = _OUTPUT_ROUNDING_EPS * eps(dtype)
        # Less residual than predicted lowers the levels only where the levels above may have taken the
        # attack's own float64 rounding for gradient noise: float64 gradients. Coarser gradients also carry
        # rounding of the client's forward pass that the residuals see only in part: lowered by them, a
        # float32 MNIST bound fell to 0.8 of the error (and to 0.96 with the lowering capped at 0.6).
        self.lower = dtype == torch.float64
        self.floors = list(floors)
        self.levels = []

    def _next_floor(self):
        floor = self.floors[len(self.levels)] if len(self.levels) < len(self.floors) else 0.0
        return max(self.floor, floor)

    def own(self, energies, measured, above=None):
        probed = float(energies.mean())
        if not probed > _TINY:  # its directions leave no residual: nothing to measure it by
            return self.assumed()
        unexplained = measured - (float(above.mean()) if above is not None else 0.0)
        level = max(self._next_floor(), math.sqrt(max(unexplained, 0.0) / probed))
        self.levels.append(level)
        return level

    def assumed(self):
        level = max([self._next_floor()] + self.levels)
        self.levels.append(level)
        return level

    def explain(self, energies, measured):
        probed = float(energies.mean())
        factor = math.sqrt(max(measured, 0.0) / probed) if probed > _TINY else 1.0
        rounding = _CONSISTENT_EPS * eps(torch.float64)
        if not math.sqrt(max(measured, 0.0)) > rounding:
            # A residual at float64 rounding explains noise up to that level, never more: a layer whose equations
            # absorb the noise (square, both kinds) leaves rounding far above the probes' residuals, and took it
            # for noise 1e5 (float32) to 1e14 (float64) times the gradients'.
            factor = min(factor, max(1.0, rounding / max(self.levels + [self.floor])))
        return factor if self.lower else max(1.0, factor)


def linearised_bound(layers, measured, noise, dtype):
    """The ErrorBound from the chain's tangents (LayerTangents per conv layer, first to last): each layer's
    largest move over the probes, times LINEARISED_MARGIN, plus what the layer's own solve may round.

    measured: Measured per conv layer, first to last; noise: the largest source level; dtype: the gradients'.
    """
    # A layer below that found more noise than the layers above assumed (a factor above 1) says their
    # moves were too small as well: each layer's bound takes the largest growth found below it.
    growth, grown = 1.0, []
    for layer in layers:  # first to last: the layers below a layer come before it
        grown.append(growth)
        growth = max(1.0, growth * layer.rescaled)
    bounds = [LINEARISED_MARGIN * extra * float(layer.moves.abs().max()) + _rounding(m) +
              (_forward_rounding(m, dtype) if number else 0.0) if m.input.numel() else 0.0
              for number, (layer, m, extra) in enumerate(zip(layers, measured, grown))]
    return ErrorBound(bounds[0], tuple(bounds), noise)


def features_bound(tangents, features, noise):
    """The ErrorBound of a network without conv layers, whose image is the Linear layer's input: its largest move
    over the probes (tangents: tangents.features_tangents), times LINEARISED_MARGIN, plus the rounding of the
    division that recovers it (a few float64 eps)."""
    image = LINEARISED_MARGIN * float(tangents.moves.abs().max()) + \
        _ROUNDING_MARGIN * eps(torch.float64) * float(features.abs().max())
    return ErrorBound(image, (), noise)


def _forward_rounding(measured, dtype):
    """How far the client's own forward pass, in the gradients' precision, may have rounded a hidden layer's
    input: the gradients describe that rounded input, so the attack recovers it, not the exact one."""
    return _FORWARD_ROUNDING_EPS * eps(dtype) * float(measured.input.abs().max())


def _rounding(measured):
    """What a layer's own solve may add to its input's error by rounding."""
    return _ROUNDING_MARGIN * measured.cond * eps(torch.float64) * float(measured.input.abs().max())


# Why an image has no finite bound although every other check passed.
UNMEASURED = ("error bound: infinite, as how far the gradients' noise moves the image could not be measured (the "
              "attack rerun on slightly noisier gradients lost a layer's solve, or for a batch its split or the "
              "pairing of its images; or a layer's condition number is infinite), so exact is not claimed")


def bound_reasons(bound, tolerances):
    """Why the image is not exact by its bound (none when the bound is within tolerances.image_error)."""
    if bound.image <= tolerances.image_error or math.isnan(bound.noise):
        return []  # within the bound, or no bound measured (other reasons say why)
    if math.isinf(bound.image):
        return [UNMEASURED]
    worst = max(range(len(bound.layers)), key=lambda n: bound.layers[n] if math.isfinite(bound.layers[n]) else -1)
    return [f"error bound: the image may be off by up to {bound.image:.2g} (max abs), above the "
            f"{tolerances.image_error:g} that exact allows for {str(tolerances.dtype).replace('torch.', '')} "
            f"gradients; the gradients' noise ({bound.noise:.2g} relative) is amplified most by conv layer "
            f"{worst + 1} and below"]
