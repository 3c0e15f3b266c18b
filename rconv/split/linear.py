"""A mini-batch's Linear layer: batch size, features, contributions and labels from its mean gradients.

With c_n = delta_n / B (delta_n = softmax(W a_n + b) - e_{y_n}, dL/dlogits of image n) the mean
loss's gradients are M = [dL/dW, dL/db] = sum_n c_n [a_n, 1]^T: rank B at most, and K - 1 at most,
since every delta_n sums to zero. split_linear() splits M into its members:

* rank and noise from M's singular values, at the precision of the client's gradients;
* stage A, the softmax fixed point: features by least squares from contributions, contributions
  from the features' softmax, alternately (exact within a few rounds for an untrained network
  with distinct labels);
* stage B, when stage A's answer fails the checks: the members as vertices of the row space's
  nonnegative part (rconv/linear_search.py, rconv/vertices.py);
* final checks of the decomposition: the gradient reproduced, one negative entry per
  contribution, contributions that are the features' softmax residuals times m_n / B with whole
  multiplicities m_n (which also give B, absent members included), and error bars.

A batch of B >= K images cannot be split (its rank stays at K - 1); such gradients, like every
decomposition the checks cannot vouch for, end in status "fail" with reasons.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch
from scipy.special import softmax

from ..cases.client import as_dtype, dtype_name
from ..common.checks import as_whole
from ..common.errors import RConvError
from .search import SEARCH_TIME_LIMIT, TINY, RowSpace, SplitTolerances, search_members

# Precisions whose tolerances were measured; half precisions carry too few bits to split a batch.
_DTYPES = ("float64", "float32")
# Stage A: rounds of the fixed point, and the relative change at which it has converged.
_FIXED_POINT_ROUNDS, _FIXED_POINT_CONVERGED = 60, 1e-14
# Stage A gives up when a row's bias entry (the "1" of [a, 1]) vanishes against its other entries.
_BIAS_FLOOR = 1e-12
# Stage A's features may dip below zero by this many eps (or the noise multiple) of their largest entry.
_NEGATIVE_EPS = 1e3
# Multiple of the noise (or of the error bars) that tolerances allow: the error bars are within
# 0.06-2.1x of the actual error.
_NOISE_MULTIPLE = 30.0
# Zeros are declared below this fraction of the row space's angular noise (measured feature errors
# are ~0.2x of it), and never above this, the float32 target.
_ZERO_NOISE, _ZERO_CAP = 0.2, 1e-3
# A coordinate whose row-space norm is below this many eps of the largest is dead for the whole batch.
_DEAD_EPS = 1e3
# The gradient must be reproduced to this many eps.
_MISFIT_EPS = 1e3
# An entry of a contribution counts as negative below this fraction of its largest magnitude.
_NEGATIVE_SHARE = 1e-6
# A rank is clear when sigma_r exceeds sigma_{r+1} by this factor.
_RANK_GAP = 10.0
# A softmax whose top probability exceeds 1 - this is saturated: a confident, right prediction has
# delta ~ 0 and leaves no trace in the gradient.
_SATURATED = 1e-3
# A multiplicity above this is more than one image.
_SEVERAL = 1.5
# Errors of RMS size s in a K x n matrix give singular values up to about s (sqrt(K) + sqrt(n)); a
# singular value counts only beyond this many times that (an update's errors are bounds, not sizes).
_NOISE_RANK_MARGIN = 3.0


class LinearSplit(NamedTuple):
    """The members of a mini-batch as its Linear layer's gradients reveal them (float64 tensors).

    features (B', N): the Linear layer's input of each distinct member found (B' <= rank).
    contributions (B', K): its share of dL/dlogits of the mean loss, delta_n / B (a feature of
        multiplicity m carries its m identical images' sum).
    labels (B',) int64; multiplicities (B',) int64: identical images behind each feature.
    error_bars (B',): estimated relative error of each feature (an estimate, not a bound).
    status: "ok" (every check passed, error bars within the precision's target), "imprecise"
        (consistent, error bars above it), "partial" (B is right but some images are invisible,
        with ~zero gradient, or merged), "fail" (see reasons; the features are unverified).
    batch_size: B from the scales (absent images included), or the batch_size given when it is
        consistent with them; 0 when the scales give no whole number of images.
    rank: numerical rank of the gradient; reasons: why the status is not "ok"; notes: what else was seen.
    """

    features: torch.Tensor
    contributions: torch.Tensor
    labels: torch.Tensor
    multiplicities: torch.Tensor
    error_bars: torch.Tensor
    status: str
    batch_size: int
    rank: int
    reasons: list
    notes: list


class _Decomposition(NamedTuple):
    """A complete candidate split and what the final checks found."""

    rows: np.ndarray  # [a_n, 1] (B' x N+1)
    contributions: np.ndarray  # c_n (B' x K)
    labels: np.ndarray
    multiplicities: np.ndarray  # share_n * batch size, whole numbers when consistent
    batch_size: float  # 1 / min share, or the batch_size given
    inferred: float  # 1 / min share: B if some feature is one image
    whole: bool  # multiplicities and batch size are whole numbers, and add up
    whole_inferred: bool  # so they are with the inferred batch size
    error_bars: np.ndarray
    top_probability: np.ndarray  # max softmax of each feature
    reasons: list


class _Verdict(NamedTuple):
    """What a split is worth: LinearSplit's status, reasons, notes, batch size and multiplicities."""

    status: str
    reasons: list
    notes: list
    batch_size: int
    multiplicities: np.ndarray  # int64


class _Inputs(NamedTuple):
    gradient: np.ndarray  # M = [dL/dW, dL/db]
    weight: np.ndarray
    bias: np.ndarray
    tol: SplitTolerances
    batch_size: int | None
    noise: float = 0.0  # RMS size of errors in M's entries beyond the rounding of its dtype


def _as_float(name, value, shape):
    if not isinstance(value, torch.Tensor):
        raise RConvError(f"split_linear: {name} must be a torch tensor; got {type(value).__name__}")
    if not value.is_floating_point():
        raise RConvError(f"split_linear: {name} must be a floating-point tensor; got {value.dtype}")
    if tuple(value.shape) != shape:
        raise RConvError(f"split_linear: {name} has shape {tuple(value.shape)}; expected {shape}")
    array = value.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(array).all():
        raise RConvError(f"split_linear: {name} holds NaN or infinite entries")
    return array


def _check_number(name, value, *, positive):
    """A real number, not a bool or NaN, > 0 (positive) or >= 0, or an RConvError naming it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or (value <= 0 if positive else not 0 <= value < math.inf):
        what = "a number > 0 (math.inf: no limit)" if positive else "a finite number >= 0"
        raise RConvError(f"split_linear: {name} must be {what}; got {value!r}")
    return float(value)


def _check(weight_grad, bias_grad, weight, bias, dtype, batch_size, noise=0.0):
    """The inputs as float64 arrays, or a clear error naming the argument."""
    name = dtype_name(dtype)
    if name not in _DTYPES:
        raise RConvError(f"split_linear: dtype={name} is not supported; its tolerances were measured for float64 "
                         f"and float32 gradients, and half precisions keep too few bits to split a batch")
    if not isinstance(weight_grad, torch.Tensor) or weight_grad.dim() != 2:
        raise RConvError(f"split_linear: weight_grad must be a (K, N) tensor, the Linear layer's weight gradient; got "
                         f"{tuple(weight_grad.shape) if isinstance(weight_grad, torch.Tensor) else type(weight_grad).__name__}")
    classes, n = weight_grad.shape
    if classes < 2:
        raise RConvError(f"split_linear: the Linear layer has {classes} output; cross-entropy needs at least 2 classes")
    if batch_size is not None and (as_whole(batch_size) is None or batch_size < 1):
        raise RConvError(f"split_linear: batch_size must be None (infer it) or a whole number >= 1; got {batch_size!r}")
    gradient = np.hstack([_as_float("weight_grad", weight_grad, (classes, n)),
                          _as_float("bias_grad", bias_grad, (classes,))[:, None]])
    return _Inputs(gradient, _as_float("weight", weight, (classes, n)), _as_float("bias", bias, (classes,)),
                   SplitTolerances.for_dtype(name, torch.finfo(as_dtype(dtype)).eps),
                   None if batch_size is None else int(batch_size), _check_number("noise", noise, positive=False))


def _numerical_rank(sigma, inputs):
    """Singular values above the precision's threshold, relative to ||M||_F, and above what errors of
    the inputs' noise could make."""
    classes, columns = inputs.gradient.shape
    floor = _NOISE_RANK_MARGIN * inputs.noise * (math.sqrt(classes) + math.sqrt(columns))
    return int((sigma > max(inputs.tol.rank * float(np.linalg.norm(sigma)), floor)).sum())


def gradient_rank(weight_grad, bias_grad, weight, bias, *, dtype, noise=0.0) -> int:
    """The rank split_linear reads off a Linear layer's mean gradients: the distinct images it looks for.

    Arguments as for split_linear.
    """
    inputs = _check(weight_grad, bias_grad, weight, bias, dtype, None, noise)
    return _numerical_rank(np.linalg.svd(inputs.gradient, compute_uv=False), inputs)


def _row_space(inputs, left, sigma, right, rank=None):
    """M's numerical row space: rank by the precision's threshold (unless given), noise, active coordinates."""
    tol = inputs.tol
    rank = _numerical_rank(sigma, inputs) if rank is None else rank
    noise = float(sigma[rank]) if rank < len(sigma) else tol.eps * float(np.linalg.norm(sigma))
    noise_rel = noise / float(sigma[rank - 1])
    basis = right[:rank].T
    n = basis.shape[0] - 1
    norms = np.linalg.norm(basis[:n], axis=1)
    tau = min(_ZERO_CAP, max(tol.tau, _ZERO_NOISE * noise_rel))
    # a row of the basis far below the largest is 'zero' for every vector of the row space: a
    # coordinate dead for the whole batch, which would only add ill-conditioning
    active = np.flatnonzero(norms > max(_DEAD_EPS * tol.eps, tau) * norms.max())
    return RowSpace(inputs.gradient, left[:, :rank], sigma[:rank], basis, active, noise, noise_rel,
                    inputs.weight, inputs.bias)


def _softmax_fixed_point(space):
    """Stage A: every feature at once from the softmax, no zero structure needed; rows [a_n, 1] or None.

    Start from c_n ~ 1/K - e_{y_n} with y_n the rank largest rows of M (a near-uniform softmax); the
    scale 1/B cancels, since each row is renormalised by its bias entry. The map contracts when the
    softmax Jacobian is small against C's conditioning (untrained networks, distinct labels).
    """
    gradient, basis, rank = space.gradient, space.basis, space.rank
    classes, n = gradient.shape[0], gradient.shape[1] - 1
    labels = np.argsort(-np.linalg.norm(gradient, axis=1))[:rank]
    contributions = np.full((classes, rank), 1.0 / classes)
    contributions[labels, np.arange(rank)] -= 1.0
    previous = None
    # least squares is linear in its right-hand side: project the gradient onto the row space once, so that
    # each round solves for rank columns instead of every feature (100 classes x 4,000 features: 0.25 s a round)
    projected = gradient @ basis
    for _ in range(_FIXED_POINT_ROUNDS):
        rows = np.linalg.lstsq(contributions, projected, rcond=None)[0] @ basis.T
        if np.any(np.abs(rows[:, n]) <= _BIAS_FLOOR * np.abs(rows).max(axis=1)):
            return None
        rows = rows / rows[:, n:]
        if not np.isfinite(rows).all():
            return None
        if previous is not None and np.abs(rows - previous).max() / np.abs(rows).max() < _FIXED_POINT_CONVERGED:
            break
        previous = rows
        deltas = softmax(rows[:, :n] @ space.weight.T + space.bias, axis=1)
        deltas[np.arange(rank), labels] -= 1.0
        if not np.isfinite(deltas).all():
            return None
        contributions = deltas.T
    return rows


def _sign_consistent(rows, space, tol):
    """Features behind a ReLU are >= 0: stage A's may dip below only by rounding."""
    features = rows[:, :-1]
    floor = max(_NEGATIVE_EPS * tol.eps, _NOISE_MULTIPLE * space.noise_rel)
    return bool(np.all(features[:, space.active].min(axis=1) >= -floor * np.abs(features).max(axis=1)))


def _scale_check(shares, batch_size, ctol):
    """(multiplicities, batch size, whether they are whole numbers) from the shares m_n / B."""
    inferred = 1.0 / shares.min() if shares.min() > 0 else math.nan
    total = float(batch_size) if batch_size is not None else inferred
    multiplicities = shares * total
    whole = bool(np.isfinite(total) and np.all(np.abs(multiplicities - np.round(multiplicities)) <= ctol * multiplicities)
                 and abs(total - round(total)) <= ctol * total and np.all(np.round(multiplicities) >= 1)
                 and round(total) >= np.round(multiplicities).sum())
    return multiplicities, total, inferred, whole


def _decompose(space, rows, tol, batch_size=None, contributions=None):
    """Contributions by least squares (unless given) and every consistency check of a complete split."""
    gradient = space.gradient
    features = rows[:, :-1]
    if contributions is None:
        contributions = (gradient @ np.linalg.pinv(rows)).T
    count = len(rows)
    misfit = np.linalg.norm(gradient - contributions.T @ rows) / np.linalg.norm(gradient)
    labels = np.argmin(contributions, axis=1)
    negatives = (contributions < -_NEGATIVE_SHARE * np.abs(contributions).max(axis=1, keepdims=True)).sum(1)
    logits = features @ space.weight.T + space.bias
    probabilities = softmax(logits, axis=1)
    deltas = probabilities.copy()
    deltas[np.arange(count), labels] -= 1.0
    # c_n = (m_n / B) delta_n: the share m_n / B of each feature, and how far c_n is from that line
    shares = np.einsum("nk,nk->n", contributions, deltas) / np.maximum(np.einsum("nk,nk->n", deltas, deltas), TINY)
    off_line = np.linalg.norm(contributions - shares[:, None] * deltas, axis=1) / \
        np.maximum(np.linalg.norm(contributions, axis=1), TINY)
    # error bar: ||row n of pinv(C^T)|| sigma_{r+1} / max|a_n| (measured: 0.06-2.1x the actual error)
    error_bars = np.linalg.norm(np.linalg.pinv(contributions.T), axis=1) * space.noise / \
        np.maximum(np.abs(features).max(axis=1), TINY)
    # checks at the decomposition's own precision, at least the dtype's floor; the client's softmax
    # carries rounding ~ eps |logit| (large logits: saturated models)
    ctol = max(tol.check, _NOISE_MULTIPLE * error_bars.max(), _NOISE_MULTIPLE * tol.eps * float(np.abs(logits).max()))
    multiplicities, total, inferred, whole = _scale_check(shares, batch_size, ctol)
    whole_inferred = _scale_check(shares, None, ctol)[3]
    reasons = []
    if misfit > _MISFIT_EPS * tol.eps:
        reasons.append(f"the recovered members do not reproduce the gradient (relative misfit {misfit:.1e})")
    if np.any(negatives != 1):
        reasons.append(f"{int((negatives != 1).sum())} contribution(s) without exactly one negative entry: merged "
                       f"images with different labels, or mixtures of images")
    if np.any(off_line > ctol):
        reasons.append(f"{int((off_line > ctol).sum())} feature(s) disagree with the softmax: the contribution is not "
                       f"a multiple of softmax(W a + b) - e_y (off by {off_line.max():.1e}, tolerance {ctol:.1e})")
    if shares.min() <= 0:
        reasons.append("a contribution points against its own softmax residual (non-positive scale)")
    elif not whole and batch_size is None:
        off = np.abs(multiplicities - np.round(multiplicities)) / multiplicities
        reasons.append(f"the scales give no whole numbers of images: multiplicities "
                       f"{', '.join(f'{m:.3g}' for m in multiplicities)} for a batch of {total:.4g} (off by up to "
                       f"{np.nanmax(off):.1e} relative, tolerance {ctol:.1e})")
    elif not whole:
        said = f"{round(inferred)} image(s)" if whole_inferred else \
            f"no whole number of images (1 / min share = {inferred:.4g})"
        reasons.append(f"batch_size={batch_size} was given, but the gradients' scales say {said}")
    return _Decomposition(rows, contributions, labels, multiplicities, total, inferred, whole, whole_inferred, error_bars,
                          probabilities.max(axis=1), reasons)


def _consistent(space, rows, tol, batch_size):
    """Whether a complete split passes the checks, with the batch_size given or, failing that, the
    inferred one (a wrong batch_size must not hide a right split: the verdict reports it)."""
    if batch_size is not None and not _decompose(space, rows, tol, batch_size).reasons:
        return True
    return not _decompose(space, rows, tol).reasons


def _rank_reasons(found, rank, gap, batch_size):
    reasons = []
    if found < rank:
        reasons.append(f"only {found} of the {rank} members the gradient's rank shows were found")
    if gap < _RANK_GAP:
        reasons.append(f"no clear rank: sigma_r / sigma_r+1 = {gap:.1f}")
    if batch_size is not None and batch_size < rank:
        reasons.append(f"batch_size={batch_size} was given, but the gradient has rank {rank}: at least {rank} "
                       f"distinct images")
    return reasons


def _saturation_reason(classes, rank, batch_size, imprecise):
    """Why a rank of K - 1 leaves the batch size open, or "" when the split is precise and consistent."""
    if batch_size is not None and batch_size >= classes:
        return f"B >= K: {batch_size} images for {classes} classes cannot be told apart (rank {rank})"
    if imprecise:
        return (f"rank {rank} = K - 1 ({classes} classes) and error bars above the target: at this precision a "
                f"batch of {classes} or more images, which cannot be told apart, is not excluded")
    return f"rank {rank} = K - 1 ({classes} classes): the batch may hold {classes} or more images, which cannot be told apart"


def _batch_size(decomposition, batch_size):
    """The batch size to report: the one given when the scales agree, else what the scales say (0: nothing)."""
    if decomposition.whole:
        return int(round(decomposition.batch_size))
    inferred = decomposition.inferred
    return int(round(inferred)) if batch_size is not None and decomposition.whole_inferred else 0


def _verdict(decomposition, rank, gap, classes, tol, batch_size):
    """Status, reasons and notes of a complete split."""
    d = decomposition
    reasons = _rank_reasons(len(d.rows), rank, gap, batch_size) + d.reasons
    imprecise = bool(np.any(d.error_bars > tol.target))
    if rank == classes - 1 and (reasons or imprecise):
        # a split into K - 1 mixtures of images can pass checks that are only as sharp as the error bars
        reasons.append(_saturation_reason(classes, rank, batch_size, imprecise and not reasons))
    finite = np.isfinite(d.multiplicities)
    multiplicities = np.where(finite, np.round(np.nan_to_num(d.multiplicities)), 0).astype(np.int64)
    total = _batch_size(d, batch_size)
    # absent images are counted only in a verified split (in a failed one the scales are unverified too)
    invisible = int(round(d.batch_size)) - int(multiplicities.sum()) if d.whole and not reasons else 0
    saturated = bool(d.top_probability.max() > 1 - _SATURATED)
    merged = bool(np.any(multiplicities > _SEVERAL)) and not reasons
    notes = []
    if invisible > 0:
        notes.append(f"{invisible} image(s) with ~zero gradient (a saturated softmax: a right, confident prediction): "
                     f"the scales count them, but their features leave no trace")
    if merged:
        notes.append("feature(s) of multiplicity > 1: identical images" +
                     (", or images with the same prediction and label, merged by the saturated softmax" if saturated else ""))
    if reasons:
        status = "fail"
    elif invisible > 0 or (saturated and merged):
        status = "partial"
    elif imprecise:
        status = "imprecise"
    else:
        status = "ok"
    if batch_size is not None and d.whole and np.isfinite(d.inferred) and round(d.inferred) != batch_size:
        notes.append(f"the scales alone would say {round(d.inferred)} image(s); batch_size={batch_size} makes every "
                     f"multiplicity a whole number")
    return _Verdict(status, reasons, notes, total, multiplicities)


def _result(decomposition, verdict, rank, device, features=None):
    d, v = decomposition, verdict

    def tensor(array, dtype=torch.float64):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype).to(device)

    return LinearSplit(features=tensor(d.rows[:, :-1]) if features is None else features,
                       contributions=tensor(d.contributions), labels=tensor(d.labels, torch.int64),
                       multiplicities=tensor(v.multiplicities, torch.int64), error_bars=tensor(d.error_bars),
                       status=v.status, batch_size=v.batch_size, rank=rank, reasons=v.reasons, notes=v.notes)


def _failure(reasons, notes, rank, classes, n, device):
    empty = torch.zeros((0, n), dtype=torch.float64, device=device)
    return LinearSplit(features=empty, contributions=torch.zeros((0, classes), dtype=torch.float64, device=device),
                       labels=torch.zeros(0, dtype=torch.int64, device=device),
                       multiplicities=torch.zeros(0, dtype=torch.int64, device=device),
                       error_bars=torch.zeros(0, dtype=torch.float64, device=device), status="fail", batch_size=0,
                       rank=rank, reasons=reasons, notes=notes)


def _single_image(weight_grad, bias_grad, space, inputs, gap, device):
    """Rank one: the single-image formula a = dL/db^T dL/dW / |dL/db|^2, bit for bit as reconstruct() computes it."""
    bias_grad = bias_grad.detach().to(device=device, dtype=torch.float64)
    energy = float(bias_grad @ bias_grad)
    if energy == 0.0:
        return _failure(["the bias gradient is zero while the weight gradient is not: no batch of images gives "
                         "that under cross-entropy"], [], 1, len(inputs.bias), inputs.weight.shape[1], device)
    features = (bias_grad @ weight_grad.detach().to(device=device, dtype=torch.float64) / energy)[None]
    rows = np.hstack([features.cpu().numpy(), [[1.0]]])
    d = _decompose(space, rows, inputs.tol, inputs.batch_size, contributions=bias_grad.cpu().numpy()[None])
    verdict = _verdict(d, 1, gap, len(inputs.bias), inputs.tol, inputs.batch_size)
    verdict.notes.insert(0, "rank 1: one image (or identical images with one label), by the single-image formula")
    return _result(d, verdict, 1, device, features=features)


class _Found(NamedTuple):
    rows: np.ndarray | None  # [a_n, 1] of the members found
    how: str  # which stage found them, and at what cost
    stopped: str = ""  # why the search stopped early (its time limit, no nonnegative vector), or ""


def _refusal(space, classes, batch_size):
    """Why the gradient cannot be split at all, before searching ("" when it may be)."""
    if len(space.active) == 0:
        return "every feature is zero (a dead last block): nothing to recover"
    if batch_size is not None and batch_size >= classes and space.rank == classes - 1:
        return _saturation_reason(classes, space.rank, batch_size, False)
    return ""


def _members(space, tol, batch_size, time_limit):
    """Stage A when its answer passes the checks, else stage B."""
    rows = _softmax_fixed_point(space)
    if rows is not None and _consistent(space, rows, tol, batch_size) and _sign_consistent(rows, space, tol):
        return _Found(rows, "stage A (softmax fixed point)")
    outcome = search_members(space, tol, lambda candidate: _consistent(space, candidate, tol, batch_size),
                             time_limit=time_limit)
    how = f"stage B (LP vertex search): {outcome.lps} LPs"
    if outcome.rejected:
        how += "; turned down: " + ", ".join(f"{why} x{count}" for why, count in outcome.rejected.most_common(4))
    stopped = outcome.stopped.replace("its time limit", f"its time limit of {time_limit:g} s")
    return _Found(np.array(outcome.members) if outcome.members else None, how, stopped)


def split_linear(weight_grad, bias_grad, weight, bias, *, dtype, batch_size=None, noise=0.0,
                 time_limit=SEARCH_TIME_LIMIT) -> LinearSplit:
    """The members of a mini-batch from its Linear layer's mean gradients (see LinearSplit).

    Args:
        weight_grad, bias_grad: dL/dW (K, N) and dL/db (K,) of the mean cross-entropy loss, any float dtype.
        weight, bias: the Linear layer's weight (K, N) and bias (K,), as the server sent them.
        dtype: the precision the client computed its gradients in, torch.float64 or torch.float32 (or
            their names); it sets the tolerances. Half precisions are refused.
        batch_size: None to infer B from the scales, or the B the attacker knows; a B the gradients
            contradict is reported among the reasons, never adjusted.
        noise: the RMS size of errors the gradients' entries carry beyond the rounding of their dtype
            (gradients read off a weight update: its rounding, Update.rounding of gradients_from_update);
            singular values such errors could make do not count towards the rank.
        time_limit: seconds the vertex search (stage B) may take; when it stops there, the reasons
            say so. math.inf leaves only its budget of LPs.
    Computes in float64 on the CPU; the tensors come back on weight_grad's device.
    """
    inputs = _check(weight_grad, bias_grad, weight, bias, dtype, batch_size, noise)
    time_limit = _check_number("time_limit", time_limit, positive=True)
    device = weight_grad.device
    classes, n = inputs.weight.shape
    left, sigma, right = np.linalg.svd(inputs.gradient, full_matrices=False)
    if sigma[0] == 0:
        return _failure(["the gradient is zero: every image's prediction is saturated (or the loss is constant)"],
                        [], 0, classes, n, device)
    if _numerical_rank(sigma, inputs) == 0:
        return _failure([f"the gradient lies within the errors its entries may carry (noise={inputs.noise:.2g}): "
                         f"nothing to split"], [], 0, classes, n, device)
    space = _row_space(inputs, left, sigma, right)
    gap = space.sigma[-1] / max(space.noise, TINY)
    if space.rank == 1:
        return _single_image(weight_grad, bias_grad, space, inputs, gap, device)
    refusal = _refusal(space, classes, inputs.batch_size)
    if refusal:
        return _failure([refusal], [], space.rank, classes, n, device)
    found = _members(space, inputs.tol, inputs.batch_size, time_limit)
    if found.rows is None:
        reasons = ["no member's feature was found"] + ([found.stopped] if found.stopped else [])
        if space.rank == classes - 1:
            reasons.append(_saturation_reason(classes, space.rank, inputs.batch_size, False))
        return _failure(reasons, [found.how], space.rank, classes, n, device)
    d = _decompose(space, found.rows, inputs.tol, inputs.batch_size)
    verdict = _verdict(d, space.rank, gap, classes, inputs.tol, inputs.batch_size)
    verdict.notes.insert(0, found.how)
    if found.stopped:  # a reason where the split falls short; where the softmax completed it, a note
        (verdict.reasons if verdict.reasons else verdict.notes).append(found.stopped)
    return _result(d, verdict, space.rank, device)


def track_split(weight_grad, bias_grad, weight, bias, *, dtype, zeros) -> LinearSplit | None:
    """An earlier split's members followed into perturbed gradients (the error bound's probe).

    zeros: a bool mask (N,) per member of the earlier split, where its feature is zero (behind a
    ReLU). Member n becomes the vector of the new gradients' row space (of rank len(zeros)) that
    vanishes there, in the same order: the first-order move of a vertex, with no search (whose
    tolerances are those of the precision, not of the probe's added noise). None when a mask
    holds too few zeros to pin its member. Arguments otherwise as for split_linear.
    """
    inputs = _check(weight_grad, bias_grad, weight, bias, dtype, len(zeros))
    rank, device = len(zeros), weight_grad.device
    left, sigma, right = np.linalg.svd(inputs.gradient, full_matrices=False)
    if rank == 0 or rank > len(sigma) or sigma[0] == 0:
        return None
    space = _row_space(inputs, left, sigma, right, rank)
    rows = []
    for zero in zeros:
        pinned = space.basis[:-1][np.asarray(zero, dtype=bool)]
        if len(pinned) < rank:
            return None
        null = np.linalg.svd(pinned, full_matrices=True)[2][-1]
        row = space.basis @ null
        if abs(row[-1]) <= _BIAS_FLOOR * np.abs(row).max():
            return None
        rows.append(row / row[-1])
    d = _decompose(space, np.array(rows), inputs.tol, rank)
    gap = space.sigma[-1] / max(space.noise, TINY)
    return _result(d, _verdict(d, rank, gap, len(inputs.bias), inputs.tol, rank), rank, device)
