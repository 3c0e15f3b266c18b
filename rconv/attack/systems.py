"""Solving one conv layer's equations for its input, by the method asked for.

"gradients": A x[c] = dL/dW[:, c] channel by channel (split by stride residue class when large);
"weights": M x = O - b at the known outputs; "hybrid": both, each scaled to unit norm. Layers
up to DENSE_MAX_UNKNOWNS unknowns use dense factorisations (the paper's 32-px networks); larger
ones the sparse normal equations, factorised once per model where they depend only on the weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..common.errors import RConvError
from ..common.geometry import pair
from ..linalg.krylov import LowPrecision, gram_solver, lanczos_extremes, normal_cg
from ..linalg.memory import check, ran_out, size
from ..linalg.sparse import FillTooLarge
from ..linalg.solvers import (
    TINY,
    NormalFactor,
    Spectrum,
    System,
    cg_least_squares,
    norm_2,
    power_estimates,
    rank_rtol,
    solve_operator,
)
from .nullspace import complete, null_images, null_space
from .equations import gram_entries_bound
from .joint import DENSE_MAX_UNKNOWNS, hybrid_scales, joint_resolve, joint_system
from .preconditioning import conv_preconditioner, joint_preconditioner, plan
from .refined import refinement

# Gradient-constraint matrices up to this many columns are solved whole; wider ones with a stride
# split into their residue classes, which A never mixes (a quarter of the columns each at stride 2).
_WHOLE_GRADIENT_COLUMNS = 1100
# A hybrid layer solved through its weight constraints' factorisation corrects their solution within the
# span of this many of M's smallest singular directions (see _deflated_hybrid).
DEFLATION_SIZE = 128
# Correction steps of the deflated hybrid solve.
DEFLATION_STEPS = 2
_FLOAT64_BYTES = 8
# A sparse matrix in scipy's COO and CSR forms takes about this many bytes per nonzero at its peak.
_SPARSE_BYTES_PER_ENTRY = 40
# A large layer whose gradient constraints leave a null space of at most this many directions (over
# all channels) is completed within it from the weight constraints, densely, instead of factorising
# the whole stacked system (minutes for the 19,712 unknowns of LeNet_All_ReLU's second layer).
COMPLETION_MAX_DIRECTIONS = 4096
# Weight constraints whose Gram matrix M^T M has more nonzeros than this are solved by Krylov iterations
# instead of a sparse factorisation: lenet_hr224's first layer (at most 37M) factorises in seconds, while
# a 16-channel 5x5 layer at 112 px (260M) filled in to an 11.7 GB factor.
DIRECT_MAX_GRAM_ENTRIES = 100_000_000
# A stride-1 layer (where the Fourier symbol preconditions CG well) whose Gram matrix has more nonzeros than
# this is solved by Krylov iterations even when its factorisation would fit. Measured on a 128-px net's second
# layer (16 channels, 64 px), cold: 5x5 kernels (85M entries) direct 57 s, 6.9 GB, Krylov 21 s, 2.9 GB;
# 3x3 (26M) direct 14.5 s, 3.7 GB, Krylov 10 s, 2.0 GB, but the direct factor is kept for the model's
# next images (0.4 s each) where every Krylov solve starts afresh.
KRYLOV_STRIDE_ONE_GRAM_ENTRIES = 50_000_000
# The normal equations' relative residual a Krylov solve must reach: what float64 CG can reach, so
# that the solution is as good as the direct factorisation's whatever the gradients' precision.
KRYLOV_TOLERANCE = 1e-14
# CG steps and seconds a Krylov solve may take before it gives up, saying so.
KRYLOV_MAX_STEPS, KRYLOV_TIME_LIMIT = 3000, 600.0
# Power and inverse-iteration steps of a Krylov solve's condition number (its order of magnitude), and
# the looser tolerance of the inverse iteration's solves (a 128-px 5x5 layer: 1e-3 gives the same three
# digits of its condition number as 1e-6, in half the CG steps, 3 s less; a 96-px ReLU layer solved with
# both kinds of constraints: 1e-2 gives 6.140 where 1e-3 gives 6.149, 2.5 s less).
_CONDITION_STEPS, _CONDITION_TOLERANCE = 2, 1e-2
# A float32 Lanczos resolves K^T K's eigenvalues down to about eps32 = 1e-7 of the largest; a condition number
# above this (eigenvalues 1e-5 apart, two digits clear of that floor) is measured again in float64.
_LOW_COND_LIMIT = 300.0
# The error bound's tangents need a digit or two (solvers.Solved): its Krylov resolves stop at this tolerance on
# the normal equations, tightened so that cond(K)^2 times it, what CG may leave in the moves at worst, stays within
# _RESOLVE_ACCURACY of them (a 96-px ReLU net's bound from float32: 3.366e-5 at 1e-8 in 17 s, 3.364e-5 at 1e-4
# in 6.9 s; a 224-px ReLU net's from float64: 1.4e-10 on its image at 1e-5 and at 1e-3 alike, though a random
# right-hand side at condition number 3e4 comes back 4x off at 1e-3).
_RESOLVE_TOLERANCE, _RESOLVE_ACCURACY = 1e-3, 0.1
# Vectors of the layer's size a Krylov solve keeps at once (CG's, the preconditioner's, the refinement's).
_KRYLOV_VECTORS = 12
# CGLS steps for a large layer that cannot be determined (too few equations, or wrong data from an
# undetermined layer above): a minimum-norm estimate for the picture, not a solution to trust.
_ESTIMATE_STEPS = 50


class LayerSolve(NamedTuple):
    """A solved conv layer: its input (C, H*W), the system's Spectrum, its relative residual, and notes.

    resolve(gradient_rhs (F*k*k, C, r), weight_rhs (known rows, r)) -> (C, H*W, r) solves the same
    equations for other right-hand sides through the factorisations already made: the error bound's
    tangents (None for an estimate, which is never bounded).
    """

    x: torch.Tensor
    spectrum: Spectrum
    residual: float
    notes: tuple = ()
    estimated: bool = False  # a cheap estimate of an undeterminable layer: the rank is only a counting bound
    resolve: object = None
    solver: str = "direct"  # "direct" (a factorisation) or "krylov" (preconditioned CG)
    stopped: str = ""  # why an iterative solve stopped short of its tolerance (empty: it converged)
    refined: bool = False  # a "gradients" solve refined by the weight constraints (rconv.attack.refined)


def _deflated_hybrid(equations, dtype, factor):
    """The hybrid layer, fast: weight constraints solved through `factor` (a Factor or NormalFactor of M's known
    rows), then corrected by the least-squares fit of both kinds of constraints within the span of M's smallest
    singular directions, the only ones where the weights alone are unreliable."""
    weights, channels = equations.weights, equations.channels
    system = joint_system(equations, with_gradients=True)
    subspace = factor.small_subspace(min(weights.shape[1], DEFLATION_SIZE))
    grad_scale, weight_scale = hybrid_scales(equations)
    matrix = equations.gradients.matrix
    directions = subspace.basis.shape[1]
    grad_images = (matrix @ subspace.basis.view(channels, matrix.shape[1], directions)).reshape(-1, directions)
    reduced = torch.cat([grad_scale * grad_images, weight_scale * subspace.images])
    eigenvalues, vectors = torch.linalg.eigh(reduced.T @ reduced)
    sigma = eigenvalues.clamp_min(0).sqrt()
    # Directions outside the subspace keep at least the weights' k-th smallest singular value.
    top = math.hypot(weight_scale * factor.sigma_max, grad_scale * math.sqrt(channels) * norm_2(matrix))
    top = max(top, float(sigma.max()))
    floor = min(float(sigma.min()), weight_scale * float(subspace.sigma.max())) if directions < weights.shape[1] \
        else float(sigma.min())
    rtol = rank_rtol(dtype, system.shape)
    keep = sigma > rtol * top
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(TINY), torch.zeros_like(eigenvalues))
    known_rows = equations.output.shape[0]

    def solve_rhs(rhs):
        x = factor.least_squares(rhs[-known_rows:] / weight_scale)
        for _ in range(DEFLATION_STEPS):
            coefficients = vectors @ (inverse[:, None] * (vectors.T @ (reduced.T @ (rhs - system.apply(x)))))
            x = x + subspace.basis @ coefficients
        return x

    spectrum = Spectrum(weights.shape[1] - int((~keep).sum()), top / floor if floor > 0 else math.inf)
    return solve_rhs(system.rhs), spectrum, system, joint_resolve(equations, True, solve_rhs)


def _solve_gradients(equations, dtype, memory_limit, label, read=None):
    """Gradient constraints alone, all channels at once: whole A, or one residue class at a time. read: the
    activation's output and derivative at the layer's outputs, to refine a whole A's solution by the weight
    constraints within its weakest directions where outputs are known (rconv.attack.refined); None leaves it alone."""
    gradients, channels = equations.gradients, equations.channels
    check(3 * gradients.dense_bytes(), f"{label}: the gradient-constraint matrix ({gradients.shape[0]:,} x "
                                       f"{gradients.shape[1]:,}, dense)", memory_limit)
    matrix, rhs = gradients.matrix, gradients.rhs
    if gradients.shape[1] <= _WHOLE_GRADIENT_COLUMNS or max(gradients.stride) == 1:
        check(3 * gradients.shape[1] ** 2 * _FLOAT64_BYTES,
              f"{label}: the Gram matrix of its gradient constraints ({gradients.shape[1]:,} pixels)", memory_limit)
        system = System(matrix.shape, lambda x: matrix @ x, lambda y: matrix.T @ y, rhs, matrix=matrix)
        solved = solve_operator(system, rank_rtol(dtype, matrix.shape))
        x, resolve = solved.x.T, _channel_resolve([(slice(None), slice(None), solved.resolve)], matrix.shape[1])
        found = refinement(equations, solved.eigen, *read) if read is not None and solved.eigen is not None else None
        if found is not None:
            x = found.correct(equations, x[:, :, None], rhs[:, :, None], equations.output[:, None])[:, :, 0]
            resolve = _refined_resolve(equations, found, resolve)
        return LayerSolve(x, Spectrum(solved.spectrum.rank * channels, solved.spectrum.cond), system.residual(x.T),
                          resolve=resolve, refined=found is not None)
    x = rhs.new_zeros(gradients.shape[1], channels)
    rank, cond, pieces = 0, 0.0, []
    for residue in gradients.residue_classes():
        block = matrix[residue.rows][:, residue.pixels]
        system = System(block.shape, lambda v, b=block: b @ v, lambda v, b=block: b.T @ v, rhs[residue.rows],
                        matrix=block)
        solved = solve_operator(system, rank_rtol(dtype, matrix.shape))
        x[residue.pixels], spectrum = solved.x, solved.spectrum
        rank, cond = rank + spectrum.rank, max(cond, spectrum.cond)
        pieces.append((residue.rows, residue.pixels, solved.resolve))
    residual = float(torch.linalg.norm(matrix @ x - rhs) / torch.linalg.norm(rhs).clamp_min(TINY))
    return LayerSolve(x.T, Spectrum(rank * channels, cond), residual, resolve=_channel_resolve(pieces, matrix.shape[1]))


def _refined_resolve(equations, found, resolve):
    """A LayerSolve.resolve that refines `resolve`'s solutions as the layer's own was (a Refinement)."""
    return lambda gradient_rhs, weight_rhs: found.correct(equations, resolve(gradient_rhs, weight_rhs), gradient_rhs,
                                                          weight_rhs)


def _channel_resolve(pieces, pixels):
    """A LayerSolve.resolve for gradient constraints solved channel by channel, block by block: pieces
    are (rows, pixels, resolve) per block (whole A: slices of everything)."""
    def resolve(gradient_rhs, weight_rhs):
        rows, channels, columns = gradient_rhs.shape
        flat = gradient_rhs.reshape(rows, channels * columns)
        x = flat.new_zeros(pixels, channels * columns)
        for block_rows, block_pixels, block_resolve in pieces:
            x[block_pixels] = block_resolve(flat[block_rows])
        return x.view(pixels, channels, columns).permute(1, 0, 2)

    return resolve


def _gradient_gram(equations, scale):
    """scale^2 (I_C (x) A^T A) as a scipy sparse matrix, from A's dense residue-class blocks."""
    import numpy as np
    import scipy.sparse
    gradients, channels, pixels = equations.gradients, equations.channels, equations.pixels
    rows, cols, values = [], [], []
    for residue in gradients.residue_classes():
        block = gradients.matrix[residue.rows][:, residue.pixels]
        gram = (scale * scale * (block.T @ block)).cpu().numpy()
        index = residue.pixels.cpu().numpy()
        for c in range(channels):
            rows.append(np.repeat(c * pixels + index, len(index)))
            cols.append(np.tile(c * pixels + index, len(index)))
            values.append(gram.reshape(-1))
    size = channels * pixels
    return scipy.sparse.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(size, size))


def _gradient_gram_entries(equations):
    """Nonzeros of I_C (x) A^T A: A's residue-class blocks are dense."""
    return equations.channels * sum(len(r.pixels) ** 2 for r in equations.gradients.residue_classes())


def _too_many(entries, memory_limit):
    """Whether Gram blocks of this many nonzeros are beyond a sparse factorisation."""
    return entries > DIRECT_MAX_GRAM_ENTRIES or _SPARSE_BYTES_PER_ENTRY * entries > (memory_limit or math.inf)


def hybrid_factorises_weights(equations, memory_limit=None):
    """Whether a hybrid solve of this large layer starts from a factorisation of its weight constraints alone
    (_deflated_partial): rows known only in part, whose factorisation fits, and gradient-constraint Gram
    blocks that would not."""
    return (not bool(equations.known.all()) and choose_solver(equations, memory_limit).solver == "direct"
            and _too_many(_gradient_gram_entries(equations), memory_limit))


class SolverPlan(NamedTuple):
    """How a large layer's weight constraints will be solved, and the memory that is predicted before any
    gradient exists: the sparse Gram matrix for "direct" (its factor comes on top, measured by PARDISO
    before it is allocated), the preconditioner and vectors for "krylov"."""

    solver: str
    memory: int  # bytes
    reason: str = ""  # why not "direct", in words


def plan_solver(weight_shape, input_shape, stride, padding, memory_limit=None, *, partial=False):
    """The SolverPlan of a conv layer's weight constraints, from shapes alone.

    partial: only some rows are known (ReLU units on): a Krylov solve then takes both kinds of constraint
    and a diagonal preconditioner (preconditioning.joint_preconditioner), not the frame and the symbol.
    """
    gram = gram_entries_bound(input_shape, weight_shape[2:])
    direct = _SPARSE_BYTES_PER_ENTRY * gram
    if direct > (memory_limit or math.inf) or gram > DIRECT_MAX_GRAM_ENTRIES:
        reason = f"its normal equations' Gram matrix would need {size(direct)} before fill-in"
    elif max(pair(stride)) == 1 and gram > KRYLOV_STRIDE_ONE_GRAM_ENTRIES:
        reason = f"stride 1 and {gram:.2g} Gram entries: preconditioned CG is faster than a factorisation"
    else:
        return SolverPlan("direct", direct)
    vectors = _KRYLOV_VECTORS * math.prod(input_shape) * _FLOAT64_BYTES
    preconditioner = 0 if partial else plan(weight_shape, input_shape, stride, padding).bytes
    return SolverPlan("krylov", vectors + preconditioner, reason)


def choose_solver(equations, memory_limit):
    """The SolverPlan of a layer's weight constraints: "direct" when their sparse normal equations may be built
    and factorised here and that is the faster, else "krylov" (plan_solver)."""
    weights = equations.weights
    return plan_solver(weights.weight.shape, weights.input_shape, weights.stride, weights.padding, memory_limit,
                       partial=not bool(equations.known.all()))


def _check_weight_matrix(weights, memory_limit, label):
    check(_SPARSE_BYTES_PER_ENTRY * len(weights.entries.values), f"{label}: its weight-constraint matrix "
          f"({weights.shape[0]:,} x {weights.shape[1]:,}, sparse)", memory_limit)


def _deflated_partial(equations, dtype, memory_limit, label):
    """A large hybrid layer whose weight constraints are partial (ReLU units off): those factorised (their
    sparse normal equations, per image), then corrected within their DEFLATION_SIZE smallest directions
    (_deflated_hybrid). None where that cannot certify the layer (the weights' factorisation would not fit,
    or more of their directions are weak than the correction spans): CG on both kinds then decides."""
    weights, known, gradients = equations.weights, equations.known, equations.gradients
    if int(known.sum()) < equations.unknowns:
        return None
    check(3 * gradients.dense_bytes(), f"{label}: the gradient-constraint matrix ({gradients.shape[0]:,} x "
          f"{gradients.shape[1]:,}, dense)", memory_limit)
    _check_weight_matrix(weights, memory_limit, label)
    rows = joint_system(equations, with_gradients=False)
    like = torch.empty(0, dtype=equations.output.dtype, device=equations.output.device)
    try:
        factor = NormalFactor(weights.sparse_gram(known), rows.apply, rows.apply_t,
                              rank_rtol(torch.float64, rows.shape), like, memory_limit)
    except FillTooLarge:
        return None
    x, spectrum, system, resolve = _deflated_hybrid(equations, dtype, factor)
    if spectrum.rank < equations.unknowns or not spectrum.cond * rank_rtol(dtype, system.shape) < 1.0:
        return None
    return LayerSolve(x.view(equations.channels, equations.pixels), spectrum, system.residual(x),
                      (f"{label}: its known weight constraints factorised and corrected within their "
                       f"{min(equations.unknowns, DEFLATION_SIZE)} weakest directions",), resolve=resolve)


def _solve_sparse(equations, with_gradients, dtype, memory_limit, label):
    """The sparse normal equations of weight constraints (and gradient constraints), for large layers."""
    notes = []
    chosen = choose_solver(equations, memory_limit)
    if chosen.solver == "krylov":  # matrix-free: the gradient constraints need no Gram blocks here
        why = f"{label}: {chosen.reason}"
        return _solve_krylov(equations, with_gradients, memory_limit, label, (why,))
    # The gradient constraints' Gram blocks count like the weight constraints' Gram matrix: beyond
    # DIRECT_MAX_GRAM_ENTRIES their construction and factorisation outgrow any estimate (a 128-px ReLU net's
    # first layer, 201M entries, predicted 8 GB, was killed at 24 GB).
    entries = _gradient_gram_entries(equations) if with_gradients else 0
    if _too_many(entries, memory_limit):
        need = size(_SPARSE_BYTES_PER_ENTRY * entries)
        if not bool(equations.known.all()):  # the units that are on alone may barely determine the layer
            why = f"{label}: the Gram blocks of its gradient constraints would need {need}"
            deflated = _deflated_partial(equations, dtype, memory_limit, label)
            if deflated is not None:
                return deflated._replace(notes=(why,) + deflated.notes)
            return _solve_krylov(equations, True, memory_limit, label, (f"{why}; both kinds solved by CG",))
        notes.append(f"{label}: gradient constraints left out, their Gram blocks would need {need}")
        with_gradients = False
    if with_gradients:
        check(3 * equations.gradients.dense_bytes(), f"{label}: the gradient-constraint matrix "
              f"({equations.gradients.shape[0]:,} x {equations.gradients.shape[1]:,}, dense)", memory_limit)
    weights, known = equations.weights, equations.known
    _check_weight_matrix(weights, memory_limit, label)
    system = joint_system(equations, with_gradients)
    rtol = rank_rtol(dtype, system.shape)
    try:
        if not with_gradients and bool(known.all()):
            factor = weights.normal_factor(rtol, memory_limit)  # depends only on the weights: once per model
        else:
            grad_scale, weight_scale = hybrid_scales(equations) if with_gradients else (1.0, 1.0)
            gram = weight_scale ** 2 * weights.sparse_gram(known)
            if with_gradients:
                gram = gram + _gradient_gram(equations, grad_scale)
            like = torch.empty(0, dtype=equations.output.dtype, device=equations.output.device)
            factor = NormalFactor(gram, system.apply, system.apply_t, rtol, like, memory_limit)
    except FillTooLarge as error:
        why = f"{label}: the sparse factorisation of its normal equations would need {size(error.need)}"
        return _solve_krylov(equations, with_gradients, memory_limit, label, tuple(notes) + (why,))
    x = factor.solve(system)
    if factor.kind == "ridge":
        notes.append(f"{label}: rank-deficient at the gradients' precision; the solution is a ridge "
                     f"(minimum-norm) estimate")
    return LayerSolve(x.view(equations.channels, equations.pixels), factor.spectrum, system.residual(x), tuple(notes),
                      resolve=joint_resolve(equations, with_gradients, factor.least_squares))


def _krylov_condition(n, like, gram_apply, preconditioner, lower):
    """A Krylov layer's condition number: Lanczos in the lower precision where there is one and it resolves the
    spectrum (a partial layer, whose diagonal preconditioner CG hardly needs), else power and inverse iteration in
    float64 with the layer's preconditioner (a symbol-preconditioned layer converges in far fewer steps so)."""
    if lower is not None:
        extremes = lanczos_extremes(lower.gram_apply, n, dtype=lower.dtype, device=like.device)
        if extremes.cond <= _LOW_COND_LIMIT:
            return extremes.cond
    inverse = gram_solver(gram_apply, preconditioner, tolerance=_CONDITION_TOLERANCE, max_iterations=KRYLOV_MAX_STEPS)
    estimates = power_estimates(n, like, gram_apply, inverse, iterations=_CONDITION_STEPS)
    return math.sqrt(estimates[0] / estimates[1]) if estimates and estimates[1] > 0 else math.inf


def _lower_precision(equations):
    """The joint normal equations of a partial layer (both kinds of constraint, a diagonal preconditioner) in
    float32, for normal_cg's rounds between float64 residuals."""
    low = equations.to(torch.float32)
    system = joint_system(low, True)
    grad_scale, weight_scale = hybrid_scales(low)
    weights = low.weights
    precondition = joint_preconditioner(weights.weight, weights.input_shape, weights.stride, weights.padding,
                                        low.known, low.gradients.output_grad, weight_scale, grad_scale)
    return LowPrecision(lambda v: system.apply_t(system.apply(v)), precondition, torch.float32)


def barely_weights(equations):
    """Whether a layer's weight constraints are partial (ReLU units off) or no more than its unknowns: then the
    symbol and the frame, which precondition their M^T M, fail it (no convolution where rows are missing; singular
    where all of them are too few: a valid 3x3 conv, 64 filters on 64 channels, whose frame's factorisation gave
    NaN; nearly so where they are square: 2,103-2,966 CG steps on a padded 8-channel layer where the joint diagonal
    took 1,091-1,149), and a Krylov solve takes both kinds under the joint diagonal, both kinds first."""
    return not bool(equations.known.all()) or equations.weights.shape[0] <= equations.unknowns


def _solve_krylov(equations, with_gradients, memory_limit, label, notes):
    """The weight constraints (and gradient constraints) by preconditioned CG, matrix-free: for layers whose
    factorisation would not fit. Certified by its residuals; a solve that stops short says why (`stopped`)."""
    weights, known = equations.weights, equations.known
    check(_KRYLOV_VECTORS * weights.shape[1] * _FLOAT64_BYTES, f"{label}: the vectors of its Krylov solve "
          f"({weights.shape[1]:,} unknowns)", memory_limit)
    system = joint_system(equations, with_gradients)
    grad_scale, weight_scale = hybrid_scales(equations) if with_gradients else (1.0, 1.0)

    def gram_apply(v):
        return system.apply_t(system.apply(v))

    lower = None
    if with_gradients and barely_weights(equations):
        preconditioner = joint_preconditioner(weights.weight, weights.input_shape, weights.stride, weights.padding,
                                              known, equations.gradients.output_grad, weight_scale, grad_scale)
        lower = _lower_precision(equations)
    else:
        symbol = conv_preconditioner(weights.weight, weights.input_shape, weights.stride, weights.padding, known,
                                     gram_apply, memory_limit=memory_limit, label=label, cache=weights.factors)

        def preconditioner(r):
            return symbol(r) / weight_scale ** 2

    def solve_rhs(rhs, tolerance=KRYLOV_TOLERANCE):
        return normal_cg(system.apply, system.apply_t, rhs, preconditioner, tolerance=tolerance,
                         max_iterations=KRYLOV_MAX_STEPS, time_limit=KRYLOV_TIME_LIMIT, lower=lower)

    solved = solve_rhs(system.rhs)
    cond = math.inf  # a solve that stopped short is not certified: its inverse iterations would not be either
    if solved.converged:
        cond = _krylov_condition(weights.shape[1], system.rhs, gram_apply, preconditioner, lower)
    in_lower = f", {solved.lower_iterations} of them in float32" if solved.lower_iterations else ""
    resolve_tolerance = max(KRYLOV_TOLERANCE, min(_RESOLVE_TOLERANCE, _RESOLVE_ACCURACY / cond ** 2))
    notes = notes + (f"{label}: solved by preconditioned CG in {solved.iterations} steps{in_lower} (normal-equations "
                     f"residual {solved.optimality:.2g})",)
    stopped = "" if solved.converged else f"{label}: its Krylov solve {solved.reason}"
    return LayerSolve(solved.x.view(equations.channels, equations.pixels), Spectrum(weights.shape[1], cond),
                      solved.residual, notes + ((stopped,) if stopped else ()), solver="krylov", stopped=stopped,
                      resolve=joint_resolve(equations, with_gradients, lambda rhs: solve_rhs(rhs, resolve_tolerance).x))


def _solve_dense(equations, method, dtype, fallback):
    """Weight constraints (and gradient constraints, for "hybrid") of a dense-sized layer."""
    weights, known, channels, pixels = equations.weights, equations.known, equations.channels, equations.pixels
    if bool(known.all()) and weights.shape[0] >= weights.shape[1]:
        # M alone could determine the input and does not depend on the image: factorise it once.
        if method == "hybrid":
            x, spectrum, system, resolve = _deflated_hybrid(equations, dtype,
                                                            weights.factor(rank_rtol(torch.float64, weights.shape)))
        else:
            system = joint_system(equations, with_gradients=False)
            factor = weights.factor(rank_rtol(dtype, weights.shape))
            x, spectrum = factor.solve(system), factor.spectrum
            resolve = joint_resolve(equations, False, factor.least_squares)
    else:
        system = joint_system(equations, with_gradients=method == "hybrid")
        solved = solve_operator(system, rank_rtol(dtype, system.shape), fast_only=fallback)
        if solved is None:
            return None
        x, spectrum = solved.x, solved.spectrum
        resolve = joint_resolve(equations, method == "hybrid", solved.resolve)
    return LayerSolve(x.view(channels, pixels), spectrum, system.residual(x), resolve=resolve)


def complete_gradients(equations, dtype, *, memory_limit=None, label="conv layer"):
    """A layer whose gradient constraints are rank-deficient, completed from its weight constraints
    (complete): None when their null space is too large to solve densely."""
    gradients, weights, known = equations.gradients, equations.weights, equations.known
    channels, pixels = equations.channels, equations.pixels
    if channels * (pixels - min(gradients.shape)) > COMPLETION_MAX_DIRECTIONS or not bool(known.any()):
        return None
    check(3 * gradients.dense_bytes(), f"{label}: the gradient-constraint matrix ({gradients.shape[0]:,} x "
                                       f"{gradients.shape[1]:,}, dense)", memory_limit)
    whole = gradients.shape[1] <= _WHOLE_GRADIENT_COLUMNS or max(gradients.stride) == 1
    null = null_space(gradients.matrix, dtype, None if whole else gradients.residue_classes())
    columns = channels * null.basis.shape[1]
    if columns > COMPLETION_MAX_DIRECTIONS:
        return None
    check(3 * weights.shape[0] * columns * _FLOAT64_BYTES, f"{label}: its weight constraints on the null space of "
          f"its gradient constraints ({weights.shape[0]:,} x {columns:,}, dense)", memory_limit)
    completed = complete(null, (lambda x: gradients.apply(x.T), gradients.rhs),
                         (lambda x: weights.apply(x.reshape(-1, 1))[known], equations.output.reshape(-1, 1)),
                         null_images(weights, null.basis, known), dtype)
    note = (f"{label}: its gradient constraints left {columns:,} directions undetermined (rank {null.rank} of "
            f"{pixels} per channel); the weight constraints determined {completed.spectrum.rank - null.rank * channels:,} "
            f"of them",)
    def resolve(gradient_rhs, weight_rhs):
        return torch.stack([completed.fit(gradient_rhs[:, :, r], weight_rhs[:, r:r + 1])
                            for r in range(gradient_rhs.shape[2])], dim=-1)

    return LayerSolve(completed.x, completed.spectrum, completed.residual, note, resolve=resolve)


def counted_equations(equations, method):
    """The most independent equations `method` can offer the layer (a counting bound on its rank)."""
    gradients = equations.channels * min(equations.gradients.shape) if method != "weights" else 0
    return gradients + (int(equations.known.sum()) if method != "gradients" else 0)


def estimate_layer(equations, method, label, reason):
    """A cheap minimum-norm estimate of a large layer that cannot be determined, with its rank bound."""
    if method == "gradients":
        gradients = equations.gradients
        system = System(gradients.shape, gradients.apply, gradients.apply_t, gradients.rhs)
    else:
        system = joint_system(equations, with_gradients=method != "weights")
    x = cg_least_squares(system, _ESTIMATE_STEPS)
    residual = system.residual(x)
    x = x.T if method == "gradients" else x.view(equations.channels, equations.pixels)
    bound = min(counted_equations(equations, method), equations.unknowns)
    note = f"{label}: {reason}; its rank is bounded by counting (at most {bound:,}), and its input is a " \
           f"minimum-norm estimate ({_ESTIMATE_STEPS} CGLS steps)"
    return LayerSolve(x.reshape(equations.channels, equations.pixels), Spectrum(bound, math.inf), residual,
                      (note,), estimated=True)


def solve_layer(equations, method, dtype, *, memory_limit=None, label="conv layer", fallback=False, read=None):
    """Solve one conv layer for its input with `method` ("gradients", "weights" or "hybrid"): a LayerSolve.

    memory_limit: bytes the solve may take; label names the layer in errors and notes.
    fallback: an attempt to repair rank-deficient gradient constraints; completes the layer within
    the gradient constraints' null space when that is small (complete_gradients), and otherwise
    gives up (None) rather than analyse a dense system that is rank-deficient too.
    read: (activation output, its derivative) at the layer's outputs, to refine "gradients" by the weight
    constraints where the outputs are known (rconv.attack.refined); None: the gradient constraints alone.
    """
    try:
        return _solve_layer(equations, method, dtype, memory_limit, label, fallback, read)
    except (MemoryError, RuntimeError) as error:  # the checks before each allocation should have refused it
        if not ran_out(error):
            raise
        raise RConvError(f"{label}: an allocation failed while solving its {equations.unknowns:,} unknowns "
                         f"({error}); give it more memory or a smaller memory_limit to stop before it") from error


def _solve_layer(equations, method, dtype, memory_limit, label, fallback, read):
    if method == "hybrid" and not bool(equations.known.any()):
        method = "gradients"  # no weight constraint left (every ReLU unit off): the per-channel solve is the same
    if method == "gradients":
        return _solve_gradients(equations, dtype, memory_limit, label, read)
    if method == "hybrid" and fallback:
        # Completing within the gradient constraints' small null space is 10x cheaper than a dense
        # joint solve of every unknown, and as exact: the dense path is kept for when it declines.
        completed = complete_gradients(equations, dtype, memory_limit=memory_limit, label=label)
        if completed is not None:
            return completed
    if equations.unknowns <= DENSE_MAX_UNKNOWNS:
        return _solve_dense(equations, method, dtype, fallback)
    return _solve_sparse(equations, method == "hybrid", dtype, memory_limit, label)
