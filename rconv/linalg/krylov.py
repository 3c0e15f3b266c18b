"""Least squares K x = b without factorising K: preconditioned conjugate gradients on the normal equations.

For systems whose sparse factorisation would not fit in memory. K is given by its action only;
the caller supplies a preconditioner (an approximate inverse of K^T K). Every solve says how far
it got: the residual of K itself and of the normal equations, the iterations, and, when it
stopped short of the tolerance, why, so that a partial answer is never taken for a solution.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np
import torch

# Guards divisions by a norm that may be zero; far below any norm real data produce.
_TINY = 1e-300
# Rounds of CG restarted on the true residual K^T (b - K x): each round corrects what the previous
# one's recurrence lost to rounding.
_REFINE_ROUNDS = 3
# Rounds stop once a correction changes the solution by less than this, relative to it.
_REFINE_STALL = 1e-15


class KrylovSolve(NamedTuple):
    """One Krylov least-squares solve, certified by its residuals.

    x: (n, r) the solution; residual: the largest |K x - b| / |b| over the columns; optimality:
    the largest |K^T (K x - b)| / |K^T b| (zero at the least-squares solution); iterations: CG
    steps over all columns and rounds; reason: empty when converged, else why it stopped.
    """

    x: torch.Tensor
    residual: float
    optimality: float
    iterations: int
    reason: str = ""

    @property
    def converged(self):
        return not self.reason


class _OutOfTime(Exception):
    """Raised from CG's callback to stop it at the time limit (scipy's cg has no deadline of its own)."""


def _relative(value, reference):
    return float(torch.linalg.norm(value) / torch.linalg.norm(reference).clamp_min(_TINY))


def normal_cg(apply, apply_t, rhs, precondition, *, tolerance, max_iterations, time_limit=math.inf):
    """The least-squares solution of K x = rhs (m, r) by scipy's preconditioned CG on K^T K x = K^T b.

    apply, apply_t: K @ v and K^T @ v on tensors (n, r) and (m, r); precondition: an approximate
    (K^T K)^-1 on tensors (n, r), symmetric positive definite. Converged when |K^T (b - K x)|
    falls to `tolerance` of |K^T b| for every column; otherwise the KrylovSolve's reason says why.
    """
    from scipy.sparse.linalg import LinearOperator, cg
    n = apply_t(rhs[:, :1]).shape[0]
    like = rhs

    def as_tensor(v):
        return torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(n, 1)).to(like.dtype)

    normal = LinearOperator((n, n), lambda v: apply_t(apply(as_tensor(v))).numpy().ravel(), dtype=np.float64)
    preconditioner = LinearOperator((n, n), lambda v: precondition(as_tensor(v)).numpy().ravel(), dtype=np.float64)
    deadline = time.perf_counter() + time_limit
    x = rhs.new_zeros(n, rhs.shape[1])
    iterations, reason = 0, ""
    for column in range(rhs.shape[1]):
        b = rhs[:, column:column + 1]
        target = apply_t(b)
        for _ in range(_REFINE_ROUNDS):
            gradient = target - apply_t(apply(x[:, column:column + 1]))
            if _relative(gradient, target) <= tolerance:
                break
            steps, latest = [0], [None]

            def watch(iterate, steps=steps, latest=latest):
                steps[0] += 1
                latest[0] = iterate
                if time.perf_counter() > deadline:
                    raise _OutOfTime

            try:
                step, info = cg(normal, gradient.numpy().ravel(), rtol=tolerance * _relative(target, gradient),
                                maxiter=max(1, max_iterations - iterations), M=preconditioner, callback=watch)
            except _OutOfTime:
                step, info = latest[0], -1
            iterations += steps[0]
            if step is not None:
                x[:, column:column + 1] += as_tensor(step)
            small = step is None or float(np.linalg.norm(step)) <= _REFINE_STALL * float(torch.linalg.norm(x[:, column]))
            if info == -1:
                reason = f"stopped at the time limit of {time_limit:.0f} s after {iterations} CG steps"
                break
            if iterations >= max_iterations and info != 0:
                reason = f"CG did not converge in {max_iterations} steps"
                break
            if small:
                break
        if reason:
            break
    residual = max(_relative(apply(x[:, k:k + 1]) - rhs[:, k:k + 1], rhs[:, k:k + 1]) for k in range(rhs.shape[1]))
    optimality = max(_relative(apply_t(apply(x[:, k:k + 1]) - rhs[:, k:k + 1]), apply_t(rhs[:, k:k + 1]))
                     for k in range(rhs.shape[1]))
    if not reason and not optimality <= tolerance:
        reason = (f"CG stalled at a normal-equations residual of {optimality:.2g}, above its tolerance "
                  f"{tolerance:.2g}")
    return KrylovSolve(x, residual, optimality, iterations, reason)


def symmetric_schwarz(gram_apply, local_index, local_solve, global_solve):
    """A symmetric multiplicative Schwarz preconditioner for CG: an exact solve on a subset of the
    unknowns (local_index, where a cheap global approximation is poor), then the global
    approximation on what is left, then the local solve again (the repetition keeps it symmetric).

    gram_apply: K^T K on tensors (n, r); local_solve: (K^T K)[local, local]^-1 on (len(local), r);
    global_solve: an approximate (K^T K)^-1 on (n, r). Returns the preconditioner on (n, r).
    """
    def local(r):
        out = torch.zeros_like(r)
        out[local_index] = local_solve(r[local_index])
        return out

    def precondition(r):
        x = local(r)
        x = x + global_solve(r - gram_apply(x))
        return x + local(r - gram_apply(x))

    return precondition


def gram_solver(gram_apply, precondition, *, tolerance, max_iterations):
    """An approximate (K^T K)^-1 on tensors (n, r) by preconditioned CG, column by column: for inverse
    iteration, which needs a few digits, not for solutions (normal_cg certifies those)."""
    from scipy.sparse.linalg import LinearOperator, cg

    def solve(v):
        n = v.shape[0]

        def as_tensor(u):
            return torch.from_numpy(np.asarray(u, dtype=np.float64).reshape(n, 1)).to(v.dtype)

        gram = LinearOperator((n, n), lambda u: gram_apply(as_tensor(u)).numpy().ravel(), dtype=np.float64)
        inverse = LinearOperator((n, n), lambda u: precondition(as_tensor(u)).numpy().ravel(), dtype=np.float64)
        columns = [cg(gram, v[:, k].numpy(), rtol=tolerance, maxiter=max_iterations, M=inverse)[0]
                   for k in range(v.shape[1])]
        return torch.from_numpy(np.stack(columns, axis=1)).to(v.dtype)

    return solve
