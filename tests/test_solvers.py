"""rconv.linalg.solvers: least squares with an honest numerical rank (solve, Factor, spectrum_of, count_below),
checked against numpy's lstsq, matrix_rank and eigvalsh on matrices whose answers are known."""
import math

import numpy as np
import pytest
import scipy.sparse
import torch

import rconv.linalg.solvers
import rconv.linalg.sparse
from rconv.linalg.solvers import Factor, System, count_below, rank_rtol, solve, spectrum_of

RTOL = rank_rtol(torch.float64, (60, 40))


def random_matrix(rows, columns, seed=0, rank=None):
    """A float64 matrix of the given rank (full by default) with singular values between 1 and 10."""
    generator = np.random.default_rng(seed)
    left, _ = np.linalg.qr(generator.standard_normal((rows, rows)))
    right, _ = np.linalg.qr(generator.standard_normal((columns, columns)))
    rank = min(rows, columns) if rank is None else rank
    sigma = np.zeros((rows, columns))
    sigma[np.arange(rank), np.arange(rank)] = np.linspace(10, 1, rank)
    return left @ sigma @ right.T


def system_of(matrix, rhs):
    k, b = torch.from_numpy(matrix), torch.from_numpy(rhs)
    return System(tuple(k.shape), lambda v: k @ v, lambda v: k.T @ v, b, matrix=k)


def rhs_for(matrix, columns=2, seed=1):
    return np.random.default_rng(seed).standard_normal((matrix.shape[0], columns))


# ---------------------------------------------------------------------------------------------------------
# spectrum_of

def test_spectrum_of_counts_the_singular_values_above_the_cut_in_any_order():
    spectrum = spectrum_of(torch.tensor([1e-9, 4.0, 2.0, 1e-20]), rtol=1e-6)
    assert spectrum.rank == 2 and spectrum.cond == pytest.approx(4.0 / 1e-20)
    assert spectrum_of(torch.tensor([2.0, 0.5]), rtol=1e-6) == rconv.linalg.solvers.Spectrum(2, 4.0)


def test_spectrum_of_an_exactly_singular_or_zero_matrix():
    assert spectrum_of(torch.tensor([3.0, 0.0]), rtol=1e-6).cond == math.inf
    assert spectrum_of(torch.tensor([3.0, 0.0]), rtol=1e-6).rank == 1
    assert spectrum_of(torch.zeros(3), rtol=1e-6) == rconv.linalg.solvers.Spectrum(0, math.inf)
    assert spectrum_of(torch.zeros(0), rtol=1e-6) == rconv.linalg.solvers.Spectrum(0, math.inf)


# ---------------------------------------------------------------------------------------------------------
# solve

@pytest.mark.parametrize("path", ["eigh", "cholesky"])
def test_solve_a_full_rank_system_as_numpy_does(path, monkeypatch):
    if path == "cholesky":  # the path of large systems, taken here by a small one
        monkeypatch.setattr(rconv.linalg.solvers, "EIGH_MAX", 10)
    matrix, rhs = random_matrix(60, 40), rhs_for(random_matrix(60, 40))
    x, spectrum = solve(system_of(matrix, rhs), RTOL)
    expected = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    assert np.abs(x.numpy() - expected).max() <= 1e-12 * np.abs(expected).max()
    # the eigh path's condition number is exact; the Cholesky path's is estimated by a dozen power iterations
    assert spectrum.rank == 40 and spectrum.cond == pytest.approx(np.linalg.cond(matrix), rel=2e-2)


@pytest.mark.parametrize("path", ["eigh", "ridge"])
def test_solve_a_rank_deficient_system_gives_its_rank_and_the_minimum_norm_solution(path, monkeypatch):
    if path == "ridge":  # large and rank-deficient: iterated Tikhonov, rank counted by inertia
        monkeypatch.setattr(rconv.linalg.solvers, "EIGH_MAX", 10)
    matrix = random_matrix(60, 40, rank=25)
    assert np.linalg.matrix_rank(matrix) == 25
    rhs = rhs_for(matrix)
    x, spectrum = solve(system_of(matrix, rhs), RTOL)
    assert spectrum.rank == 25 and spectrum.cond > 1 / RTOL
    expected = np.linalg.lstsq(matrix, rhs, rcond=None)[0]  # the minimum-norm least-squares solution
    row_space = np.linalg.svd(matrix)[2][:25].T
    error = x.numpy() - expected
    along = row_space @ (row_space.T @ error)
    assert np.abs(along).max() <= 1e-12 * np.abs(expected).max()
    # the ridge's shift (1e-12 of the largest eigenvalue) lets rounding into the null directions,
    # amplified up to eps / 1e-12; the SVD truncates them
    across = {"eigh": 1e-12, "ridge": 1e-3}[path]
    assert np.abs(error - along).max() <= across * np.abs(expected).max()


def test_solve_a_consistent_system_recovers_its_solution():
    matrix = random_matrix(50, 30, seed=4)
    truth = np.random.default_rng(5).standard_normal((30, 3))
    x, spectrum = solve(system_of(matrix, matrix @ truth), RTOL)
    assert spectrum.rank == 30 and np.abs(x.numpy() - truth).max() <= 1e-12
    assert system_of(matrix, matrix @ truth).residual(x) <= 1e-14


def test_solve_with_no_equations_or_diverged_data():
    empty = System((0, 4), None, None, torch.zeros(0, 2, dtype=torch.float64))
    x, spectrum = solve(empty, RTOL)
    assert torch.equal(x, torch.zeros(4, 2, dtype=torch.float64)) and spectrum.rank == 0
    matrix = random_matrix(6, 4)
    rhs = rhs_for(matrix)
    rhs[0, 0] = np.nan
    x, spectrum = solve(system_of(matrix, rhs), RTOL)
    assert x.shape == (4, 2) and bool(torch.isnan(x).all()) and spectrum.rank == 0


def test_solve_fast_only_gives_up_where_the_gram_matrix_cannot_decide():
    matrix = random_matrix(30, 20, rank=12)
    assert solve(system_of(matrix, rhs_for(matrix)), RTOL, fast_only=True) is None


# ---------------------------------------------------------------------------------------------------------
# Factor

@pytest.mark.parametrize("rows,kind", [(40, "lu"), (60, "qr")])
def test_factor_of_a_determined_matrix(rows, kind):
    matrix = random_matrix(rows, 40, seed=rows)
    rhs = rhs_for(matrix)
    factor = Factor(matrix.shape, RTOL, torch.from_numpy(matrix))
    assert factor.kind == kind and factor.spectrum.rank == 40
    assert factor.spectrum.cond == pytest.approx(np.linalg.cond(matrix), rel=2e-2)  # estimated by power iteration
    expected = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    assert np.abs(factor.solve(system_of(matrix, rhs)).numpy() - expected).max() <= 1e-12 * np.abs(expected).max()


def test_factor_of_a_sparse_square_matrix_uses_its_lu():
    matrix = random_matrix(30, 30, seed=2)
    rhs = rhs_for(matrix)
    factor = Factor(matrix.shape, RTOL, torch.from_numpy(matrix), sparse=scipy.sparse.csr_matrix(matrix))
    assert factor.kind == "splu" and factor.spectrum.rank == 30
    assert np.abs(factor.least_squares(torch.from_numpy(rhs)).numpy() - np.linalg.solve(matrix, rhs)).max() <= 1e-12


@pytest.mark.parametrize("shape", [(40, 40), (60, 40), (30, 40)])
def test_factor_of_a_rank_deficient_matrix_truncates(shape):
    matrix = random_matrix(*shape, seed=3, rank=17)
    rhs = rhs_for(matrix)
    factor = Factor(matrix.shape, RTOL, torch.from_numpy(matrix))
    assert factor.kind == "svd" and factor.spectrum.rank == 17 == np.linalg.matrix_rank(matrix)
    expected = np.linalg.lstsq(matrix, rhs, rcond=None)[0]
    assert np.abs(factor.solve(system_of(matrix, rhs)).numpy() - expected).max() <= 1e-10 * np.abs(expected).max()


def test_factor_small_subspace_holds_the_null_directions():
    matrix = random_matrix(30, 20, seed=6, rank=18)
    factor = Factor(matrix.shape, RTOL, torch.from_numpy(matrix))
    subspace = factor.small_subspace(2)
    assert subspace.basis.shape == (20, 2) and float(subspace.sigma.max()) <= 1e-12
    assert float((torch.from_numpy(matrix) @ subspace.basis).abs().max()) <= 1e-12


# ---------------------------------------------------------------------------------------------------------
# count_below: dense (LDL^T) and sparse (PARDISO or SuperLU) inertia

def symmetric(n, seed, indefinite):
    generator = np.random.default_rng(seed)
    if indefinite:  # eigenvalues of both signs, well apart, in a random basis
        basis, _ = np.linalg.qr(generator.standard_normal((n, n)))
        return basis @ np.diag(np.linspace(-5, 5, n) + 0.05) @ basis.T
    factor = generator.standard_normal((n + 10, n))
    return factor.T @ factor  # symmetric positive definite


@pytest.mark.parametrize("indefinite", [False, True], ids=["definite", "indefinite"])
def test_count_below_a_dense_tensor_agrees_with_eigvalsh(indefinite):
    matrix = symmetric(30, 0, indefinite)
    eigenvalues = np.linalg.eigvalsh(matrix)
    for threshold in (eigenvalues[0] - 1, eigenvalues[0] / 2 if not indefinite else -2.0,
                      (eigenvalues[7] + eigenvalues[8]) / 2, np.median(eigenvalues), 2 * abs(eigenvalues[-1])):
        assert count_below(torch.from_numpy(matrix), threshold) == int((eigenvalues < threshold).sum())


def test_count_below_gives_the_rank_of_a_gram_matrix():
    matrix = random_matrix(30, 20, seed=7, rank=13)
    gram = torch.from_numpy(matrix.T @ matrix)  # eigenvalues 1..100 and seven zeros
    assert 20 - count_below(gram, 1e-6) == 13 == np.linalg.matrix_rank(matrix)
    assert 20 - count_below(scipy.sparse.csr_matrix(gram.numpy()), 1e-6) == 13


@pytest.mark.parametrize("backend", ["pardiso", "superlu"])
def test_count_below_agrees_with_a_dense_eigenvalue_count(backend, monkeypatch):
    if backend == "superlu":
        monkeypatch.setattr(rconv.linalg.sparse, "_mkl_pardiso", lambda: None)
    elif rconv.linalg.sparse.backend() != "pardiso":
        pytest.skip("MKL's PARDISO is not installed here")
    generator = np.random.default_rng(0)
    factor = generator.standard_normal((40, 30))
    matrix = factor.T @ factor  # symmetric positive definite, eigenvalues well apart
    eigenvalues = np.linalg.eigvalsh(matrix)
    for threshold in (eigenvalues[0] / 2, 1.01 * eigenvalues[5], np.median(eigenvalues), 2 * eigenvalues[-1]):
        assert rconv.linalg.solvers.count_below(scipy.sparse.csr_matrix(matrix), threshold) == \
            int((eigenvalues < threshold).sum())


@pytest.mark.parametrize("backend", ["pardiso", "superlu"])
def test_count_below_a_sparse_indefinite_matrix(backend, monkeypatch):
    if backend == "superlu":
        monkeypatch.setattr(rconv.linalg.sparse, "_mkl_pardiso", lambda: None)
    elif rconv.linalg.sparse.backend() != "pardiso":
        pytest.skip("MKL's PARDISO is not installed here")
    matrix = symmetric(25, 1, indefinite=True)
    eigenvalues = np.linalg.eigvalsh(matrix)
    for threshold in (-6.0, -1.03, 0.0, 2.51, 6.0):
        assert count_below(scipy.sparse.csr_matrix(matrix), threshold) == int((eigenvalues < threshold).sum())
