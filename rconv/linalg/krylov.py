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

import torch

# Guards divisions by a norm that may be zero; far below any norm real data produce.
_TINY = 1e-300
# Rounds of CG restarted on the true residual K^T (b - K x): each round corrects what the previous
# one's recurrence lost to rounding.
_REFINE_ROUNDS = 3
# Rounds stop once a correction changes the solution by less than this, relative to it.
_REFINE_STALL = 1e-15
# Rounds of CG in a lower precision (LowPrecision) between float64 residuals, each asked to gain this much: a
# 128-px ReLU layer (condition number 13) gains 1e-4 per float32 round in 70-115 steps and reaches 1e-14 in 4.
_LOW_ROUNDS, _LOW_RTOL = 6, 1e-4
# A lower-precision round that gains less than this factor, or whose CG does not reach its tolerance in this
# many steps, hands over to float64: the system is too ill-conditioned for the lower precision's rounding
# (float32 resolves K^T K to a condition number of about 1e5, where 1e-4 takes CG about 1,500 steps; a budget
# of half that wastes at most a quarter of float64's cost when float32 fails).
_LOW_GAIN, _LOW_ROUND_STEPS = 0.1, 750
# Lanczos stops once its condition number grew by less than _LANCZOS_SETTLED over the last _LANCZOS_WINDOW steps,
# or after _LANCZOS_MAX_STEPS. Its smallest Ritz value works slowly into a cluster of small eigenvalues, so the
# estimate creeps up (a 224-px ReLU layer: 46 at 60 steps, 67 at 150, 70 at 180, 77 at 300; the inverse
# iteration that came before gave 48 in 17 s); this stops it at 180 steps there (6 s), at 100 at 128 px (22 of
# 23.4). The Ritz values are checked every _LANCZOS_CHECK steps (a small tridiagonal eigenproblem each).
_LANCZOS_SETTLED, _LANCZOS_WINDOW, _LANCZOS_MAX_STEPS, _LANCZOS_CHECK = 0.05, 30, 300, 10
# Fixed seed: the same system always gets the same condition number.
_LANCZOS_SEED = 20240605


class KrylovSolve(NamedTuple):
    """One Krylov least-squares solve, certified by its residuals.

    x: (n, r) the solution; residual: the largest |K x - b| / |b| over the columns; optimality:
    the largest |K^T (K x - b)| / |K^T b| (zero at the least-squares solution); iterations: CG
    steps over all columns and rounds; reason: empty when converged, else why it stopped;
    lower_iterations: how many of the steps were in the lower precision (LowPrecision).
    """

    x: torch.Tensor
    residual: float
    optimality: float
    iterations: int
    reason: str = ""
    lower_iterations: int = 0

    @property
    def converged(self):
        return not self.reason


def _relative(value, reference):
    return float(torch.linalg.norm(value) / torch.linalg.norm(reference).clamp_min(_TINY))


def _column_norms(v):
    return torch.linalg.norm(v, dim=0)


class LowPrecision(NamedTuple):
    """K^T K and its preconditioner on tensors of a lower `dtype` (float32 convolutions take a quarter of
    float64's time): normal_cg runs its CG rounds with them and checks every round in float64."""

    gram_apply: object
    precondition: object
    dtype: torch.dtype


class _Steps(NamedTuple):
    """What one run of _cg did: its solution, its steps (all columns advance together), and why it stopped:
    "" converged, "steps" out of steps, "time" past the deadline."""

    x: torch.Tensor
    steps: int
    stopped: str


def _cg(gram_apply, b, precondition, *, rtol, max_iterations, deadline=math.inf):
    """Preconditioned CG on G x = b for the r columns of b (n, r) at once, each with its own step lengths, until
    every column's residual is within rtol of its |b|.

    Written here rather than scipy's cg: scipy solves one column at a time, and its numpy vector updates run
    on OpenBLAS threads that contend with PyTorch's for the cores between operator products (a 128-px layer's
    CG step took 110 ms under scipy, about 50 ms with the vector work left to PyTorch).
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    goal = rtol * _column_norms(b)
    active = _column_norms(residual) > goal
    z = precondition(residual)
    direction = z.clone()
    rho = (residual * z).sum(0)
    steps = 0
    while bool(active.any()):
        if steps >= max_iterations:
            return _Steps(x, steps, "steps")
        if time.perf_counter() > deadline:
            return _Steps(x, steps, "time")
        product = gram_apply(direction)
        curvature = (direction * product).sum(0)
        # a column whose curvature vanishes has nothing left to gain: it stops where it is
        active = active & (curvature > 0)
        alpha = torch.where(active, rho / torch.where(active, curvature, 1.0), 0.0)
        x += alpha * direction
        residual -= alpha * product
        steps += 1
        active = active & (_column_norms(residual) > goal)
        z = precondition(residual)
        rho_next = (residual * z).sum(0)
        beta = torch.where(active, rho_next / torch.where(rho != 0, rho, 1.0), 0.0)
        direction = torch.where(active, z + beta * direction, direction)
        rho = rho_next
    return _Steps(x, steps, "")


def normal_cg(apply, apply_t, rhs, precondition, *, tolerance, max_iterations, time_limit=math.inf, lower=None):
    """The least-squares solution of K x = rhs (m, r) by preconditioned CG on K^T K x = K^T b.

    apply, apply_t: K @ v and K^T @ v on tensors (n, r) and (m, r); precondition: an approximate
    (K^T K)^-1 on tensors (n, r), symmetric positive definite. Converged when |K^T (b - K x)|
    falls to `tolerance` of |K^T b| for every column; otherwise the KrylovSolve's reason says why.
    lower: a LowPrecision for the rounds of CG, each correcting the float64 residual, while they gain enough.
    The columns are solved one after another: a conv layer's products on two columns at once cost more
    than two products on one (a 128-px layer: 146 ms a CG step against 2 x 51 ms).
    """
    run = _Rounds(apply, apply_t, precondition, tolerance, max_iterations, time.perf_counter() + time_limit)
    columns = []
    for k in range(rhs.shape[1]):
        columns.append(run.column(rhs[:, k:k + 1], lower))
        if run.stopped:
            break
    x = torch.cat(columns + [rhs.new_zeros(columns[0].shape[0], rhs.shape[1] - len(columns))], dim=1)
    misfit = apply(x) - rhs
    residual = max(_relative(misfit[:, k], rhs[:, k]) for k in range(rhs.shape[1]))
    optimality = max(_relative(apply_t(misfit[:, k:k + 1]), apply_t(rhs[:, k:k + 1])) for k in range(rhs.shape[1]))
    reason = {"time": f"stopped at the time limit of {time_limit:.0f} s after {run.iterations} CG steps",
              "steps": f"CG did not converge in {max_iterations} steps"}.get(run.stopped, "")
    if not reason and not optimality <= tolerance:
        reason = (f"CG stalled at a normal-equations residual of {optimality:.2g}, above its tolerance "
                  f"{tolerance:.2g}")
    return KrylovSolve(x, residual, optimality, run.iterations, reason, run.lower_iterations)


class _Round(NamedTuple):
    """One round's corrected solution, the size of its correction, and whether its CG reached its tolerance."""

    x: torch.Tensor
    moved: float
    reached: bool


class _Rounds:
    """Rounds of CG on the normal equations of one column after another, each round correcting the float64
    residual that the previous one left; counts the steps of all of them against one budget and deadline."""

    def __init__(self, apply, apply_t, precondition, tolerance, max_iterations, deadline):
        self.apply, self.apply_t, self.precondition = apply, apply_t, precondition
        self.tolerance, self.max_iterations, self.deadline = tolerance, max_iterations, deadline
        self.iterations, self.lower_iterations, self.stopped = 0, 0, ""

    def _gram(self, v):
        return self.apply_t(self.apply(v))

    def _round(self, x, gradient, gram_apply, precondition, rtol, dtype, steps=math.inf):
        """One CG run of at most `steps` on the gradient (scaled to unit norm, for the lower precision's range):
        a _Round."""
        scale = torch.linalg.norm(gradient).clamp_min(_TINY)
        run = _cg(gram_apply, (gradient / scale).to(dtype), precondition, rtol=rtol,
                  max_iterations=max(1, min(steps, self.max_iterations - self.iterations)), deadline=self.deadline)
        self.iterations += run.steps
        if run.stopped == "time" or (run.stopped == "steps" and self.iterations >= self.max_iterations):
            self.stopped = run.stopped
        step = scale * run.x.to(x.dtype)
        return _Round(x + step, float(torch.linalg.norm(step)), not run.stopped)

    def column(self, b, lower):
        target = self.apply_t(b)
        x = torch.zeros_like(target)
        if lower is not None:
            previous, reached = math.inf, True
            for _ in range(_LOW_ROUNDS):
                gradient = target - self._gram(x)
                relative = _relative(gradient, target)
                if relative <= self.tolerance or relative > _LOW_GAIN * previous or not reached or self.stopped:
                    break
                previous, before = relative, self.iterations
                x, _, reached = self._round(x, gradient, lower.gram_apply, lower.precondition,
                                            max(_LOW_RTOL, self.tolerance / relative), lower.dtype, _LOW_ROUND_STEPS)
                self.lower_iterations += self.iterations - before
        for _ in range(_REFINE_ROUNDS):
            gradient = target - self._gram(x)
            relative = _relative(gradient, target)
            if relative <= self.tolerance or self.stopped:
                break
            x, moved, _ = self._round(x, gradient, self._gram, self.precondition, self.tolerance / relative, x.dtype)
            if moved <= _REFINE_STALL * float(torch.linalg.norm(x)):
                break
        return x


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
    """An approximate (K^T K)^-1 on tensors (n, r) by preconditioned CG: for inverse iteration, which needs a
    few digits, not for solutions (normal_cg certifies those)."""
    def solve(v):
        return _cg(gram_apply, v, precondition, rtol=tolerance, max_iterations=max_iterations).x

    return solve


class Extremes(NamedTuple):
    """The largest and smallest eigenvalue of K^T K as Lanczos estimates them (the smallest from above, so
    that sqrt(largest / smallest) never overstates the condition number), and the steps taken."""

    largest: float
    smallest: float
    steps: int

    @property
    def cond(self):
        return math.sqrt(self.largest / self.smallest) if self.smallest > 0 else math.inf


def lanczos_extremes(gram_apply, n, *, dtype, device=None, max_steps=_LANCZOS_MAX_STEPS):
    """Extremes of K^T K by Lanczos from a fixed random start, in `dtype`, until the condition number they give
    grows by less than _LANCZOS_SETTLED over _LANCZOS_WINDOW steps.

    Lanczos builds the best polynomial of its degree where inverse iteration's inner CG solves build a product of
    poorer ones: on a 128-px ReLU layer, 200 float32 steps give a condition number of 23.4 where two inverse
    steps (about as many products) gave 13. No reorthogonalisation: rounding only repeats converged Ritz values,
    and the extreme ones stay within eps |K^T K| of the spectrum.
    """
    import numpy as np
    import scipy.linalg

    generator = torch.Generator().manual_seed(_LANCZOS_SEED)
    v = torch.randn(n, 1, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    v = v / torch.linalg.norm(v)
    previous, beta = torch.zeros_like(v), 0.0
    alphas, betas, history = [], [], []
    for step in range(1, max_steps + 1):
        w = gram_apply(v) - beta * previous
        alpha = float((w * v).sum())
        w = w - alpha * v
        beta = float(torch.linalg.norm(w))
        alphas.append(alpha)
        betas.append(beta)
        exhausted = not beta > _TINY  # an invariant subspace: its Ritz values are eigenvalues
        if step % _LANCZOS_CHECK == 0 or exhausted or step == max_steps:
            ritz = scipy.linalg.eigvalsh_tridiagonal(np.array(alphas), np.array(betas[:-1]))
            history.append(Extremes(float(ritz[-1]), float(ritz[0]), step))
            window = _LANCZOS_WINDOW // _LANCZOS_CHECK
            if exhausted or (len(history) > window and
                             history[-1].cond <= (1.0 + _LANCZOS_SETTLED) * history[-1 - window].cond):
                break
        previous, v = v, w / beta
    return history[-1]
