"""A conv layer's input recovered through its activation and a pooling layer that follow it.

The layer after the pool hands over P = pool(act(O)) and dL/dP, with O = conv(X) + b. Once a
*pattern* is fixed, everything the conv layer's gradients and P say about X is linear:

- AvgPool (window s x s, stride s): dL/dA = upsample(dL/dP) / s^2 is known; the pattern is the
  activation's derivative at every unit (ReLU on/off, LeakyReLU 1/slope). Then
  dL/dO = pattern * dL/dA, and s^2 P[f, v] = sum over the window of pattern * O.
- MaxPool: the pattern is each window's argmax. There act(O) = P, so O = act^-1(P) (for ReLU only
  where P > 0; a window with P == 0 is off and passes no gradient), and dL/dO = act'(O) dL/dP
  there, zero elsewhere. Any strictly increasing activation keeps the argmax, so Tanh and Sigmoid
  are as linear as LeakyReLU here.

`invert_pooled_layer` alternates: pattern -> least squares on the gradient constraints and the
pooled weight constraints -> O = conv(X) + b -> the pattern O implies (MaxPool: moved where the
argmaxes the gradients show at X agree), until the pattern is a fixed point. It claims `exact`
only when the equations of that pattern determine X (their condition number), leave a residual at
rounding level, agree with the bias gradient and with the pattern X itself implies; otherwise the
record says why not.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg  # noqa: F401  (sp.linalg.norm)
import torch
import torch.nn.functional as F
from torch import nn

from ..cases.models import activation_name
from ..common.errors import RConvError
from ..common.geometry import pair, pool_spec
from .constraints import grad_constraints, weight_entries

# AvgPool needs the activation's derivative as a function of the unknown pattern only: piecewise linear.
AVG_ACTIVATIONS = ("identity", "relu", "leaky_relu")
# MaxPool needs the activation strictly increasing where it passes gradient (ReLU: where P > 0).
MAX_ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid")
# A relative residual of the stacked, row-scaled equations below this is rounding in float64
# (about 1e4 unit roundoffs: the solve's condition number times eps, with room).
RESIDUAL_TOL = 1e-9
# Above this condition number of the stacked equations, float64 leaves fewer than ~6 digits of X:
# the pattern's equations do not determine it (rank deficient or nearly so).
DETERMINED_COND = 1e8
# Consecutive singular solves (Cholesky failed even unscaled) after which the search gives up.
SINGULAR_PATIENCE = 3
# A singular pattern's normal matrix is solved with this ridge, relative to its largest diagonal entry:
# a Cholesky factorisation then succeeds (float64 rounding leaves its smallest eigenvalues near
# n eps = 1e-12 of the largest), and damps only directions no equation determines to 1e-5 of the
# best one. An SVD's minimum-norm solve took 12 s per pattern at 4,096 unknowns, this 0.2 s.
_SINGULAR_RIDGE = 1e-10
# Default limits of the alternation: patterns tried and seconds spent.
MAX_ITERATIONS = 100
# Phase 1's weight on the gradient constraints against the pooled weight equations (see the loop):
# small enough that a few wrong units do not drive the solve, nonzero so that a pattern whose
# weight equations alone leave directions free still gets a unique least-squares X.
ROBUST_GRAD_SHARE = 0.01
# A MaxPool window whose gradient is below this share of its filter's largest has its argmax read from the outputs:
# the gradients' fit barely sees it (LeakyReLU's negative side: 0.01 of the rest).
_STRONG_WINDOW = 0.1
TIME_LIMIT = 120.0


class PooledInversion(NamedTuple):
    """What `invert_pooled_layer` recovered, and what it is worth."""

    x: torch.Tensor  # (C, H, W): the conv layer's input (the last solve's, even when not exact)
    pattern: torch.Tensor  # avg: act'(O) per unit (F, Ho, Wo); max: argmax in window (F, Hp, Wp), -1 where off
    output_grad: torch.Tensor  # (F, Ho, Wo): dL/dO that pattern gives
    iterations: int  # patterns solved for
    residual: float  # relative residual of the stacked gradient and pooled weight equations
    condition: float  # condition number of those equations (inf: they leave directions free)
    rank: int  # their numerical rank: singular values above the largest / DETERMINED_COND (0: not measured, the
    #            search stopped before a fixed point)
    exact: bool  # the certificate holds: fixed point, determined, residual at rounding level
    reason: str  # why not exact ("" when exact)
    seconds: float


class _Layer(NamedTuple):
    """The conv layer, activation and pool as the solves need them."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple
    padding: tuple
    activation: str
    slope: float
    kind: str
    size: int
    input_size: tuple  # (C, H, W)
    out_size: tuple  # (Ho, Wo) of the conv
    pooled_size: tuple  # (Hp, Wp)


def _layer(conv, activation, pooled):
    if not isinstance(conv, nn.Conv2d):
        raise RConvError(f"conv must be an nn.Conv2d; got {type(conv).__name__}")
    if conv.groups != 1 or pair(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise RConvError("only plain convolutions (groups 1, dilation 1, numeric zero padding) are inverted")
    activation = activation_name(activation)
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if pooled.dim() != 3 or pooled.shape[0] != weight.shape[0]:
        raise RConvError(f"pooled output must be (F, Hp, Wp) with F = {weight.shape[0]}; got {tuple(pooled.shape)}")
    return activation, weight, bias, pair(conv.stride), pair(conv.padding), tuple(weight.shape[2:])


def _inverse(layer, pooled):
    """O where act(O) = P (MaxPool's argmax units), and act'(O) there."""
    if layer.activation == "identity":
        return pooled.clone(), torch.ones_like(pooled)
    if layer.activation == "relu":
        return pooled.clone(), (pooled > 0).to(pooled.dtype)
    if layer.activation == "leaky_relu":
        return torch.where(pooled >= 0, pooled, pooled / layer.slope), torch.where(
            pooled > 0, torch.ones_like(pooled), torch.full_like(pooled, layer.slope))
    if layer.activation == "tanh":
        inner = torch.atanh(pooled)
        return inner, 1 - pooled * pooled
    inner = torch.log(pooled) - torch.log1p(-pooled)
    return inner, pooled * (1 - pooled)


def _off_derivative(layer):
    """act'(O) for O < 0 of a piecewise-linear activation."""
    return {"relu": 0.0, "leaky_relu": layer.slope}.get(layer.activation, 1.0)


def _window_units(layer):
    """(F, Hp, Wp, s*s) flat unit indices into (F, Ho, Wo) of every window, offsets row-major."""
    filters = layer.weight.shape[0]
    (ho, wo), (hp, wp), s = layer.out_size, layer.pooled_size, layer.size
    a, b = torch.arange(hp)[:, None, None, None], torch.arange(wp)[None, :, None, None]
    di = torch.arange(s)[None, None, :, None]
    dj = torch.arange(s)[None, None, None, :]
    within = ((s * a + di) * wo + (s * b + dj)).reshape(hp, wp, s * s)
    return torch.arange(filters)[:, None, None, None] * (ho * wo) + within[None]


def _upsample(layer, pooled_like):
    """A (F, Hp, Wp) tensor repeated over each window, zero on the rows/columns the pool drops."""
    s, (ho, wo) = layer.size, layer.out_size
    up = pooled_like.repeat_interleave(s, 1).repeat_interleave(s, 2)
    return F.pad(up, (0, wo - up.shape[2], 0, ho - up.shape[1]))


class _Equations(NamedTuple):
    """One pattern's linear equations on X: dO for the gradient constraints, and the weight rows."""

    output_grad: torch.Tensor  # (F, Ho, Wo)
    coefficients: sp.csr_matrix  # (windows kept, F*Ho*Wo): each row sums units' O
    targets: np.ndarray  # what each row's sum of (M x + b) equals


def _equations(layer, pattern, pooled, pooled_grad):
    """The linear equations a pattern gives (see the module's docstring)."""
    units = _window_units(layer)
    count = int(np.prod(units.shape[:3]))
    n_units = layer.weight.shape[0] * layer.out_size[0] * layer.out_size[1]
    if layer.kind == "avg":
        window_grad = _upsample(layer, pooled_grad) / layer.size ** 2
        output_grad = pattern * window_grad
        coeff = pattern.flatten()[units].reshape(count, -1)
        rows = np.repeat(np.arange(count), units.shape[-1])
        matrix = sp.csr_matrix((coeff.flatten().numpy(), (rows, units.reshape(count, -1).flatten().numpy())),
                               shape=(count, n_units))
        targets = (layer.size ** 2 * pooled).flatten().numpy()
    else:
        inner, derivative = _inverse(layer, pooled)
        on = pattern >= 0
        chosen = torch.gather(units, 3, pattern.clamp(min=0)[..., None])[..., 0]
        output_grad = torch.zeros(n_units, dtype=pooled.dtype)
        output_grad[chosen[on]] = (derivative * pooled_grad)[on]
        output_grad = output_grad.reshape(-1, *layer.out_size)
        kept = chosen[on].numpy()
        matrix = sp.csr_matrix((np.ones(len(kept)), (np.arange(len(kept)), kept)), shape=(len(kept), n_units))
        targets = inner[on].numpy()
    keep = np.flatnonzero(matrix.getnnz(axis=1))
    return _Equations(output_grad, matrix[keep], targets[keep])


def _spread_equations(layer, pooled, pooled_grad):
    """MaxPool's start: every unit of a window stands in for its argmax with weight 1/s^2 (the
    AvgPool of the same values), a guess whose solve lands near X when the maps are smooth."""
    units = _window_units(layer)
    inner, derivative = _inverse(layer, pooled)
    on = (derivative > 0).flatten()
    if layer.activation == "relu":
        on &= (pooled > 0).flatten()
    share = 1.0 / layer.size ** 2
    output_grad = _upsample(layer, derivative * pooled_grad * share)
    count, per = int(on.numel()), units.shape[-1]
    rows = np.repeat(np.arange(count), per)
    n_units = layer.weight.shape[0] * layer.out_size[0] * layer.out_size[1]
    matrix = sp.csr_matrix((np.full(count * per, share), (rows, units.reshape(count, -1).flatten().numpy())),
                           shape=(count, n_units))
    keep = np.flatnonzero(on.numpy())
    return _Equations(output_grad, matrix[keep], inner.flatten().numpy()[keep])


def _weight_matrix(layer):
    """M of O = M x + b, as a SciPy CSR matrix."""
    _, h, w = layer.input_size
    entries = weight_entries(layer.weight, (h, w), layer.stride, layer.padding)
    return sp.csr_matrix((entries.values.numpy(), (entries.rows.numpy(), entries.cols.numpy())), shape=entries.shape)


def _rms_row(matrix_norm, rows):
    """Root-mean-square row norm: each kind of equation is scaled so that its rows weigh alike."""
    return max(matrix_norm / max(rows, 1) ** 0.5, 1e-300)


class _Solved(NamedTuple):
    x: torch.Tensor
    normal: np.ndarray  # the scaled normal matrix, kept to measure the condition number
    singular: bool  # Cholesky failed: these equations leave directions of X free


def _solve(layer, equations, weight_matrix, weight_grad, grad_share=1.0):
    """Least squares of one pattern's gradient and pooled weight constraints (normal equations,
    Cholesky, one step of iterative refinement against the unsquared equations)."""
    channels, h, w = layer.input_size
    grad = grad_constraints(equations.output_grad, (h, w), layer.weight.shape[2:], layer.stride,
                            layer.padding).numpy()
    rows = sp.csr_matrix(equations.coefficients @ weight_matrix)
    unit_bias = np.repeat(layer.bias.numpy(), layer.out_size[0] * layer.out_size[1])
    rhs = equations.targets - equations.coefficients @ unit_bias
    grad_scale = grad_share / _rms_row(np.linalg.norm(grad), grad.shape[0])
    weight_scale = 1.0 / _rms_row(sp.linalg.norm(rows), rows.shape[0]) if rows.shape[0] else 0.0
    grad, rows, rhs = grad * grad_scale, rows * weight_scale, rhs * weight_scale
    # (C, F*kh*kw): channel c's gradient constraints, rows ordered (f, i, j) like grad's
    targets = weight_grad.numpy().transpose(1, 0, 2, 3).reshape(channels, -1) * grad_scale
    gram = grad.T @ grad
    normal = np.kron(np.eye(channels), gram) + (rows.T @ rows).toarray()

    def apply_transpose(grad_part, weight_part):
        return (grad_part @ grad).flatten() + rows.T @ weight_part

    def residual(x):
        return targets - x.reshape(channels, -1) @ grad.T, rhs - rows @ x

    right = apply_transpose(targets, rhs)
    singular = False
    try:
        factor = scipy.linalg.cho_factor(normal, lower=True, check_finite=False)
    except np.linalg.LinAlgError:  # singular: the pattern's equations leave directions free
        singular = True
        ridge = _SINGULAR_RIDGE * float(np.diag(normal).max())
        factor = scipy.linalg.cho_factor(normal + ridge * np.eye(len(normal)), lower=True, check_finite=False)
    x = scipy.linalg.cho_solve(factor, right, check_finite=False)
    if not singular:
        x = x + scipy.linalg.cho_solve(factor, apply_transpose(*residual(x)), check_finite=False)
    return _Solved(torch.from_numpy(x).reshape(channels, h, w), normal, singular)


def _forward(layer, x):
    """O = conv(x) + b for an input (C, H, W)."""
    return F.conv2d(x[None], layer.weight, layer.bias, layer.stride, layer.padding)[0]


def activate(layer, inner):
    """act(inner) for anything with the activation's name and slope (a pooled layer, a ConvStep)."""
    if layer.activation == "identity":
        return inner
    if layer.activation == "relu":
        return torch.relu(inner)
    if layer.activation == "leaky_relu":
        return F.leaky_relu(inner, layer.slope)
    return torch.tanh(inner) if layer.activation == "tanh" else torch.sigmoid(inner)


def _pool(layer, activated):
    pool = F.avg_pool2d if layer.kind == "avg" else F.max_pool2d
    return pool(activated[None], layer.size, layer.size)[0]


def _pattern_of(layer, x, pooled):
    """The pattern X implies: act'(O) per unit (AvgPool), or each window's argmax (MaxPool)."""
    inner = _forward(layer, x)
    if layer.kind == "avg":
        low = _off_derivative(layer)
        derivative = torch.where(inner > 0, torch.ones_like(inner), torch.full_like(inner, low))
        # units the pool drops pass no gradient and enter no equation: a fixed value keeps them out
        # of the fixed-point test
        return torch.where(_upsample(layer, torch.ones_like(pooled)) > 0, derivative, torch.ones_like(inner))
    units = _window_units(layer)
    argmax = inner.flatten()[units].argmax(-1)
    if layer.activation == "relu":
        argmax = torch.where(pooled > 0, argmax, torch.full_like(argmax, -1))
    return argmax


def _gradient_pattern(layer, x, weight_grad, pooled, pooled_grad, fallback):
    """MaxPool's next pattern read from the conv's gradients at x rather than from its outputs: filter f's gradient
    is the sum over its windows of dL/dO at the argmax times that unit's input patch, so with x fixed, the share of
    each window's gradient at each of its units is a least-squares fit (each window's shares summing to one), and
    the largest share marks the argmax. One wrong patch barely moves the fit, where the outputs' argmax flips with
    every small error of x (a 64-filter 3x3 layer on 8 px: the true pattern in 5 solves; from the outputs, 96 % of
    it after 15). A filter whose fit has fewer equations than shares, and a weak window (_STRONG_WINDOW), keep
    `fallback`'s units, the outputs'."""
    units = _window_units(layer)
    _, derivative = _inverse(layer, pooled)
    window_grad = derivative * pooled_grad
    on = (fallback >= 0) & (window_grad != 0)
    patches = F.unfold(x[None], layer.weight.shape[2:], padding=layer.padding, stride=layer.stride)[0]
    per_window = units.shape[-1]
    out_units = layer.out_size[0] * layer.out_size[1]
    pattern = fallback.clone()
    for f in range(layer.weight.shape[0]):
        windows = on[f].flatten().nonzero()[:, 0]
        shares = len(windows) * per_window
        if shares == 0 or shares > patches.shape[0]:
            continue
        candidates = units[f].reshape(-1, per_window)[windows].flatten() - f * out_units
        grads = window_grad[f].flatten()[windows]
        columns = patches[:, candidates] * grads.repeat_interleave(per_window)
        # each window's shares sum to one: rows weighted like an average column, so that neither kind dominates
        weight = float(torch.linalg.norm(columns)) / shares ** 0.5
        summing = torch.kron(torch.eye(len(windows), dtype=x.dtype),
                             torch.full((1, per_window), weight, dtype=x.dtype))
        system = torch.cat([columns, summing])
        target = torch.cat([weight_grad[f].flatten(), torch.full((len(windows),), weight, dtype=x.dtype)])
        fitted = torch.linalg.lstsq(system, target[:, None], driver="gelsd").solution.reshape(-1, per_window)
        # a window whose gradient is small next to its filter's (LeakyReLU's negative side) barely moves the fit
        strong = grads.abs() >= _STRONG_WINDOW * float(window_grad[f].abs().max())
        pattern[f].view(-1)[windows[strong]] = fitted.argmax(1)[strong]
    return pattern


def _next_max_pattern(layer, x, pattern, implied, seen, weight_grad, pooled, pooled_grad):
    """MaxPool's next pattern after solving `pattern` for x: the windows where the gradients' read and the one x's
    outputs imply (`implied`) agree move to it, the rest stay; where that repeats a pattern `seen`, the gradients'
    read whole, then the outputs'. Taking either read whole swings tens of windows back and forth (a VGG block's
    64-filter layer: 92-95 % of the true pattern for 40 solves), the agreed moves settle (all of it in 24)."""
    read = _gradient_pattern(layer, x, weight_grad, pooled, pooled_grad, implied)
    for candidate in (torch.where(read == implied, read, pattern), read):
        if candidate.numpy().tobytes() not in seen:
            return candidate
    return implied


def _replay(layer, x, weight_grad, bias_grad, pooled, pooled_grad):
    """The largest relative misfit of P, dL/dW and dL/db that x reproduces through the layer:
    whatever the pattern, x explains every observation when this is at rounding level."""
    weight = layer.weight.clone().requires_grad_(True)
    bias = layer.bias.clone().requires_grad_(True)
    inner = F.conv2d(x[None], weight, bias, layer.stride, layer.padding)[0]
    replayed = _pool(layer, activate(layer, inner))
    replayed_weight, replayed_bias = torch.autograd.grad(replayed, (weight, bias), pooled_grad)

    def relative(a, b):
        return float((a - b).norm() / max(float(b.norm()), 1e-300))
    misfits = [relative(replayed.detach(), pooled), relative(replayed_weight, weight_grad)]
    if bias_grad is not None:
        misfits.append(relative(replayed_bias, bias_grad))
    return max(misfits)


def _condition(normal):
    """Condition number and numerical rank of the stacked equations, from their normal matrix's eigenvalues."""
    eigenvalues = scipy.linalg.eigvalsh(normal, check_finite=False)
    rank = int((eigenvalues > eigenvalues[-1] / DETERMINED_COND ** 2).sum())
    if eigenvalues[0] <= 0:
        return float("inf"), rank
    return float(np.sqrt(eigenvalues[-1] / eigenvalues[0])), rank


def pattern_of(conv, activation, pool, x, *, slope=0.01):
    """The pattern an input x (C, H, W) implies for conv -> activation -> pool, as invert_pooled_layer's
    `start` takes it (a guess of the true input gives a guess of its pattern)."""
    x = x.detach().to("cpu", torch.float64)
    name, weight, bias, stride, padding, kernel = _layer(conv, activation, torch.zeros(conv.out_channels, 1, 1))
    as64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    out_size = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[1:], kernel, stride, padding))
    kind, size = pool_spec(pool, out_size)
    layer = _Layer(as64(weight), as64(bias), stride, padding, name, float(slope), kind, size, tuple(x.shape),
                   out_size, (out_size[0] // size, out_size[1] // size))
    return _pattern_of(layer, x, _pool(layer, activate(layer, _forward(layer, x))))


def invert_pooled_layer(conv, activation, pool, weight_grad, bias_grad, pooled, pooled_grad, input_size, *,
                        slope=0.01, max_iterations=MAX_ITERATIONS, time_limit=TIME_LIMIT, start=None,
                        residual_tol=RESIDUAL_TOL):
    """Recover the input X of conv -> activation -> pool from the conv's gradients, P and dL/dP.

    Args:
        conv: the nn.Conv2d (its weight and bias are the ones the gradients were taken at).
        activation: "relu", "leaky_relu" (with `slope`), or for MaxPool also "tanh", "sigmoid".
        pool: ("avg" | "max", s), or nn.AvgPool2d / nn.MaxPool2d (window = stride = s) or
            nn.AdaptiveAvgPool2d whose output divides the conv's.
        weight_grad, bias_grad: dL/dW (F, C, kh, kw) and dL/db (F,), None for a conv without bias.
        pooled, pooled_grad: P and dL/dP, (F, Hp, Wp).
        input_size: (C, H, W) of X (the pool's and stride's floors leave it ambiguous otherwise).
        start: a pattern to begin from instead of the default (sign of P, or MaxPool's spread solve).
        residual_tol: the relative misfit of P and the gradients that X must replay to be exact (the
            default is float64's; gradients computed in float32 need float32's).
    Returns a PooledInversion; `exact` only under the certificate in the module's docstring.
    Everything is computed in float64 on the CPU.
    """
    began = time.perf_counter()
    name, weight, bias, stride, padding, kernel = _layer(conv, activation, pooled)
    channels, h, w = (int(v) for v in input_size)
    if weight.shape[1] != channels:
        raise RConvError(f"input_size has {channels} channels but the conv takes {weight.shape[1]}")
    out_size = tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip((h, w), kernel, stride, padding))
    kind, size = pool_spec(pool, out_size)
    if name not in (AVG_ACTIVATIONS if kind == "avg" else MAX_ACTIVATIONS):
        raise RConvError(f"{kind} pooling after {name} is not inverted here: choose one of "
                         f"{', '.join(AVG_ACTIVATIONS if kind == 'avg' else MAX_ACTIVATIONS)}")
    pooled_size = (out_size[0] // size, out_size[1] // size)
    if tuple(pooled.shape[1:]) != pooled_size or tuple(pooled_grad.shape) != tuple(pooled.shape):
        raise RConvError(f"a {channels}x{h}x{w} input pooled by {size} gives {pooled_size}; P is "
                         f"{tuple(pooled.shape)}, dL/dP {tuple(pooled_grad.shape)}")
    bias_shape = tuple(bias_grad.shape) if bias_grad is not None else (weight.shape[0],)
    if tuple(weight_grad.shape) != tuple(weight.shape) or bias_shape != (weight.shape[0],):
        raise RConvError("weight_grad and bias_grad must have the conv's weight and bias shapes")
    as64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    layer = _Layer(as64(weight), as64(bias), stride, padding, name, float(slope), kind, size,
                   (channels, h, w), out_size, pooled_size)
    weight_grad, pooled, pooled_grad = (as64(t) for t in (weight_grad, pooled, pooled_grad))
    bias_grad = as64(bias_grad) if bias_grad is not None else None
    if name == "relu":
        # A ReLU window that is off pools an exact zero, which a P solved by the layer above carries as rounding of
        # either sign (+-2e-17 in a VGG block): read as on, its unit would pass a gradient the client's did not.
        off = pooled.abs() <= residual_tol * float(pooled.abs().max())
        pooled = torch.where(off, torch.zeros_like(pooled), pooled)
    matrix = _weight_matrix(layer)

    if start is not None:
        pattern = start
    elif kind == "avg":
        low = _off_derivative(layer)
        pattern = _upsample(layer, torch.where(pooled > 0, torch.ones_like(pooled), torch.full_like(pooled, low)))
        pattern = torch.where(_upsample(layer, torch.ones_like(pooled)) > 0, pattern, torch.ones_like(pattern))
    else:
        spread = _solve(layer, _spread_equations(layer, pooled, pooled_grad), matrix, weight_grad)
        pattern = _pattern_of(layer, spread.x, pooled)
    iterations, reason, singular_run = 0, "", 0
    # AvgPool: phase 1 leans on the pooled weight equations, as a wrong unit near zero barely moves them, while one
    # wrong unit's dL/dO spreads over all of its filter's gradient rows and, measured, moves X by ~0.2 (one flip,
    # 3x16x16, 32 filters k5); phase 2 adds the gradient constraints in full. MaxPool reads its patterns from the
    # gradients (_gradient_pattern), which the weight-led phase starves: a VGG block's 64-filter layer stayed at
    # 70 % of the true pattern through 12 solves with it, and found all of it in 7 without.
    for share in (ROBUST_GRAD_SHARE, 1.0) if kind == "avg" else (1.0,):
        seen = set()
        while True:
            iterations += 1
            equations = _equations(layer, pattern, pooled, pooled_grad)
            solved = _solve(layer, equations, matrix, weight_grad, share)
            if solved.singular and share < 1.0:  # phase 1's scaling squares away digits: retry in full
                solved = _solve(layer, equations, matrix, weight_grad, 1.0)
            # A wrong pattern's equations can be numerically singular while the true one's are not
            # (measured: sign-of-P starts); only a run of singular solves ends the search.
            singular_run = singular_run + 1 if solved.singular else 0
            if singular_run >= SINGULAR_PATIENCE:
                reason = (f"the equations of {singular_run} patterns in a row, up to solve {iterations}, do not "
                          f"determine X (singular): too few filters, too many units off, or a wrong start")
                break
            following = _pattern_of(layer, solved.x, pooled)
            if torch.equal(following, pattern):
                break
            seen.add(pattern.numpy().tobytes())
            if kind == "max":
                following = _next_max_pattern(layer, solved.x, pattern, following, seen, weight_grad, pooled,
                                              pooled_grad)
            if following.numpy().tobytes() in seen:
                reason = f"the patterns cycle after {iterations} solves"
                break
            if iterations >= max_iterations or time.perf_counter() - began > time_limit:
                reason = f"no fixed point within {iterations} solves ({time.perf_counter() - began:.1f} s)"
                break
            pattern = following
        if reason:
            break
    residual = _replay(layer, solved.x, weight_grad, bias_grad, pooled, pooled_grad)
    # a search that stopped short certifies nothing: its equations' spectrum (seconds at 4,096 unknowns) is not taken
    condition, rank = _condition(solved.normal) if not reason else (float("inf"), 0)
    if not reason and condition > DETERMINED_COND:
        reason = (f"the pattern's equations do not determine X (condition number {condition:.2e} > "
                  f"{DETERMINED_COND:.0e}): too few filters or too many units off")
    elif not reason and residual > residual_tol:
        reason = (f"a fixed point whose X does not reproduce P and the gradients (relative misfit "
                  f"{residual:.2e} > {residual_tol:.0e})")
    return PooledInversion(solved.x, pattern, equations.output_grad, iterations, residual, condition, rank,
                           not reason, reason, time.perf_counter() - began)
