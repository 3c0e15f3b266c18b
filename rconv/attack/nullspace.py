"""A gradient-constraint matrix's null space, and the completion of its minimum-norm solution within it.

When a large layer's gradient constraints A x[c] = dL/dW[:, c] leave a small null space, the weight
constraints need only determine the coordinates there: a dense system of that null space's size,
instead of the whole stacked system (systems.complete_gradients, batch_steps).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..linalg.solvers import TINY, Factor, Spectrum, System, eps, rank_rtol

# A completion's condition number is this many times the amplification one random probe measures:
# a random direction sees the average amplification, the worst one can be a few times larger.
_PROBE_MARGIN = 10.0
# Passes of the completion: the second corrects the first with the residuals of both systems.
_COMPLETION_PASSES = 2


class _PseudoInverse(NamedTuple):
    """One block of A (whole A, or one residue class) by its kept singular triplets."""

    rows: object  # the block's rows of A (a slice or an index tensor)
    columns: torch.Tensor
    scaled_left: torch.Tensor  # U_r / sigma_r
    right: torch.Tensor  # V_r

    def apply(self, rhs):
        """x[columns] = V_r (U_r / sigma_r)^T b[rows]."""
        return self.right @ (self.scaled_left.T @ rhs[self.rows])


class NullSpace(NamedTuple):
    """A gradient-constraint matrix A's SVD, block by block (whole A, or its residue classes): its
    minimum-norm solve and the null space it leaves to the weight constraints."""

    blocks: list  # a _PseudoInverse per block
    basis: torch.Tensor  # (columns of A, d) orthonormal: A basis = 0 at the gradients' precision
    rank: int
    cond: float  # of A's kept part, the largest over its blocks

    def least_squares(self, rhs):
        """A's minimum-norm least-squares solution for each column of rhs (rows, r)."""
        x = rhs.new_zeros(self.basis.shape[0], rhs.shape[1])
        for block in self.blocks:
            x[block.columns] = block.apply(rhs)
        return x


def null_space(matrix, dtype, classes=None):
    """The NullSpace of a dense A (rows, columns), block by block over `classes` (ResidueClasses), else whole."""
    rtol = rank_rtol(dtype, matrix.shape)
    blocks, null, rank, cond = [], [], 0, 0.0
    for residue in classes or [None]:
        block = matrix if residue is None else matrix[residue.rows][:, residue.pixels]
        columns = torch.arange(matrix.shape[1], device=matrix.device) if residue is None else residue.pixels
        left, sigma, right = torch.linalg.svd(block, full_matrices=True)
        top = float(sigma.max()) if sigma.numel() else 0.0
        kept = int((sigma > rtol * top).sum()) if top > 0 else 0
        blocks.append(_PseudoInverse(slice(None) if residue is None else residue.rows, columns,
                                     left[:, :kept] / sigma[:kept], right[:kept].T))
        directions = right[kept:].T  # every right singular direction past the rank, a wide block's included
        embedded = directions.new_zeros(matrix.shape[1], directions.shape[1])
        embedded[columns] = directions
        null.append(embedded)
        rank += kept
        cond = max(cond, float(sigma[0] / sigma[kept - 1]) if kept else math.inf)
    return NullSpace(blocks, torch.cat(null, dim=1), rank, cond)


def null_images(weights, basis, known):
    """M (e_c (x) n_j)[known] for every channel c and null direction n_j (columns of basis, (H*W, d)), as
    (known rows, C*d): one single-channel convolution of the directions with every (filter, channel) kernel."""
    filters, channels = weights.weight.shape[:2]
    directions = basis.shape[1]
    if directions == 0:
        return basis.new_zeros(int(known.sum()), 0)
    kernels = weights.weight.reshape(filters * channels, 1, *weights.weight.shape[2:])
    images = torch.nn.functional.conv2d(basis.T.reshape(directions, 1, *weights.input_shape[1:]), kernels,
                                        stride=weights.stride, padding=weights.padding)
    out = images.reshape(directions, filters, channels, -1)  # (d, F, C, P*Q)
    return out.permute(1, 3, 2, 0).reshape(filters * out.shape[3], channels * directions)[known]


class Completion(NamedTuple):
    """x = x_A + N z: the gradient constraints' minimum-norm solution, completed in their null space."""

    x: torch.Tensor  # (C, columns of A)
    spectrum: Spectrum  # rank and condition number of the stacked system
    residual: float  # the larger relative residual of the two kinds of constraint
    fit: object = None  # fit(gradient_rhs (rows, C), weight_rhs (known rows, 1)) -> x: the same completion of other data


def complete(null, gradients, weights, images, dtype):
    """Complete A's minimum-norm solution within its null space from the known weight rows.

    gradients: (apply, rhs) with apply(x (C, columns)) -> (rows, C); weights: (apply, rhs) with
    apply(x) -> (known rows, 1); images: the weight rows on the null space (null_images). The
    rank is exact: rank [I (x) A; B] = C rank A + rank (B N). The condition number is measured:
    how much a probe of rounding-sized noise on both right-hand sides moves x (see _PROBE_MARGIN).
    """
    (apply_gradients, gradient_rhs), (apply_weights, weight_rhs) = gradients, weights
    # An empty null space leaves nothing to complete: the weight rows only check A's solution.
    reduced = Factor(tuple(images.shape), rank_rtol(dtype, images.shape), images) if images.shape[1] else None

    def fit(gradient_target, weight_target):
        x = gradient_target.new_zeros(gradient_target.shape[1], null.basis.shape[0])
        for _ in range(_COMPLETION_PASSES):
            x += null.least_squares(gradient_target - apply_gradients(x)).T
            if reduced is None:
                continue
            misfit = weight_target - apply_weights(x)
            z = reduced.solve(System(tuple(images.shape), lambda v: images @ v, lambda y: images.T @ y, misfit))
            x += z.view(x.shape[0], -1) @ null.basis.T
        return x

    x = fit(gradient_rhs, weight_rhs)
    residual = max(_relative(apply_gradients(x), gradient_rhs), _relative(apply_weights(x), weight_rhs))
    generator = torch.Generator().manual_seed(0)
    probe = fit(gradient_rhs + _rounding_noise(gradient_rhs, dtype, generator),
                weight_rhs + _rounding_noise(weight_rhs, dtype, generator))
    amplification = float(torch.linalg.norm(probe - x) / (torch.linalg.norm(x).clamp_min(TINY) * eps(dtype)))
    spectrum = reduced.spectrum if reduced is not None else Spectrum(0, 1.0)
    rank = null.rank * gradient_rhs.shape[1] + spectrum.rank
    return Completion(x, Spectrum(rank, max(null.cond, spectrum.cond, _PROBE_MARGIN * amplification)), residual, fit)


def _rounding_noise(target, dtype, generator):
    """Gaussian noise of relative size eps(dtype) against target."""
    noise = torch.randn(target.shape, dtype=target.dtype, generator=generator).to(target.device)
    return noise * (eps(dtype) * float(torch.linalg.norm(target)) / float(torch.linalg.norm(noise).clamp_min(TINY)))


def _relative(value, target):
    return float(torch.linalg.norm(value - target) / torch.linalg.norm(target).clamp_min(TINY))
