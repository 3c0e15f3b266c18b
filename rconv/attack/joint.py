"""A conv layer's two kinds of constraint stacked into one least-squares system on its input.

The gradient constraints A x[c] = dL/dW[:, c] of every channel and the weight constraints M x = O - b at
the known outputs, each kind scaled to unit Frobenius norm so that neither dominates; applied as
convolutions, or built densely or sparsely on demand.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..linalg.solvers import System

# Layers with at most this many unknowns (a 64x64 greyscale image) are solved densely; beyond it
# a dense system would take minutes and gigabytes, and the sparse normal equations take over.
DENSE_MAX_UNKNOWNS = 4096


class _Block(NamedTuple):
    """One kind of constraint in a stacked system, scaled by `scale`."""

    scale: float
    apply: object
    apply_t: object
    rhs: torch.Tensor
    gram: object  # builds K^T K of the block
    matrix: object  # builds K of the block


def hybrid_scales(equations):
    # Each kind of constraint is scaled to unit Frobenius norm so that neither dominates. A kind
    # that offers no equation at all (every ReLU unit off) keeps scale 1: scaling zero up would
    # overflow its Gram matrix into NaN instead of reporting rank 0.
    gradients = equations.gradients
    frobenius = float(torch.linalg.norm(gradients.matrix)) if equations.unknowns <= DENSE_MAX_UNKNOWNS \
        else gradients.frobenius()
    grad_norm = math.sqrt(equations.channels) * frobenius
    weight_norm = float(equations.weights.row_norms[equations.known].sum().sqrt())
    return (1.0 / grad_norm if grad_norm > 0 else 1.0), (1.0 / weight_norm if weight_norm > 0 else 1.0)


def _gradient_block(equations, scale):
    gradients, channels, pixels = equations.gradients, equations.channels, equations.pixels
    # x holds r columns of C*H*W unknowns, channel-major; the rows come channel-major too.
    if equations.unknowns <= DENSE_MAX_UNKNOWNS:
        matrix = gradients.matrix
        apply = lambda x: torch.matmul(matrix, x.view(channels, pixels, -1)).reshape(-1, x.shape[1])  # noqa: E731
        apply_t = lambda y: torch.matmul(matrix.T, y.view(channels, -1, y.shape[1])).reshape(-1, y.shape[1])  # noqa: E731
    else:
        apply = lambda x: _per_channel(gradients.apply, x, channels)  # noqa: E731
        apply_t = lambda y: _per_channel(gradients.apply_t, y, channels)  # noqa: E731
    return _Block(scale, apply, apply_t, gradients.rhs.T.reshape(-1, 1),
                  lambda: torch.block_diag(*[gradients.matrix.T @ gradients.matrix] * channels),
                  lambda: torch.block_diag(*[gradients.matrix] * channels))


def _per_channel(operator, x, channels):
    """operator (on (n, columns)) applied to each of x's r columns of `channels` stacked vectors."""
    columns = x.shape[1]
    stacked = x.view(channels, -1, columns).permute(1, 0, 2).reshape(-1, channels * columns)
    out = operator(stacked)
    return out.view(out.shape[0], channels, columns).permute(1, 0, 2).reshape(-1, columns)


def _joint_rhs(equations, with_gradients):
    """The right-hand side joint_system would build from other data: a function of
    (gradient_rhs (F*k*k, C, r), weight_rhs (known rows, r)) -> (rows, r), scaled alike."""
    grad_scale, weight_scale = hybrid_scales(equations) if with_gradients else (1.0, 1.0)

    def stack(gradient_rhs, weight_rhs):
        pieces = [grad_scale * gradient_rhs.permute(1, 0, 2).reshape(-1, gradient_rhs.shape[2])] \
            if with_gradients else []
        return torch.cat(pieces + [weight_scale * weight_rhs])

    return stack


def joint_resolve(equations, with_gradients, solve_rhs):
    """A LayerSolve.resolve for a joint system solved by solve_rhs((rows, r)) -> (C*H*W, r)."""
    def resolve(gradient_rhs, weight_rhs):
        # the scales are measured again here, not kept from the solve: only images that reach the bound pay
        stack = _joint_rhs(equations, with_gradients)
        return solve_rhs(stack(gradient_rhs, weight_rhs)).view(equations.channels, equations.pixels, -1)

    return resolve


def _weight_block(equations, scale):
    weights, known = equations.weights, equations.known
    if bool(known.all()):  # the same products without the copies into and out of the known rows
        return _Block(scale, weights.apply, weights.apply_t, equations.output.reshape(-1, 1),
                      lambda: weights.gram(known), lambda: weights.dense())
    # The known rows' positions, found once: a boolean mask is searched again on every product (a third of a
    # 128-px first layer's 4 ms normal-equations product).
    rows = torch.nonzero(known)[:, 0]

    def scatter(y):
        return weights.apply_t(y.new_zeros(weights.shape[0], y.shape[1]).index_copy_(0, rows, y))

    return _Block(scale, lambda x: weights.apply(x).index_select(0, rows), scatter, equations.output.reshape(-1, 1),
                  lambda: weights.gram(known), lambda: weights.dense()[known])


def joint_system(equations, with_gradients):
    """Weight constraints (and, with_gradients, the gradient constraints of every channel) on x (C*H*W, 1)."""
    grad_scale, weight_scale = hybrid_scales(equations) if with_gradients else (1.0, 1.0)
    blocks = ([_gradient_block(equations, grad_scale)] if with_gradients else []) + \
        [_weight_block(equations, weight_scale)]
    sizes = [len(block.rhs) for block in blocks]

    def apply(x):
        return torch.cat([b.scale * b.apply(x) for b in blocks])

    def apply_t(y):
        return sum(b.scale * b.apply_t(piece) for b, piece in zip(blocks, torch.split(y, sizes)))

    return System((sum(sizes), equations.weights.shape[1]), apply, apply_t,
                  torch.cat([b.scale * b.rhs for b in blocks]),
                  gram=lambda: sum(b.scale * b.scale * b.gram() for b in blocks),
                  matrix=lambda: torch.cat([b.scale * b.matrix() for b in blocks]))
