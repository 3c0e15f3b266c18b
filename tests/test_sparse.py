"""rconv.linalg.sparse: SparseFactor (MKL PARDISO, else SciPy's SuperLU) solves as a dense solve does and reads
the inertia of the matrix it factorises."""
import numpy as np
import pytest
import scipy.sparse

import rconv.linalg.sparse
from rconv.linalg.sparse import SparseFactor

BACKENDS = ["pardiso", "superlu"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each sparse solver in turn: SuperLU by hiding PARDISO (its lookup is cached: the module's name is replaced)."""
    if request.param == "superlu":
        monkeypatch.setattr(rconv.linalg.sparse, "_mkl_pardiso", lambda: None)
    elif rconv.linalg.sparse.backend() != "pardiso":
        pytest.skip("MKL's PARDISO is not installed here")
    assert rconv.linalg.sparse.backend() == request.param
    return request.param


def banded(n, seed, shift):
    """A sparse symmetric matrix: a random band of half-width 3, shifted by `shift` times the identity."""
    generator = np.random.default_rng(seed)
    dense = np.zeros((n, n))
    for offset in range(4):
        values = generator.standard_normal(n - offset)
        dense += np.diag(values, offset) + (np.diag(values, -offset) if offset else 0)
    return scipy.sparse.csr_matrix(dense + shift * np.eye(n))


def test_a_positive_definite_solve_is_the_dense_one(backend):
    matrix = banded(200, 0, shift=0.0)
    matrix = matrix @ matrix + scipy.sparse.identity(200)  # positive definite, still sparse
    rhs = np.random.default_rng(1).standard_normal((200, 3))
    factor = SparseFactor(matrix, positive_definite=True)
    assert not factor.failed and factor.negative_eigenvalues() == 0
    expected = np.linalg.solve(matrix.toarray(), rhs)
    assert np.abs(factor.solve(rhs) - expected).max() <= 1e-10 * np.abs(expected).max()
    assert np.abs(factor.solve(rhs[:, 0]) - expected[:, 0]).max() <= 1e-10 * np.abs(expected).max()


def test_an_indefinite_solve_is_the_dense_one_and_counts_its_negative_eigenvalues(backend):
    matrix = banded(150, 2, shift=0.3)
    eigenvalues = np.linalg.eigvalsh(matrix.toarray())
    assert eigenvalues.min() < 0 < eigenvalues.max() and np.abs(eigenvalues).min() > 1e-3
    rhs = np.random.default_rng(3).standard_normal(150)
    factor = SparseFactor(matrix, positive_definite=False)
    assert not factor.failed
    assert factor.negative_eigenvalues() == int((eigenvalues < 0).sum())
    expected = np.linalg.solve(matrix.toarray(), rhs)
    assert np.abs(factor.solve(rhs) - expected).max() <= 1e-8 * np.abs(expected).max()


def test_an_indefinite_matrix_fails_as_positive_definite(backend):
    assert SparseFactor(banded(100, 4, shift=0.0), positive_definite=True).failed


def test_pardiso_refuses_a_factorisation_beyond_the_memory_limit(backend):
    if backend != "pardiso":
        pytest.skip("only PARDISO predicts its memory before factorising")
    matrix = banded(2000, 5, shift=20.0)
    with pytest.raises(MemoryError) as raised:
        SparseFactor(matrix, memory_limit=1000)
    assert raised.value.args[0] > 1000, "the error says how many bytes the factorisation needs"


def test_a_gram_matrix_with_empty_rows_is_refused_as_singular_not_crashed_on(backend):
    """Unknowns that no equation reads leave their rows of K^T K empty, their diagonal entries not even stored
    (PARDISO's analysis crashed the process on the last two such rows); the SPD factorisation fails, and the
    indefinite one of K^T K - t I counts them as the eigenvalues below t."""
    gram = banded(50, 2, shift=0.0)
    gram = (gram @ gram + scipy.sparse.identity(50)).tolil()
    gram[48:, :] = 0.0
    gram[:, 48:] = 0.0
    gram = gram.tocsr()
    gram.eliminate_zeros()
    assert gram[48:].nnz == 0
    assert SparseFactor(gram, positive_definite=True).failed
    shifted = SparseFactor(gram - 1e-6 * scipy.sparse.identity(50), positive_definite=False)
    assert not shifted.failed and shifted.negative_eigenvalues() == 2
