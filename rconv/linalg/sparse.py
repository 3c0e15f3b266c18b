"""Sparse direct factorisations of symmetric matrices: Intel MKL PARDISO, else SciPy's SuperLU.

The large normal equations of high-resolution layers (150,528 unknowns at 224 px) need a
fill-reducing nested-dissection ordering: measured on this project's 2-core machine, PARDISO
factorises the 224-px first layer's M^T M in 2.9 s and 2.4 GB, MUMPS in 5.3 s, SuperLU with a
nested-dissection ordering in 24 s and 6.1 GB, CHOLMOD (cholespy) in 86 s. PARDISO comes with
the `mkl` wheel (x86-64); elsewhere SuperLU in symmetric mode takes over, slower but exact.

Both give the inertia of the factorised matrix (how many eigenvalues are negative), which
counts the numerical rank of a Gram matrix K^T K exactly by Sylvester's law: the eigenvalues
below t are the negative ones of K^T K - t I.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import sys
from functools import lru_cache

import numpy as np

from ..common.errors import RConvError

# PARDISO's matrix types (Intel's numbering) and phases.
_SPD, _SYMMETRIC_INDEFINITE = 2, -2
_ANALYSE, _FACTORISE, _SOLVE, _RELEASE = 11, 22, 33, -1
_ZERO_PIVOT, _NO_MEMORY = -4, -2
# iparm entries, 1-based as in Intel's documentation.
_USER_SETTINGS, _ORDERING, _REFINEMENT_STEPS, _PERTURBATION, _SCALING = 1, 2, 8, 10, 11
_MATCHING, _PEAK_ANALYSIS_KB, _PERMANENT_KB, _FACTOR_KB, _PIVOTING = 13, 15, 16, 17, 21
_POSITIVE, _NEGATIVE, _ZERO_BASED = 22, 23, 35
_METIS = 2
# Symmetric indefinite factorisations perturb pivots below 10^-8 of the matrix norm (PARDISO's default).
_PERTURBATION_EXPONENT = 8
_KB = 1024


class FillTooLarge(MemoryError):
    """A factorisation refused before it was allocated: `need` bytes, more than its memory limit.

    A MemoryError of its own kind, so that callers can tell a predicted refusal (which a cheaper
    solver may take over) from an allocation that actually failed.
    """

    def __init__(self, need):
        super().__init__(need)
        self.need = need


@lru_cache(maxsize=1)
def _mkl_pardiso():
    """PARDISO from the MKL runtime library (the `mkl` wheel), or None where it is not installed."""
    candidates = [ctypes.util.find_library("mkl_rt")]
    candidates += sorted(glob.glob(f"{sys.prefix}/lib*/libmkl_rt.so*") + glob.glob(f"{sys.prefix}/Library/bin/mkl_rt*.dll"),
                         key=len)
    for path in filter(None, candidates):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        function = library.pardiso
        integer = ctypes.POINTER(ctypes.c_int32)
        function.argtypes = [ctypes.POINTER(ctypes.c_int64), integer, integer, integer, integer, integer,
                             ctypes.c_void_p, integer, integer, integer, integer, integer, integer,
                             ctypes.c_void_p, ctypes.c_void_p, integer]
        function.restype = None
        return function
    return None


def backend():
    """The sparse direct solver in use: "pardiso" (MKL) or "superlu" (SciPy)."""
    return "pardiso" if _mkl_pardiso() is not None else "superlu"


class _Pardiso:
    """One PARDISO factorisation of a symmetric matrix given by its upper triangle (CSR)."""

    def __init__(self, upper, mtype, memory_limit):
        self.n, self.mtype = upper.shape[0], mtype
        self.handle = np.zeros(64, dtype=np.int64)
        self.iparm = np.zeros(64, dtype=np.int32)
        self.iparm[[_USER_SETTINGS - 1, _ORDERING - 1, _ZERO_BASED - 1]] = 1, _METIS, 1
        if mtype == _SYMMETRIC_INDEFINITE:
            self.iparm[[_PERTURBATION - 1, _PIVOTING - 1]] = _PERTURBATION_EXPONENT, 1
        self.iparm[_REFINEMENT_STEPS - 1] = 0  # refinement happens outside, with residuals of K itself
        self.data = np.ascontiguousarray(upper.data, dtype=np.float64)
        self.indptr = np.ascontiguousarray(upper.indptr, dtype=np.int32)
        self.indices = np.ascontiguousarray(upper.indices, dtype=np.int32)
        self.failed = self._call(_ANALYSE) != 0
        if self.failed:
            return
        need = max(int(self.iparm[_PEAK_ANALYSIS_KB - 1]),
                   int(self.iparm[_PERMANENT_KB - 1]) + int(self.iparm[_FACTOR_KB - 1])) * _KB
        if memory_limit is not None and need > memory_limit:
            self.release()
            raise FillTooLarge(need)
        error = self._call(_FACTORISE)
        if error == _NO_MEMORY:
            self.release()
            raise FillTooLarge(need)
        self.failed = error != 0

    def _call(self, phase, b=None):
        x = None
        if b is not None:
            x = np.zeros_like(b)
        error = ctypes.c_int32(0)
        one = ctypes.c_int32(1)
        nrhs = ctypes.c_int32(1 if b is None or b.ndim == 1 else b.shape[1])
        _mkl_pardiso()(self.handle.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), ctypes.byref(one),
                       ctypes.byref(one), ctypes.byref(ctypes.c_int32(self.mtype)),
                       ctypes.byref(ctypes.c_int32(phase)), ctypes.byref(ctypes.c_int32(self.n)),
                       self.data.ctypes.data, self.indptr.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
                       self.indices.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), None, ctypes.byref(nrhs),
                       self.iparm.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), ctypes.byref(ctypes.c_int32(0)),
                       None if b is None else b.ctypes.data, None if x is None else x.ctypes.data,
                       ctypes.byref(error))
        self.result = x
        return error.value

    def solve(self, b):
        b = np.asfortranarray(b, dtype=np.float64)
        error = self._call(_SOLVE, b)
        if error == _NO_MEMORY:  # its workspace did not fit: the caller names the layer it was solving
            raise MemoryError("PARDISO had no memory left to apply its factorisation")
        if error != 0:
            raise RConvError(f"the sparse solver failed to apply its factorisation (PARDISO error {error})")
        return np.ascontiguousarray(self.result)

    def negative_eigenvalues(self):
        return int(self.iparm[_NEGATIVE - 1])

    def release(self):
        if self.handle.any():
            self._call(_RELEASE)
            self.handle[:] = 0

    def __del__(self):
        try:
            self.release()
        except Exception:  # the interpreter may be shutting down; the memory goes with the process
            pass


class _SuperLU:
    """SuperLU in symmetric mode (symmetric ordering, diagonal pivots): U's diagonal is LDL^T's D."""

    def __init__(self, matrix, positive_definite):
        from scipy.sparse.linalg import splu
        try:
            self.lu = splu(matrix.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                           options=dict(SymmetricMode=True))
            diagonal = self.lu.U.diagonal()
            self.negatives = int((diagonal < 0).sum())
            self.failed = not np.isfinite(diagonal).all() or (positive_definite and self.negatives > 0)
        except RuntimeError:  # an exactly zero pivot
            self.failed, self.negatives = True, None

    def solve(self, b):
        return self.lu.solve(np.ascontiguousarray(b, dtype=np.float64))

    def negative_eigenvalues(self):
        return self.negatives


def _upper_with_diagonal(matrix):
    """The upper triangle (CSR, sorted) with every diagonal entry stored, zeros included: PARDISO reads a symmetric
    matrix's diagonal from its structure, and one left out crashed it (a layer with pixels no kernel position
    reaches has empty rows in its Gram matrix: a segmentation fault in the analysis)."""
    import scipy.sparse
    upper = scipy.sparse.triu(matrix, format="coo")
    diagonal = np.arange(matrix.shape[0])
    upper = scipy.sparse.coo_matrix((np.concatenate([upper.data, np.zeros(len(diagonal))]),
                                     (np.concatenate([upper.row, diagonal]), np.concatenate([upper.col, diagonal]))),
                                    shape=matrix.shape).tocsr()  # duplicates summed, explicit zeros kept
    upper.sort_indices()
    return upper


class SparseFactor:
    """A factorisation of a sparse symmetric matrix (scipy), to solve with it and read its inertia.

    positive_definite: factorise as SPD (fails, with `failed` set, when it is not), else as
    symmetric indefinite with Bunch-Kaufman pivoting (never fails for a nonsingular matrix).
    memory_limit: bytes the factorisation may take; a larger one raises FillTooLarge(bytes)
    before it is allocated (PARDISO predicts it in its analysis; SuperLU cannot).
    """

    def __init__(self, matrix, positive_definite=True, memory_limit=None):
        import scipy.sparse
        matrix = scipy.sparse.csr_matrix(matrix)
        if _mkl_pardiso() is not None:
            self._factor = _Pardiso(_upper_with_diagonal(matrix), _SPD if positive_definite else _SYMMETRIC_INDEFINITE,
                                    memory_limit)
        else:
            self._factor = _SuperLU(matrix, positive_definite)
        self.failed = self._factor.failed

    def solve(self, b):
        """matrix^-1 b for a numpy array b of shape (n,) or (n, r)."""
        return self._factor.solve(b)

    def negative_eigenvalues(self):
        """How many eigenvalues of the factorised matrix are negative (None if unknown)."""
        return self._factor.negative_eigenvalues()
