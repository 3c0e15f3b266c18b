"""Features as vertices of a row space's nonnegative part: LP vertex search and zero-set refinement.

A mini-batch's Linear-layer gradient M = sum_n c_n [a_n, 1]^T spans the members' rows [a_n, 1].
Features behind a ReLU are >= 0 and vanish on some coordinates, so each is a vertex of
{x in the row space, x >= 0, 1^T x = 1}: an LP with a suitable objective lands on it, and its zero
set then pins it exactly (the one direction of the row space that vanishes there). Vertices that
are mixtures of members touch zero at one coordinate only they need ("face vertices"); the
leverage of that coordinate, reported by refine(), gives them away. Pure numpy and scipy.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
from scipy.optimize import linprog

# Guards divisions by norms that may be zero; far below anything real gradients produce.
_TINY = 1e-300
# Dual simplex ends on a vertex; an interior-point method would return the centre of a face.
_LP_METHOD = "highs-ds"
# A feature's zeros pin it only beyond the r - 1 a null vector needs; this many more make the
# fit overdetermined, so that the zeros' own noise can be measured.
_EXTRA_ZEROS = 3
# Rounds of growing and cleaning a zero set; it settles in a handful.
_REFINE_ROUNDS = 60
# Coordinates above this fraction of the largest entry are never taken for zeros.
_ZERO_CAP = 1e-2
# Median absolute deviation to standard deviation, for Gaussian noise.
_MAD_TO_SIGMA = 1.4826
# A zero whose residual (refitted without it) exceeds this many noise levels is a small positive
# entry, and a coordinate within it joins the zero set.
_OUTLIER_SIGMAS = 8.0
# Negative entries can only be noisy zeros (features are >= 0): admitted this much further out.
_NEGATIVE_ADMIT = 100.0
# Leave-one-out refits per round, for the zeros with the largest studentised residuals.
_LEAVE_ONE_OUT = 3
# Without an "essential" row the zero set's null space turns 2-dimensional: its two smallest
# singular values come within this factor (or the smaller one rises to this fraction of the largest).
_ESSENTIAL_SPLIT, _ESSENTIAL_FLOOR = 1e3, 1e-3
# Leverage of a zero row is kept just below 1, so that 1 - h never divides by zero.
_LEVERAGE_CAP = 1 - 1e-12
# Label seeds: 1 / (x / max x + floor) weighs a feature's near-zeros 1000 times its large entries.
_SEED_FLOOR = 1e-3
# Zero-set changes remembered by their size and first few coordinates, to stop a cycle.
_CYCLE_KEY = 8
# HiGHS is handed at least this many seconds, so that a deadline just passing still lets it start.
_LEAST_LP_SECONDS = 1e-3


class Refined(NamedTuple):
    """A vector of the row space pinned by its zero set, and how firmly."""

    vector: np.ndarray  # (N + 1,) in the row space, bias entry last, unit norm, positive on the active coordinates
    zeros: np.ndarray  # indices of its zero set
    resid: float  # smallest singular value of the basis restricted to the zeros, relative to the largest
    second: float  # the second smallest, relative: well above resid when the null space is one direction
    max_leverage: float  # of the zero rows in the fitted hyperplane: ~1 when one zero alone pins it
    negative: float  # most negative entry on the active coordinates, relative to the largest
    zero_noise: float  # largest |entry| on the zero set, relative to the largest entry


def _lp_options(deadline):
    """HiGHS's options: the seconds left until `deadline` (time.monotonic()), none without one."""
    if deadline is None or not np.isfinite(deadline):
        return {}
    return {"time_limit": max(_LEAST_LP_SECONDS, deadline - time.monotonic())}


def lp_vertex(basis, weights, slack, *, deadline=None):
    """The vertex of {x = basis q >= -slack / n, 1^T x = 1} minimising weights^T x, or None if infeasible
    (or, with a deadline, a time.monotonic() value, not solved by then)."""
    n = basis.shape[0]
    result = linprog(weights @ basis, A_ub=-basis, b_ub=np.full(n, slack / n), A_eq=basis.sum(0)[None],
                     b_eq=[1.0], bounds=[(None, None)] * basis.shape[1], method=_LP_METHOD,
                     options=_lp_options(deadline))
    return basis @ result.x if result.status == 0 else None


def lp_vertex_excluding(basis, weights, direction, slack, *, deadline=None):
    """A vertex normalised by direction^T q = 1 instead of the sum, or None (deadline as for lp_vertex).

    With `direction` orthogonal to the coefficients of the features found so far, they and every
    combination of them are infeasible, and minimising positive weights pushes their share down:
    the vertex is a feature not found yet.
    """
    n = basis.shape[0]
    result = linprog(weights @ basis, A_ub=-basis, b_ub=np.full(n, slack / n), A_eq=direction[None],
                     b_eq=[1.0], bounds=[(None, None)] * basis.shape[1], method=_LP_METHOD,
                     options=_lp_options(deadline))
    if result.status != 0:
        return None
    x = basis @ result.x
    return x / x.sum() if x.sum() > 0 else None


def seed_objectives(gradient, basis, rank, active):
    """LP weights that each point at one member, read off the labels in the gradient.

    With a near-uniform softmax (an untrained network) c_n ~ (1/K - e_{y_n}) / B: the rows of the
    gradient with the largest norms are the labels, and least squares with these approximate
    contributions splits it into approximate features, whose small entries mark their zero sets.
    Where the approximation fails these are just `rank` more LPs.
    """
    classes = gradient.shape[0]
    labels = np.argsort(-np.linalg.norm(gradient, axis=1))[:rank]
    contributions = np.full((classes, rank), 1.0 / classes)
    contributions[labels, np.arange(rank)] -= 1.0
    rough = np.linalg.lstsq(contributions, gradient, rcond=None)[0]
    rough = (rough @ basis) @ basis.T  # into the row space
    seeds = []
    for x in rough:
        x = x[active] * np.sign(x[active].sum())
        if x.max() > 0:
            seeds.append(1.0 / (np.maximum(x / x.max(), 0) + _SEED_FLOOR))
    return seeds


def _null_vector(basis, zeros, active):
    """The direction of the row space closest to vanishing on `zeros`, positive on the active coordinates."""
    vector = basis @ np.linalg.svd(basis[zeros], full_matrices=False)[2][-1]
    return vector if vector[active].sum() >= 0 else -vector


def _robust_noise(residuals):
    return _MAD_TO_SIGMA * np.median(residuals) + _TINY


def _worst_outlier(basis, zeros, active, norms):
    """The zero that, refitted without it, stands out most: (its index, its residual in noise levels).

    A small positive entry taken for a zero drags the least-squares fit towards itself, so its own
    residual looks ordinary; without it, it stands out. Candidates are the zeros with the largest
    studentised residuals (a high-leverage row hides its residual). Rows whose removal leaves a
    2-dimensional null space are essential and never dropped; rows that refit negative are noisy zeros.
    """
    rank = basis.shape[1]
    left, _, right = np.linalg.svd(basis[zeros], full_matrices=False)
    residual = np.abs(basis @ right[-1])[zeros] / norms[zeros]
    leverage = np.minimum((left[:, :rank - 1] ** 2).sum(1), _LEVERAGE_CAP)
    worst, worst_ratio = -1, 0.0
    for j in zeros[np.argsort(residual / (1 - leverage))[-_LEAVE_ONE_OUT:]]:
        rest = zeros[zeros != j]
        _, sigma, right = np.linalg.svd(basis[rest], full_matrices=False)
        if sigma[-2] < max(_ESSENTIAL_SPLIT * sigma[-1], _ESSENTIAL_FLOOR * sigma[0]):
            continue
        refit = basis @ right[-1]
        if refit[j] * np.sign(refit[active].sum()) <= 0:
            continue
        ratio = abs(refit[j]) / norms[j] / _robust_noise(np.abs(refit[rest]) / norms[rest])
        if ratio > worst_ratio:
            worst, worst_ratio = j, ratio
    return worst, worst_ratio


def _more_zeros(vector, active, in_zero, residual, noise):
    """Active coordinates outside the zero set whose entries are zeros at the measured noise level.

    This picks up float32 zeros noisier than the first threshold (ill-conditioned batches).
    """
    x = vector[active]
    small = (~in_zero[active]) & (x <= _ZERO_CAP * x.max())
    quiet = residual[active] <= _OUTLIER_SIGMAS * noise
    negative = (x < 0) & (residual[active] <= _NEGATIVE_ADMIT * _OUTLIER_SIGMAS * noise)
    return active[small & (quiet | negative)]


def _summary(basis, zeros, vector, active):
    rank = basis.shape[1]
    left, sigma, _ = np.linalg.svd(basis[zeros], full_matrices=False)
    x = vector[active]
    top = x.max()
    return Refined(vector=vector, zeros=zeros, resid=sigma[-1] / sigma[0],
                   second=sigma[-2] / sigma[0] if rank > 1 else 1.0,
                   max_leverage=float((left[:, :rank - 1] ** 2).sum(1).max()) if rank > 1 else 0.0,
                   negative=float(-min(x.min() / top, 0.0)), zero_noise=float(np.abs(vector[zeros]).max() / top))


def refine(basis, active, x, tau, *, deadline=None):
    """The vector of the row space that vanishes on x's zero set, or None when no zero set settles
    (or, with a deadline, a time.monotonic() value, none settled by then).

    The first zero set is {j active : x_j <= tau max x}. Then, round by round: the null vector v of
    the basis restricted to the zeros; the zeros' noise level s (robust, from residuals |v_j| in
    units of the row's norm); a zero that is really a small positive entry (leave-one-out test) is
    dropped, one at a time, since the fit changes after each; otherwise coordinates quiet at the
    level s join. The basis is the full r-dimensional one, so v is exact up to rounding.
    """
    if x is None or x.max() <= 0:
        return None
    least = basis.shape[1] - 1 + _EXTRA_ZEROS
    norms = np.maximum(np.linalg.norm(basis, axis=1), _TINY)
    in_zero = np.zeros(basis.shape[0], bool)
    in_zero[active[x <= tau * x.max()]] = True
    seen = set()
    for _ in range(_REFINE_ROUNDS):
        if deadline is not None and time.monotonic() > deadline:
            return None
        zeros = np.flatnonzero(in_zero)
        if len(zeros) < least:
            return None
        vector = _null_vector(basis, zeros, active)
        residual = np.abs(vector) / norms
        if len(zeros) > least and basis.shape[1] > 1:
            worst, ratio = _worst_outlier(basis, zeros, active, norms)
            if ratio > _OUTLIER_SIGMAS:
                in_zero[worst] = False
                continue
        joining = _more_zeros(vector, active, in_zero, residual, _robust_noise(residual[zeros]))
        key = (len(zeros), tuple(joining[:_CYCLE_KEY]))
        if len(joining) == 0 or key in seen:
            return _summary(basis, zeros, vector, active)
        seen.add(key)
        in_zero[joining] = True
    return None
