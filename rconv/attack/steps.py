"""The steps of the attack on one image: the Linear layer, one conv layer, the verdict; and their records.

linear_step reads the Linear layer's input off its gradients; conv_step recovers one conv
layer's input from its equations (choosing the constraints that determine it), reports
it, and hands the layer below its recovered output and output gradient; verdict says why
the image cannot be trusted, if it cannot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..cases.client import dtype_name
from ..common.errors import RConvError
from ..common.geometry import conv_output_size, covered_size
from ..linalg.solvers import TINY, eps
from .activations import VALUE_RANGES, Noise, branches, preactivation
from .constraints import max_equations, min_filters
from .equations import GradientSystem, LayerEquations, weight_system
from .pooling import AVG_ACTIVATIONS, MAX_ACTIVATIONS, MAX_ITERATIONS, PooledInversion, invert_pooled_layer
from .systems import (
    DENSE_MAX_UNKNOWNS,
    barely_weights,
    choose_solver,
    counted_equations,
    estimate_layer,
    hybrid_factorises_weights,
    solve_layer,
)
from .refined import output_scale
from .tangents import Linearisation
from .tolerances import Tolerances
from .train_norm import solve_train_norm

FIRST_LAYER_METHODS = ("weights", "gradients", "hybrid")
# The method a LayerReport names for a conv layer solved with its train-mode BatchNorm (unknowns: its input,
# each filter's mean and deviation).
TRAIN_NORM_METHOD = "gradients+weights+batchnorm"
# ... and for a conv layer followed by a pool: its gradient and pooled weight constraints under a searched
# pattern of units (rconv.attack.pooling).
POOLED_METHOD = "gradients+weights+pattern"
# Seconds a pooled layer's pattern search may take: a 32-px attack's whole budget is a minute.
POOLED_TIME_LIMIT = 20.0
# The pattern search solves dense normal equations (8 bytes x unknowns^2, 0.5 GB here) many times over.
POOLED_MAX_UNKNOWNS = 8192
# Solves a pooled layer gets when its pattern is already known (the probe's rerun) or its data are wrong
# (a layer above it was not determined): one per phase of the search.
_POOLED_QUICK_SOLVES = 2
# The Linear layer's ratio dL/dW / dL/db is well conditioned: its output carries the gradients'
# rounding amplified at most this much.
LINEAR_NOISE_GAIN = 10.0
# A layer's recovered input carries its system's condition number times this, in units of eps.
_SOLVE_NOISE_MARGIN = 10.0
# A single image's Linear weight gradient is rank one up to this misfit, in units of eps
# (capped for half precisions).
_RANK_ONE_EPS, _RANK_ONE_CAP = 1e3, 0.05


@dataclass
class LayerReport:
    """How one conv layer's input was recovered."""

    layer: int  # conv layer number, 1 = the first
    method: str  # "gradients", "weights", "hybrid" or "gradients+weights"
    equations: int
    unknowns: int
    rank: int  # numerical rank at the gradients' precision
    cond: float
    residual: float  # relative residual of the solved system
    bias_residual: float  # |sum dL/dO - dL/db| / |dL/db|: checks the recovered output gradient
    known_outputs: float  # fraction of pre-activation outputs the activation reveals
    seconds: float = 0.0
    estimated: bool = False  # the layer could not be determined: rank is a counting bound, the input an estimate
    clipped: float = 0.0  # project=True: the largest change clipping made to the input, relative to its largest value
    error_bound: float = math.inf  # bound on the max abs error of its recovered input (inf: none)
    solver: str = "direct"  # "direct" (a factorisation) or "krylov" (preconditioned CG, matrix-free)
    stopped: str = ""  # why its Krylov solve or pattern search stopped short of certainty (empty: it did not)

    @property
    def full_rank(self):
        return self.rank == self.unknowns and not self.estimated and not self.stopped


@dataclass
class Reconstruction:
    """A recovered image with the per-layer diagnostics that justify (or not) trusting it."""

    image: torch.Tensor  # (B, C, H, W) float64: one image per member of the batch (B = 1 for one image)
    layers: list = field(default_factory=list)  # LayerReport per conv layer, first to last
    exact: bool = False  # every layer full rank with small residuals, and not moved by project's clipping
    seconds: float = 0.0
    method: str = "rconv"
    features: torch.Tensor | None = None  # the recovered input of the Linear layer
    linear_misfit: float = 0.0  # |dL/dW - dL/db x^T| / |dL/dW|: zero for one image's gradients
    notes: list = field(default_factory=list)  # what limits this reconstruction, in words
    reasons: list = field(default_factory=list)  # why it is not exact, layer by layer (empty when exact)
    inputs: list = field(default_factory=list)  # recovered input of each conv layer, first to last
    iterations: int = 0  # optimisation steps taken (the baselines); R-CONV takes none
    labels: torch.Tensor | None = None  # (B,) the recovered label of each image
    image_exact: torch.Tensor | None = None  # (B,) bool: which images are exact (all of them when exact)
    batch_size: int = 1  # images in the client's batch, as the Linear layer's gradients tell it
    error_bound: float = math.inf  # bound on the image's max abs error; exact needs it within 1e-6 (float64) / 1e-3
    noise: float = math.nan  # the gradients' relative noise the bound assumed
    bound_seconds: float = 0.0  # the part of seconds the error bound took

    def report(self):
        """The per-layer diagnostics as a pandas DataFrame, in solving order (last layer first)."""
        import pandas as pd
        rows = [vars(r) | {"full_rank": r.full_rank} for r in reversed(self.layers)]
        return pd.DataFrame(rows)


@dataclass(frozen=True)
class Options:
    """reconstruct()'s settings, as every step needs them."""

    first_layer: str
    methods: dict  # conv layer number -> method forced on it
    relu_test: str
    project: bool
    image_range: tuple
    tolerances: Tolerances
    device: torch.device
    memory_limit: int | None  # bytes the solves may take


class Signal(NamedTuple):
    """What a step hands the conv layer below it: that layer's recovered activation output and its gradient."""

    activated: torch.Tensor  # (F, P, Q)
    activated_grad: torch.Tensor  # dL/d(activated)
    noise: Noise
    determined: bool = True  # every layer above was determined (full rank); else these data are wrong
    scale_from_eps: bool = False  # a train-mode BatchNorm layer above set these data's scale from its eps alone
    covered: torch.Tensor | None = None  # (P, Q) bool: the outputs the layer above reads (None: all); the rest unknown


class _LinearStep(NamedTuple):
    features: torch.Tensor
    misfit: float
    signal: Signal
    notes: list


class ActivationRead(NamedTuple):
    """How a layer's activation was read: its derivative at every output, and which pre-activations are known.

    The error bound's probe reruns the attack with the first run's ActivationRead frozen, so that both runs
    solve the same equations.
    """

    derivative: torch.Tensor  # (F, P, Q)
    known: torch.Tensor  # (F, P, Q) bool
    pattern: torch.Tensor | None = None  # a pooled layer's pattern (rconv.attack.pooling), searched for once


class _ConvResult(NamedTuple):
    """One conv layer's recovered input, its report, what it hands the layer below, notes, its ActivationRead,
    and its Linearisation (for the error bound)."""

    input: torch.Tensor  # (C, H, W)
    report: LayerReport
    signal: Signal
    notes: tuple
    activation_read: ActivationRead
    linearisation: Linearisation


def fc_features(weight_grad, bias_grad):
    """The Linear layer's input from x_n = dL/dW[m, n] / dL/db[m], all outputs m in least squares."""
    energy = float(bias_grad @ bias_grad)
    if energy == 0.0:
        raise RConvError("the Linear layer's bias gradient is zero (the loss is saturated), so its input "
                         "cannot be recovered")
    features = bias_grad @ weight_grad / energy
    misfit = float(torch.linalg.norm(weight_grad - torch.outer(bias_grad, features)) /
                   torch.linalg.norm(weight_grad).clamp_min(TINY))
    return features, misfit


def rank_one(misfit, dtype):
    """Whether a Linear weight gradient with this rank-one misfit (fc_features) is one image's."""
    return misfit <= min(_RANK_ONE_CAP, _RANK_ONE_EPS * eps(dtype))


def linear_step(network, grads, shape, options, check_batch):
    """The Linear layer's input (the last conv layer's activation output) and the gradient reaching it."""
    wide = dict(device=options.device, dtype=torch.float64)
    linear, dtype = network.linear, options.tolerances.dtype
    bias_grad = grads.of(linear.bias).to(**wide)
    features, misfit = fc_features(grads.of(linear.weight).to(**wide), bias_grad)
    if check_batch and not rank_one(misfit, dtype):
        raise RConvError(f"the Linear layer's weight gradient is not rank one (relative misfit {misfit:.2g}); "
                         f"these look like the gradients of a batch of more than one image, and R-CONV "
                         f"recovers a single image (pass check_batch=False to try anyway)")
    notes = []
    largest = float(bias_grad.abs().max())
    if largest < torch.finfo(dtype).tiny:
        notes.append(f"the loss is saturated: the Linear layer's bias gradient is subnormal in {dtype_name(dtype)} "
                     f"(largest entry {largest:.2g}), so the gradients keep only a few significant bits")
    activated = features.view(shape)
    activated_grad = (linear.weight.detach().to(**wide).T @ bias_grad).view(shape)
    noise = Noise(gain=LINEAR_NOISE_GAIN, negative=max(0.0, -float(activated.min())))
    return _LinearStep(features, misfit, Signal(activated, activated_grad, noise), notes)


def layer_equations(step, signal, grads, input_shape, options, cache, repair=True, frozen=None, read=None):
    """The layer's equations, its output gradient dL/dO, its bias gradient, and its ActivationRead.

    repair: settle near-zero ReLU units with the bias gradient (one image's gradients only: a
    batch's bias gradient sums over its images and cannot tell whose unit it was).
    frozen: the ActivationRead to use instead of reading the activation again (the error bound's probe).
    read: the activation already read (activations.Branches, a batch's from batch_branches).
    """
    wide = dict(device=options.device, dtype=torch.float64)
    conv, tolerances = step.conv, options.tolerances
    bias_grad = grads.maybe(conv.bias)
    bias_grad = bias_grad.to(**wide) if bias_grad is not None else None  # a bias-free layer loses the bias checks
    if frozen is None:
        derivative, band = read if read is not None else branches(
            step, signal.activated, signal.activated_grad, bias_grad if repair else None, tolerances, signal.noise,
            options.relu_test)
    else:
        derivative = frozen.derivative
    output_grad = signal.activated_grad * derivative
    output, known = preactivation(step, signal.activated, derivative, tolerances.saturation)
    if frozen is not None:
        known = frozen.known
    elif step.activation == "relu" and options.relu_test == "relative":
        known &= signal.activated > band  # a pre-activation read off a near-zero output may be a dead unit's
    if signal.covered is not None and frozen is None:
        known &= signal.covered  # outputs no kernel position above reads were never recovered
    bias = conv.bias.detach().to(**wide).view(-1, 1, 1) if conv.bias is not None else 0.0
    known_rows = known.reshape(-1)
    weight = conv.weight.detach().to(**wide)
    equations = LayerEquations(
        gradients=GradientSystem(output_grad, grads.of(conv.weight).to(**wide), input_shape[1:],
                                 conv.kernel_size, conv.stride, step.padding),
        weights=weight_system(weight, conv.bias, conv.stride, step.padding, input_shape, cache),
        known=known_rows, output=(output - bias).reshape(-1)[known_rows])
    return equations, output_grad, bias_grad, ActivationRead(derivative, known)


def project_input(x, previous_activation, options):
    """x clipped to the values it can take when options.project (the image to image_range, ReLU outputs to
    >= 0, ...), and how far clipping moved it relative to its largest value."""
    if not options.project:
        return x, 0.0
    low, high = VALUE_RANGES.get(previous_activation, (None, None)) if previous_activation else options.image_range
    if low is None and high is None:
        return x, 0.0
    projected = x.clamp(low, high)
    # The verdict judges the unclipped solve; how far clipping moved it says whether the returned
    # input still solves the layer's equations.
    clipped = float((projected - x).abs().max() / x.abs().max().clamp_min(TINY)) if x.numel() else 0.0
    return projected, clipped


def bias_misfit(output_grad, bias_grad):
    """|sum dL/dO - dL/db| / |dL/db| over the filters: does the recovered output gradient fit the bias's?
    (output_grad may hold a batch's images in its first dimension: their sum must fit.)"""
    if bias_grad is None:
        return 0.0
    total = output_grad.sum((-2, -1))
    total = total.sum(0) if total.dim() == 2 else total
    return float(torch.linalg.norm(total - bias_grad) / torch.linalg.norm(bias_grad).clamp_min(TINY))


def noise_of(cond, x, dtype):
    """The Noise a solve of condition number `cond` leaves in its recovered (unclipped) input x, for the ReLU
    test of the layer below."""
    return Noise(gain=_SOLVE_NOISE_MARGIN * min(cond, 1.0 / eps(dtype)),
                 negative=max(0.0, -float(x.min())) if x.numel() else 0.0)


def _gradients_could_suffice(step, equations):
    """The counting bound: enough filters for the gradient constraints to determine every channel."""
    return step.conv.out_channels >= min_filters(equations.gradients.input_size, step.conv.kernel_size,
                                                 step.conv.stride, step.padding)


def _barely_weights_krylov(equations, options):
    """A large layer whose weight constraints are barely enough (systems.barely_weights) and too large to
    factorise: CG on them alone needs several times the steps of both kinds (a 128-px ReLU net's second layer: 510
    against 184), or never converges (a square 64-channel 3x3 layer: 2,561 steps in 600 s, against 181 with both)."""
    return barely_weights(equations) and choose_solver(equations, options.memory_limit).solver == "krylov"


def _system_method(method):
    """The system a reported method solves: "gradients+weights" is the hybrid stack."""
    return "hybrid" if method == "gradients+weights" else method


def _forced(step, options):
    """The method the caller forced on this layer (methods=, or first_layer= for the first), or None."""
    return options.methods.get(step.number, options.first_layer if step.number == 1 else None)


def _candidates(step, equations, options):
    """The methods to try on a layer, in order, until one determines its input.

    A forced method (methods= or, for the first layer, first_layer=) is tried alone, except
    that a large hybrid layer first tries its weight constraints alone, whose factorisation is
    cached per model (not where its hybrid solve factorises them anyway and only corrects them:
    hybrid_factorises_weights). Otherwise the gradient constraints go first (the paper's way), then, on
    large layers, the weight constraints when the counting allows, then both jointly; both go
    before the weight constraints alone where those are barely enough and solved by CG (_barely_weights_krylov).
    """
    forced = _forced(step, options)
    large = equations.unknowns > DENSE_MAX_UNKNOWNS
    weights_could = large and int(equations.known.sum()) >= equations.unknowns
    both_first = weights_could and _barely_weights_krylov(equations, options)
    if forced is not None:
        weights_first = forced == "hybrid" and weights_could and not both_first and \
            not hybrid_factorises_weights(equations, options.memory_limit)
        return ["weights", "hybrid"] if weights_first else [forced]
    order = ["gradients"] if not large or _gradients_could_suffice(step, equations) else []
    order += ["gradients+weights"] if both_first else []
    if weights_could:
        order.append("weights")
    if (bool(equations.known.any()) or not order) and not both_first:
        order.append("gradients+weights")
    return order


def _solve(step, equations, options, determined_above, read=None):
    """The layer's method and LayerSolve: the first candidate that determines its input, else the
    one that came closest (the highest rank).

    A large layer is only estimated (cheaply, see estimate_layer) when no candidate offers as many
    equations as it has unknowns, or when a layer above it was not determined: its data are wrong.
    read: (activation output, its derivative) at the layer's outputs, for "gradients" to be refined by the weight
    constraints (rconv.attack.refined) where the layer chose it itself; a forced "gradients" stays the gradient
    constraints alone.
    """
    candidates = _candidates(step, equations, options)
    read = read if _forced(step, options) is None else None
    if equations.unknowns > DENSE_MAX_UNKNOWNS:
        if not determined_above:
            return candidates[-1], estimate_layer(equations, _system_method(candidates[-1]), step.label,
                                                  "the layer above it was not determined")
        counted = [m for m in candidates if counted_equations(equations, _system_method(m)) >= equations.unknowns]
        if not counted:
            bound = counted_equations(equations, _system_method(candidates[-1]))
            return candidates[-1], estimate_layer(equations, _system_method(candidates[-1]), step.label,
                                                  f"it has {equations.unknowns:,} unknowns and at most {bound:,} "
                                                  f"equations")
        candidates = counted
    best = None
    for method in candidates:
        solved = solve_layer(equations, _system_method(method),
                             options.tolerances.dtype, memory_limit=options.memory_limit, label=step.label,
                             fallback=method == "gradients+weights" and best is not None,
                             read=read)
        # A Krylov solve that stopped short determines nothing, whatever rank its size gives: the next method may
        # (a square 64-channel layer's weights alone: CG did not converge in 3,000 steps; both kinds together did).
        if solved is not None and (best is None or _merit(solved) > _merit(best[1])):
            best = (method, solved)
        if best is not None and _merit(best[1]) == (True, equations.unknowns):
            break
    return best


def _merit(solved):
    """How a LayerSolve ranks among a layer's methods: first whether it may count as determining the layer (not a
    Krylov solve that stopped short), then its rank."""
    return not solved.stopped, solved.spectrum.rank


def covered_input(step, below, input_shape):
    """(C, H', W'): the part of a hidden conv layer's input that its kernel positions reach, where the rest is a
    bottom and right border (geometry.covered_size) that nothing in the network reads: neither this layer, nor the
    loss, so the layer below need not know it either, and the image may still be exact. None for the first layer
    (the image's own pixels are what is asked for), where every pixel is reached, or where this layer or the one
    below has a pool or a train-mode BatchNorm, whose solves take every pixel of their input and output."""
    if below is None or any(s.pool is not None or s.norm is not None for s in (step, below)):
        return None
    size = covered_size(input_shape[1:], step.conv.kernel_size, step.conv.stride, step.padding)
    return (input_shape[0], *size) if size is not None and size != tuple(input_shape[1:]) else None


def cropped(step, equations, shape, cache):
    """The equations on the covered part `shape` of the input (covered_input): the same rows, fewer columns."""
    conv = step.conv
    weights = weight_system(conv.weight.detach().to(equations.output), conv.bias, conv.stride, step.padding, shape,
                            cache)
    return equations._replace(gradients=equations.gradients.cropped(shape[1:]), weights=weights)


def padded(x, input_shape):
    """x (C, H', W', ...) of the covered part placed in the whole input (C, H, W, ...), zero where nothing reads."""
    whole = x.new_zeros(*input_shape, *x.shape[3:])
    whole[:, :x.shape[1], :x.shape[2]] = x
    return whole


def covered_mask(shape, input_shape):
    """(H, W) bool: True on the covered part `shape` (C, H', W') of the input (covered_input)."""
    return padded(torch.ones(shape[1:], dtype=torch.bool)[None], (1, *input_shape[1:]))[0]


def unread_note(step, shape, input_shape):
    """The note that a layer solved for its covered part `shape` alone left the rest of its input at zero."""
    unread = input_shape[0] * (input_shape[1] * input_shape[2] - shape[1] * shape[2])
    return (f"{step.label}: the {unread:,} values of its input that no kernel position reaches (its bottom and "
            f"right border) are left at zero: nothing in the network reads them")


def _padded_resolve(resolve, shape, input_shape):
    """A LayerSolve.resolve of the covered part `shape`, giving moves (C, H*W, r) of the whole input."""
    def whole(gradient_rhs, weight_rhs):
        moves = resolve(gradient_rhs, weight_rhs)
        return padded(moves.reshape(*shape, -1), input_shape).reshape(input_shape[0], -1, moves.shape[-1])

    return whole


def conv_step(step, signal, grads, input_shape, options, cache, previous_activation, frozen=None, pattern=None,
              covered=None):
    """Recover one conv layer's input from its equations; report it; pass the gradient below.

    frozen: the ActivationRead of an earlier run to read the activation by (the error bound's probe).
    pattern: where a pooled layer's pattern search starts (rconv.attack.pooling), None for its default.
    covered: covered_input's shape, to solve for that part of the input alone (None: all of it).
    """
    if step.norm is not None:
        return _train_norm_step(step, signal, grads, input_shape, options, previous_activation, frozen)
    if step.pool is not None:
        return _pooled_step(step, signal, grads, input_shape, options, previous_activation, frozen, pattern)
    start = time.perf_counter()
    channels, height, width = input_shape
    equations, output_grad, bias_grad, read = layer_equations(step, signal, grads, input_shape, options, cache,
                                                              frozen=frozen)
    shape = covered or input_shape
    # a cropped layer's outputs are not the whole layer's: it is not refined
    method, solved = _solve(step, cropped(step, equations, shape, cache) if covered else equations, options,
                            signal.determined, None if covered else (signal.activated, read.derivative))
    x, notes = solved.x.reshape(shape), solved.notes
    if covered:
        x, notes = padded(x, input_shape), notes + (unread_note(step, shape, input_shape),)
        solved = solved._replace(resolve=_padded_resolve(solved.resolve, shape, input_shape)) \
            if solved.resolve is not None else solved
    linearisation = Linearisation(equations, signal.activated, signal.activated_grad, read.derivative, x,
                                  solved.resolve, cheap=method == "gradients",
                                  output_scale=output_scale(equations, signal.activated, read.derivative)
                                  if method != "gradients" or solved.refined else None)
    noise = noise_of(solved.spectrum.cond, x, options.tolerances.dtype)
    x, clipped = project_input(x, previous_activation, options)
    bias_residual = bias_misfit(output_grad, bias_grad)
    gradient_rows = equations.gradients.shape[0] * channels
    report = LayerReport(
        layer=step.number, method=method,
        equations=(gradient_rows if method != "weights" else 0) + (int(equations.known.sum())
                                                                  if method != "gradients" else 0),
        unknowns=math.prod(shape), rank=solved.spectrum.rank, cond=solved.spectrum.cond,
        residual=solved.residual, bias_residual=bias_residual,
        known_outputs=float(equations.known.double().mean()), seconds=time.perf_counter() - start,
        clipped=clipped, estimated=solved.estimated, solver=solved.solver, stopped=solved.stopped)
    weight = step.conv.weight.detach().to(device=options.device, dtype=torch.float64)
    input_grad = torch.nn.grad.conv2d_input((1, channels, height, width), weight, output_grad[None],
                                            stride=step.conv.stride, padding=step.padding)[0]
    determined = signal.determined and report.full_rank
    reached = covered_mask(shape, input_shape).to(x.device) if covered else None
    return _ConvResult(x, report, Signal(x, input_grad, noise, determined, covered=reached), notes, read,
                       linearisation)


def _train_norm_step(step, signal, grads, input_shape, options, previous_activation, frozen):
    """conv_step for a conv layer followed by train-mode BatchNorm (rconv.attack.train_norm): no Linearisation,
    so the chain's error bound is the probe's."""
    start = time.perf_counter()
    solved = solve_train_norm(step, signal, grads, input_shape, options, frozen)
    x = solved.x
    noise = noise_of(solved.spectrum.cond, x, options.tolerances.dtype)
    x, clipped = project_input(x, previous_activation, options)
    report = LayerReport(
        layer=step.number, method=TRAIN_NORM_METHOD, equations=solved.equations, unknowns=solved.unknowns,
        rank=solved.spectrum.rank, cond=solved.spectrum.cond, residual=solved.residual, bias_residual=solved.checks,
        known_outputs=1.0, seconds=time.perf_counter() - start, clipped=clipped)
    weight = step.conv.weight.detach().to(device=options.device, dtype=torch.float64)
    input_grad = torch.nn.grad.conv2d_input((1, *input_shape), weight, solved.output_grad[None],
                                            stride=step.conv.stride, padding=step.padding)[0]
    determined = signal.determined and report.full_rank
    read = ActivationRead(solved.derivative, torch.ones_like(solved.derivative, dtype=torch.bool))
    return _ConvResult(x, report, Signal(x, input_grad, noise, determined, scale_from_eps=True), solved.notes, read,
                       None)


def _pooled_search(step, signal, grads, input_shape, options, frozen, start=None):
    """invert_pooled_layer on a step's data: a full search, or a quick one where the pattern is known already;
    None (the reason with it) where the activation and pool admit no linear pattern, the layer is too large, or
    the layer above was not determined."""
    kind = "max" if isinstance(step.pool, torch.nn.MaxPool2d) else "avg"
    if step.activation not in (MAX_ACTIVATIONS if kind == "max" else AVG_ACTIVATIONS):
        return None, (f"{step.activation} before an average pool gives no linear equations for any pattern of "
                      f"units, so its input is only estimated")
    if frozen is None and not signal.determined:
        # a search on the wrong data of an undetermined layer above costs up to half a minute and finds nothing: the
        # image below is estimated from the deepest determined layer instead (rconv.attack.estimate)
        return None, "the layer above it was not determined"
    unknowns = math.prod(input_shape)
    if unknowns > POOLED_MAX_UNKNOWNS:
        return None, (f"its {unknowns:,} unknowns are beyond the pattern search's dense solves "
                      f"({POOLED_MAX_UNKNOWNS:,}), so its input is only estimated")
    channels, height, width = input_shape
    filters, _, kh, kw = step.conv.weight.shape
    equations = max_equations(channels, (height, width), (kh, kw), step.conv.stride, step.padding, filters,
                              signal.activated.numel())
    if frozen is None and equations < unknowns:
        return None, (f"it has {unknowns:,} unknowns and at most {equations:,} equations under any pattern, so "
                      f"no search can determine it and its input is only estimated")
    quick = frozen is not None
    conv = step.conv
    search = invert_pooled_layer(
        conv, step.activation, step.pool, grads.of(conv.weight), grads.maybe(conv.bias), signal.activated,
        signal.activated_grad, input_shape, slope=step.slope, start=frozen.pattern if frozen else start,
        max_iterations=_POOLED_QUICK_SOLVES if quick else MAX_ITERATIONS, time_limit=POOLED_TIME_LIMIT,
        residual_tol=options.tolerances.residual)
    if not signal.determined:
        return search, "the layer above it was not determined"
    return search, search.reason


def _pooled_step(step, signal, grads, input_shape, options, previous_activation, frozen, pattern=None):
    """conv_step for a conv layer whose activation is pooled: its input and pattern searched for together
    (rconv.attack.pooling), from `pattern` if given; no Linearisation, so the chain's error bound is the
    probe's."""
    start = time.perf_counter()
    wide = dict(device=options.device, dtype=torch.float64)
    channels, height, width = input_shape
    search, reason = _pooled_search(step, signal, grads, input_shape, options, frozen, pattern)
    if search is None:  # no search: the layer's input is left at zero, an estimate the layers below start from
        out = conv_output_size((height, width), step.conv.kernel_size, step.conv.stride, step.padding)
        search = PooledInversion(x=torch.zeros(input_shape, **wide), pattern=None,
                                 output_grad=torch.zeros(step.conv.out_channels, *out, **wide), iterations=0,
                                 residual=math.inf, condition=math.inf, rank=0, exact=False, reason=reason, seconds=0.0)
    x, output_grad = search.x.to(**wide), search.output_grad.to(**wide)
    noise = noise_of(search.condition, x, options.tolerances.dtype)
    x, clipped = project_input(x, previous_activation, options)
    bias_grad = grads.maybe(step.conv.bias)
    unknowns = channels * height * width
    report = LayerReport(
        layer=step.number, method=POOLED_METHOD,
        equations=grads.of(step.conv.weight).numel() + signal.activated.numel(),
        unknowns=unknowns, rank=search.rank, cond=search.condition, residual=search.residual,
        bias_residual=bias_misfit(output_grad, bias_grad.to(**wide) if bias_grad is not None else None),
        known_outputs=float((output_grad != 0).double().mean()), seconds=time.perf_counter() - start,
        clipped=clipped, stopped=reason)
    weight = step.conv.weight.detach().to(**wide)
    input_grad = torch.nn.grad.conv2d_input((1, channels, height, width), weight, output_grad[None],
                                            stride=step.conv.stride, padding=step.padding)[0]
    read = ActivationRead(output_grad, output_grad != 0, search.pattern)
    determined = signal.determined and report.full_rank
    notes = (f"{step.label}: its pool's pattern search: {search.iterations} solves, {search.seconds:.1f} s"
             if search.iterations else f"{step.label}: its pool's pattern not searched: {reason}",)
    return _ConvResult(x, report, Signal(x, input_grad, noise, determined), notes, read, None)


def _layer_reasons(report, tolerances):
    """Why one layer's recovered input cannot be trusted, in words (none when it can)."""
    where = f"conv layer {report.layer} ({report.method})"
    reasons = []
    if report.estimated:  # its residuals say nothing more: see the notes for why it was only estimated
        return [f"{where}: not determined, only a minimum-norm estimate (rank at most {report.rank} of "
                f"{report.unknowns} unknowns)"]
    if report.stopped:
        reasons.append(f"{where}: not certified: {report.stopped}")
        if not math.isfinite(report.residual):  # nothing was solved: the checks below would only echo that
            return reasons
    elif not report.full_rank:
        reasons.append(f"{where}: rank {report.rank} of {report.unknowns} unknowns from {report.equations} "
                       f"equations, so part of its input is undetermined")
    if not report.residual <= tolerances.residual:
        reasons.append(f"{where}: relative residual {report.residual:.2g} above the tolerance "
                       f"{tolerances.residual:.2g} (condition number {report.cond:.2g})")
    if not report.bias_residual <= tolerances.residual:
        reasons.append(f"{where}: its recovered output gradient misses the bias gradient by {report.bias_residual:.2g} "
                       f"(tolerance {tolerances.residual:.2g}), so an activation branch was misread above it")
    if not report.clipped <= tolerances.residual:
        reasons.append(f"{where}: project=True clipped its recovered input by up to {report.clipped:.2g} of its "
                       f"largest value (tolerance {tolerances.residual:.2g}), so the clipped input no longer solves "
                       f"the layer's equations; for the image, is image_range right?")
    return reasons


def verdict(reports, tolerances):
    """Why the image is not exact, layer by layer, last layer first; exact when there is no reason."""
    return [reason for report in reversed(reports) for reason in _layer_reasons(report, tolerances)]


