"""Least squares with an honest numerical rank: pure linear algebra on tensors.

A System is K x = b given by K's action (and its Gram matrix K^T K or K itself on
demand); solve() returns the solution with its Spectrum (numerical rank and condition
number). Fast paths work on K^T K; when that cannot decide the rank at the data's
precision, a Factor of K itself (sparse or dense LU, QR, SVD, or a ridge for large
rank-deficient K) takes over. Nothing here knows about networks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# Guards divisions by a norm that may be zero; far below any norm real data produce.
TINY = 1e-300
# The smallest singular-value ratio a Gram matrix K^T K resolves in float64 (its
# eigenvalues are then 1e-12 apart from the largest, well above rounding).
GRAM_RESOLVES = 1e-6
# Gram matrices up to this size are diagonalised (exact rank and condition number);
# larger ones are Cholesky-factorised and their condition number is estimated.
EIGH_MAX = 1100
# Steps of iterative refinement with residuals of K itself.
REFINE_STEPS = 3
# Refinement stops once a step changes the solution by less than this, relative to it.
REFINE_STALL = 1e-15
# Power iterations for the largest singular value of a small dense matrix (two digits suffice).
NORM_ITERATIONS = 6
# Power and inverse iterations for the extreme eigenvalues of K^T K (condition to a few digits).
EXTREME_ITERATIONS = 12
# A tall K with at least this many unknowns, given sparse, is factorised through the Cholesky factor
# of its sparse Gram matrix (n^3/3 flops) rather than by dense QR (2 m n^2): for the 6,144 x 3,072
# first layer of lenet_batch, 0.3 s instead of 2.5 s. Smaller ones keep QR, which costs little there.
CHOLESKY_MIN_UNKNOWNS = 2048
# Block inverse iterations for the small singular subspace of a factorised K.
SUBSPACE_ITERATIONS = 1


def eps(dtype):
    """Machine epsilon of a floating dtype."""
    return torch.finfo(dtype).eps


def rank_rtol(dtype, shape):
    """The relative singular-value threshold of the numerical rank, for data of `dtype`."""
    # numpy's matrix_rank rule, max(m, n) * eps, at the precision of the gradients; capped
    # so that half-precision gradients still get a best-effort solution.
    return min(1e-2, max(shape) * eps(dtype))


@dataclass
class Spectrum:
    """The numerical rank and condition number of a solved system."""

    rank: int
    cond: float  # condition number of K: largest over smallest singular value


def spectrum_of(sigma, rtol):
    """Rank and condition number from singular values sorted in any order."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    if top <= 0.0:
        return Spectrum(0, math.inf)
    low = float(sigma.min())
    return Spectrum(int((sigma > rtol * top).sum()), top / low if low > 0 else math.inf)


class System:
    """Least squares K x = b, with K given by its action on x of shape (n, r).

    r right-hand sides share K (the input channels of a gradient-constraint system).
    gram (K^T K) and matrix (K itself) are built on demand unless given.
    """

    def __init__(self, shape, apply, apply_t, rhs, gram=None, matrix=None):
        self.shape, self.apply, self.apply_t, self.rhs = shape, apply, apply_t, rhs
        self._gram, self._matrix = gram, matrix

    @property
    def gram(self):
        if self._gram is None:
            k = self.matrix
            self._gram = k.T @ k
        elif callable(self._gram):
            self._gram = self._gram()
        return self._gram

    @property
    def matrix(self):
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    def residual(self, x):
        """|K x - b| / |b|."""
        return float(torch.linalg.norm(self.apply(x) - self.rhs) / torch.linalg.norm(self.rhs).clamp_min(TINY))

    def refine(self, x, solve_normal):
        """Corrected semi-normal equations: correct x with residuals of K itself, not of K^T K."""
        for _ in range(REFINE_STEPS):
            step = solve_normal(self.apply_t(self.rhs - self.apply(x)))
            x = x + step
            if float(torch.linalg.norm(step)) <= REFINE_STALL * float(torch.linalg.norm(x)) + TINY:
                break
        return x


def norm_2(matrix, iterations=NORM_ITERATIONS):
    """The largest singular value of a small dense matrix, by power iteration."""
    v = matrix.new_ones(matrix.shape[1], 1)
    norm = 0.0
    for _ in range(iterations):
        v = matrix.T @ (matrix @ v)
        norm = float(torch.linalg.norm(v))
        if norm == 0:
            return 0.0
        v = v / norm
    return math.sqrt(norm)


def power_estimates(n, like, apply_gram, solve_gram, iterations=EXTREME_ITERATIONS):
    """Largest and smallest eigenvalue of K^T K by power and inverse iteration; None if they break down."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    start = torch.randn(n, 1, dtype=like.dtype, device=like.device, generator=generator)
    largest, inverse_largest = 0.0, 0.0
    v, u = start, start.clone()
    for _ in range(iterations):
        v = apply_gram(v)
        largest = float(torch.linalg.norm(v))
        u = solve_gram(u)
        inverse_largest = float(torch.linalg.norm(u))
        if not (math.isfinite(largest) and math.isfinite(inverse_largest)) or largest == 0 or inverse_largest == 0:
            return None
        v, u = v / largest, u / inverse_largest
    return largest, 1.0 / inverse_largest


def count_below(symmetric, threshold, memory_limit=None):
    """How many eigenvalues of a symmetric matrix lie below `threshold` (Sylvester's law of inertia).

    A torch tensor is counted through its dense LDL^T factor; a scipy sparse matrix through a sparse
    symmetric factorisation, which may not know (None: SuperLU cannot count past a zero pivot).
    """
    import scipy.sparse
    if scipy.sparse.issparse(symmetric):
        from .sparse import SparseFactor
        shifted = scipy.sparse.csr_matrix(symmetric) - threshold * scipy.sparse.identity(symmetric.shape[0],
                                                                                          format="csr")
        factor = SparseFactor(shifted, positive_definite=False, memory_limit=memory_limit)
        return None if factor.failed else factor.negative_eigenvalues()
    n = symmetric.shape[0]
    shifted = symmetric - threshold * torch.eye(n, dtype=symmetric.dtype, device=symmetric.device)
    factor, pivots, _ = torch.linalg.ldl_factor_ex(shifted)
    diagonal = factor.diagonal().cpu().numpy()
    below_diagonal = factor.diagonal(-1).cpu().numpy()
    pivots = pivots.cpu().numpy()
    count, i = 0, 0
    while i < n:
        if pivots[i] < 0 and i + 1 < n:  # a 2x2 block of D
            a, b, c = diagonal[i], below_diagonal[i], diagonal[i + 1]
            determinant = a * c - b * b
            count += 1 if determinant < 0 else (2 if a < 0 else 0)
            i += 2
        else:
            count += int(diagonal[i] < 0)
            i += 1
    return count


class Subspace(NamedTuple):
    """K's smallest right singular directions: a basis S (n, k), K S, and their singular values (ascending)."""

    basis: torch.Tensor
    images: torch.Tensor
    sigma: torch.Tensor


class Factor:
    """A factorisation of K for least squares that resolves singular values K^T K cannot.

    Sparse LU (SuperLU, CPU) or dense LU when K is square, dense QR when it is tall (or, when
    large and given sparse, a Cholesky factor of its sparse Gram matrix with corrected
    semi-normal equations, while K's condition number allows them); when
    K is rank-deficient at the tolerance, a truncated pseudo-inverse instead (SVD of K, or
    the eigenvectors of K^T K for large K, whose rank is then counted no finer than the
    Gram matrix resolves). Reused across images when K depends only on the weights.

    Args:
        matrix: dense K, or a function building it (called only when needed).
        apply, apply_t: K @ v and K^T @ v, when cheaper than the dense products.
        sparse: K as a scipy sparse matrix, for the sparse LU.
        deficient: K is already known to be rank-deficient at the tolerance.
    """

    def __init__(self, shape, rtol, matrix, apply=None, apply_t=None, sparse=None, deficient=False):
        self.shape, self._matrix, self.kind = shape, matrix, None
        self.apply = apply or (lambda v: self.matrix @ v)
        self.apply_t = apply_t or (lambda v: self.matrix.T @ v)
        self._subspace = None
        if not deficient:
            self._factorise(sparse)
        if self.kind is not None:
            self._check_condition(rtol)
        if self.kind is None:
            self._pseudo_inverse(rtol)

    @property
    def matrix(self):
        if callable(self._matrix):
            self._matrix = self._matrix()
        return self._matrix

    def _device(self):
        return self._matrix.device if isinstance(self._matrix, torch.Tensor) else torch.device("cpu")

    def _factorise(self, sparse):
        """LU (sparse or dense) for square K, QR for tall K; kind stays None when that fails."""
        m, n = self.shape
        if m == n and sparse is not None:
            from scipy.sparse.linalg import splu
            try:
                self.splu = splu(sparse.tocsc(), permc_spec="COLAMD")
                self.kind = "splu"
            except RuntimeError:  # exactly singular
                self.kind = None
        elif m > n and sparse is not None and n >= CHOLESKY_MIN_UNKNOWNS:
            gram = torch.from_numpy((sparse.T @ sparse).toarray())
            self.cholesky, info = torch.linalg.cholesky_ex(gram)
            self.kind = "cholesky" if int(info) == 0 else None
            if self.kind is None:
                self._factorise(None)
        elif m >= n:
            if m == n:
                self.lu, self.pivots, _ = torch.linalg.lu_factor_ex(self.matrix)
                diagonal = self.lu.diagonal()
            else:
                self.q, self.r = torch.linalg.qr(self.matrix)
                diagonal = self.r.diagonal()
            if bool(torch.isfinite(diagonal).all()) and bool((diagonal != 0).all()):
                self.kind = "lu" if m == n else "qr"

    def _check_condition(self, rtol):
        """Keep the factorisation only if K's condition number is within the tolerance."""
        n = self.shape[1]
        like = torch.empty(0, dtype=torch.float64, device=self._device())
        estimates = power_estimates(n, like, lambda v: self.apply_t(self.apply(v)), self._solve_gram)
        cond = math.sqrt(estimates[0] / estimates[1]) if estimates and estimates[1] > 0 else math.inf
        if self.kind == "cholesky" and not cond < NORMAL_EQUATIONS_COND:
            self.kind = None  # beyond what semi-normal equations correct: QR decides
            self._factorise(None)
            if self.kind is not None:
                self._check_condition(rtol)
        elif cond < 1.0 / rtol:
            self.spectrum, self.sigma_max = Spectrum(n, cond), math.sqrt(estimates[0])
        else:
            self.kind = None

    def _pseudo_inverse(self, rtol):
        matrix = self.matrix
        if matrix.shape[1] > EIGH_MAX:
            return self._ridge(matrix.T @ matrix, max(rtol, GRAM_RESOLVES))
        self.kind = "svd"
        self.u, sigma, self.vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = sigma > rtol * float(sigma.max().clamp_min(TINY))
        self.sigma = sigma
        self.spectrum, self.sigma_max = spectrum_of(sigma, rtol), float(sigma.max())
        self.spectrum.rank = int(keep.sum())
        self.inverse = torch.where(keep, 1.0 / sigma.clamp_min(TINY), torch.zeros_like(sigma))

    def _ridge(self, gram, cut):
        """Large and rank-deficient: iterated Tikhonov at the cut, with the rank counted exactly by
        Sylvester's law of inertia (an LDL^T factorisation), in a fraction of an eigendecomposition."""
        n = gram.shape[0]
        identity = torch.eye(n, dtype=gram.dtype, device=gram.device)
        estimates = power_estimates(n, gram, lambda v: gram @ v, lambda v: v)
        largest = estimates[0] if estimates else 0.0
        if not largest > 0:  # nothing to solve with: a zero (or non-finite) matrix
            self.kind, self.sigma_max, self.spectrum = "ridge", 0.0, Spectrum(0, math.inf)
            self.ridge = identity
            return
        shift = cut * cut * largest
        self.kind, self.sigma_max = "ridge", math.sqrt(largest)
        self.ridge = torch.linalg.cholesky(gram + shift * identity)
        below = count_below(gram, shift)
        cond = math.inf
        unshifted, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:  # merely ill-conditioned: its smallest eigenvalue is still within reach
            smallest = power_estimates(n, gram, lambda v: gram @ v, lambda v: torch.linalg.solve_triangular(
                unshifted.T, torch.linalg.solve_triangular(unshifted, v, upper=False), upper=True))[1]
            cond = math.sqrt(largest / smallest) if smallest > 0 else math.inf
        self.spectrum = Spectrum(n - below, cond)

    def _splu_solve(self, y, trans="N"):
        array = np.ascontiguousarray(y.detach().cpu().numpy())
        return torch.from_numpy(self.splu.solve(array, trans=trans)).to(y.device)

    def _solve_gram(self, y):
        """(K^T K)^-1 y."""
        if self.kind == "splu":
            return self._splu_solve(self._splu_solve(y, "T"))
        if self.kind == "lu":
            return torch.linalg.lu_solve(self.lu, self.pivots, torch.linalg.lu_solve(
                self.lu, self.pivots, y, adjoint=True))
        if self.kind == "cholesky":
            step = torch.linalg.solve_triangular(self.cholesky, y, upper=False)
            return torch.linalg.solve_triangular(self.cholesky.T, step, upper=True)
        if self.kind == "qr":
            step = torch.linalg.solve_triangular(self.r.T, y, upper=False)
            return torch.linalg.solve_triangular(self.r, step, upper=True)
        if self.kind == "svd":
            return self.vh.T @ (self.inverse[:, None] ** 2 * (self.vh @ y))
        return torch.linalg.solve_triangular(self.ridge.T, torch.linalg.solve_triangular(self.ridge, y, upper=False),
                                             upper=True)

    def least_squares(self, b):
        """The least-squares (minimum-norm when truncated) solution of K x = b."""
        if self.kind == "splu":
            return self._splu_solve(b)
        if self.kind == "lu":
            return torch.linalg.lu_solve(self.lu, self.pivots, b)
        if self.kind == "qr":
            return torch.linalg.solve_triangular(self.r, self.q.T @ b, upper=True)
        if self.kind == "svd":
            return self.vh.T @ (self.inverse[:, None] * (self.u.T @ b))
        return self._solve_gram(self.apply_t(b))

    def solve(self, system):
        """The least-squares solution of `system`, whose K this factorises."""
        x = self.least_squares(system.rhs)
        if self.kind in ("svd", "ridge", "cholesky"):  # LU and QR are backward stable already
            for _ in range(REFINE_STEPS - 1):
                x = x + self.least_squares(system.rhs - system.apply(x))
        return x

    def small_subspace(self, k):
        """The Subspace of K's k smallest right singular directions, by block inverse iteration
        through the factorisation."""
        if self._subspace is None or self._subspace.basis.shape[1] < k:
            if self.kind == "svd":  # the decomposition holds them already
                self._subspace = _subspace_of(self.vh.T[:, torch.argsort(self.sigma)[:k]], self.apply)
            else:
                self._subspace = _smallest_directions(self.shape[1], k, self._solve_gram, self.apply, self._device())
        return self._subspace


def _smallest_directions(n, k, solve_gram, apply, device):
    """The Subspace of K's k smallest right singular directions, by block inverse iteration through
    solve_gram, an (approximate, possibly shifted) (K^T K)^-1."""
    generator = torch.Generator().manual_seed(1)
    basis = torch.randn(n, k, dtype=torch.float64, generator=generator).to(device)
    for _ in range(SUBSPACE_ITERATIONS):
        basis, _ = torch.linalg.qr(solve_gram(basis))
    return _subspace_of(basis, apply)


def _subspace_of(basis, apply):
    """The Subspace spanned by an orthonormal basis, rotated to K's singular directions within it."""
    images = apply(basis)
    left, sigma, right = torch.linalg.svd(images, full_matrices=False)
    order = torch.argsort(sigma)
    return Subspace(basis @ right.T[:, order], left[:, order] * sigma[order], sigma[order])


class Eigen(NamedTuple):
    """K^T K = vectors diag(values) vectors^T, values ascending."""

    values: torch.Tensor
    vectors: torch.Tensor


class Solved(NamedTuple):
    """A solved System: its solution, Spectrum, and `resolve`, which solves the same K for other
    right-hand sides (m, r) with the factorisation already made (no refinement: for the error
    bound's tangents, which need a few digits); eigen: K^T K's Eigen where the solve decomposed it."""

    x: torch.Tensor
    spectrum: Spectrum
    resolve: object
    eigen: Eigen = None


def _diverged(system):
    """What a system returns when its data are not finite: an earlier solve diverged."""
    rhs = system.rhs
    return Solved(torch.full((system.shape[1], rhs.shape[1]), math.nan, dtype=rhs.dtype, device=rhs.device),
                  Spectrum(0, math.inf),
                  lambda b: b.new_full((system.shape[1], b.shape[1]), math.nan))


def _solve_eigh(system, rtol):
    eigenvalues, vectors = torch.linalg.eigh(system.gram)
    sigma = eigenvalues.clamp_min(0).sqrt()
    spectrum = spectrum_of(sigma, rtol)
    if rtol < GRAM_RESOLVES and spectrum.cond > 1.0 / GRAM_RESOLVES:
        return None  # below what K^T K resolves: decide on K itself
    keep = sigma > rtol * float(sigma.max().clamp_min(TINY))
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(TINY), torch.zeros_like(eigenvalues))

    def solve_normal(y):
        return vectors @ (inverse[:, None] * (vectors.T @ y))

    return Solved(system.refine(solve_normal(system.apply_t(system.rhs)), solve_normal), spectrum,
                  lambda rhs: solve_normal(system.apply_t(rhs)), Eigen(eigenvalues, vectors))


def _solve_cholesky(system, rtol):
    factor, info = torch.linalg.cholesky_ex(system.gram)
    if int(info) != 0:
        return None

    def solve_normal(y):
        # two triangular solves: much faster than cholesky_solve for a few right-hand sides
        return torch.linalg.solve_triangular(factor.T, torch.linalg.solve_triangular(factor, y, upper=False),
                                             upper=True)

    n = system.shape[1]
    estimates = power_estimates(n, system.gram, lambda v: system.gram @ v, solve_normal)
    if estimates is None:
        return None
    spectrum = spectrum_of(torch.tensor(estimates, dtype=torch.float64).clamp_min(0).sqrt(), rtol)
    if spectrum.cond > 1.0 / max(rtol, GRAM_RESOLVES):
        return None
    spectrum.rank = n
    return Solved(system.refine(solve_normal(system.apply_t(system.rhs)), solve_normal), spectrum,
                  lambda rhs: solve_normal(system.apply_t(rhs)))


def solve(system, rtol, fast_only=False):
    """Least-squares solution of a System with its Spectrum (numerical rank, condition number).

    Fast paths work on K^T K; when that cannot decide the rank at the gradients'
    precision, K itself is factorised (LU, QR or, if rank-deficient, SVD), unless
    fast_only, which then returns None.
    """
    solved = solve_operator(system, rtol, fast_only)
    return None if solved is None else solved[:2]


def solve_operator(system, rtol, fast_only=False):
    """solve(), as a Solved: the solution, its Spectrum, and the factorisation's `resolve`."""
    if not bool(torch.isfinite(system.rhs).all()):
        return _diverged(system)
    if system.shape[0] == 0:  # no equation at all (weight constraints where every ReLU unit is off)
        return Solved(system.rhs.new_zeros(system.shape[1], system.rhs.shape[1]), Spectrum(0, math.inf),
                      lambda b: b.new_zeros(system.shape[1], b.shape[1]))
    if not bool(torch.isfinite(system.gram).all()):
        return _diverged(system)
    solved = (_solve_eigh if system.shape[1] <= EIGH_MAX else _solve_cholesky)(system, rtol)
    if solved is not None or fast_only:
        return solved
    # K^T K could not decide: at float64 precision K itself may resolve more; at lower precisions
    # K^T K resolves the tolerance, so the system is known to be rank-deficient.
    factor = Factor(system.shape, rtol, lambda: system.matrix, system.apply, system.apply_t,
                    deficient=rtol >= GRAM_RESOLVES and system.shape[1] > EIGH_MAX)
    return Solved(factor.solve(system), factor.spectrum, factor.least_squares)


# Normal equations resolve K's singular values down to about sqrt(eps) of the largest; corrected
# semi-normal equations keep the error near cond(K) * eps while cond(K) stays below this bound.
NORMAL_EQUATIONS_COND = 1e7


class NormalFactor:
    """Least squares with a large sparse K through a sparse factorisation of its Gram matrix K^T K.

    When K^T K is positive definite and K's condition number (power and inverse iteration
    through the factorisation) is within reach, solves are corrected semi-normal equations.
    Otherwise K is rank-deficient at the tolerance: its rank is counted from the inertia of
    K^T K - t I (Sylvester's law), and solves are a ridge (iterated Tikhonov) at the cut t.

    Args:
        gram: K^T K as a scipy sparse matrix; apply, apply_t: K @ v and K^T @ v on tensors (n, r).
        like: a tensor whose dtype and device the solutions take.
        memory_limit: bytes the factorisations may take (a larger one raises sparse.FillTooLarge).
    """

    def __init__(self, gram, apply, apply_t, rtol, like, memory_limit=None):
        from .sparse import SparseFactor
        self.apply, self.apply_t, self.like, self.n = apply, apply_t, like, gram.shape[0]
        cut = max(rtol, 1.0 / NORMAL_EQUATIONS_COND)
        self.factor = SparseFactor(gram, positive_definite=True, memory_limit=memory_limit)
        if not self.factor.failed:
            estimates = power_estimates(self.n, like, lambda v: apply_t(apply(v)), self._solve_gram)
            cond = math.sqrt(estimates[0] / estimates[1]) if estimates and estimates[1] > 0 else math.inf
            if cond < 1.0 / cut:
                self.kind, self.spectrum = "cholesky", Spectrum(self.n, cond)
                self.sigma_max = math.sqrt(estimates[0])
                return
        self._ridge(gram, cut, memory_limit)

    def _ridge(self, gram, cut, memory_limit):
        import scipy.sparse

        from .sparse import SparseFactor
        as_tensor = self._tensor
        estimates = power_estimates(self.n, self.like, lambda v: as_tensor(gram @ v.detach().cpu().numpy()),
                                    lambda v: v)
        largest = estimates[0] if estimates else 0.0
        shift = cut * cut * largest if largest > 0 else 1.0
        below = count_below(gram, shift, memory_limit) if largest > 0 else self.n
        self.kind, self.sigma_max = "ridge", math.sqrt(max(largest, 0.0))
        # SuperLU cannot count past an exactly zero pivot: then at least that one direction is lost
        self.spectrum = Spectrum(self.n - (below if below is not None else 1), math.inf)
        self.factor = SparseFactor(gram + shift * scipy.sparse.identity(self.n, format="csr"),
                                   memory_limit=memory_limit)

    def _tensor(self, array):
        return torch.from_numpy(array).to(dtype=self.like.dtype, device=self.like.device)

    def _solve_gram(self, y):
        """(K^T K)^-1 y (shifted by the ridge when rank-deficient)."""
        return self._tensor(self.factor.solve(y.detach().cpu().numpy()))

    def least_squares(self, b):
        """One solve of K x = b through the factorisation (a single Tikhonov step when rank-deficient)."""
        return self._solve_gram(self.apply_t(b))

    def small_subspace(self, k):
        """The Subspace of K's k smallest right singular directions (block inverse iteration)."""
        return _smallest_directions(self.n, k, self._solve_gram, self.apply, self.like.device)

    def solve(self, system):
        """The least-squares (ridge when rank-deficient) solution of `system`, whose K this factorises."""
        x = self._solve_gram(system.apply_t(system.rhs))
        if self.kind == "cholesky":
            return system.refine(x, self._solve_gram)
        for _ in range(REFINE_STEPS - 1):  # iterated Tikhonov: towards the minimum-norm solution
            x = x + self._solve_gram(system.apply_t(system.rhs - system.apply(x)))
        return x


def cg_least_squares(system, iterations):
    """The minimum-norm least-squares solution of a System, approximately, by CGLS from zero.

    Matrix-free and cheap (two products with K per step): for systems known to be
    underdetermined, whose exact solution would not be the truth anyway.
    """
    x = system.rhs.new_zeros(system.shape[1], system.rhs.shape[1])
    residual = system.rhs.clone()
    direction = system.apply_t(residual)
    gradient, energy = direction, float((direction * direction).sum())
    for _ in range(iterations):
        if energy <= TINY:
            break
        image = system.apply(direction)
        step = energy / max(float((image * image).sum()), TINY)
        x, residual = x + step * direction, residual - step * image
        gradient = system.apply_t(residual)
        energy, previous = float((gradient * gradient).sum()), energy
        direction = gradient + (energy / previous) * direction
    return x
