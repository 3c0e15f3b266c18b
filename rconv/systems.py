"""The linear systems of one conv layer, assembled from its constraints and solved.

A layer's input x (C, H, W) satisfies its gradient constraints A x[c] = dL/dW[:, c] (A shared
by every channel) and, where the pre-activation output is known, its weight constraints
M x + b = O. This module stacks them as the method asks ("gradients", "weights", "hybrid")
and solves them with the solvers; what depends only on the weights is cached per model.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .constraints import grad_constraints, weight_entries
from .errors import RConvError
from .geometry import conv_output_size
from .solvers import TINY, Factor, Spectrum, System, norm_2, rank_rtol, solve

# Systems that couple all channels (weight constraints) are solved densely; beyond this many
# unknowns (a 64x64 greyscale image) a rank-deficient one would take minutes to analyse.
JOINT_MAX_UNKNOWNS = 4096
# The hybrid first layer corrects the weight-constraint solution within the span of this many
# of M's smallest singular directions (see _deflated_hybrid).
DEFLATION_SIZE = 128
# Correction steps of the deflated hybrid solve.
_DEFLATION_STEPS = 2


class WeightSystem:
    """A conv layer's weight constraints M x + b = O, and what depends only on its weights.

    M is applied as a convolution and stored by its nonzeros; dense and sparse copies,
    factorisations and the deflation subspace are built when first needed and then reused.
    """

    def __init__(self, weight, input_shape, stride, padding):
        self.weight, self.input_shape, self.stride, self.padding = weight, tuple(input_shape), stride, padding
        self.entries = weight_entries(weight, input_shape[1:], stride, padding)
        self.shape = self.entries.shape
        self.output_shape = (weight.shape[0], *conv_output_size(input_shape[1:], weight.shape[2:], stride, padding))
        self.row_norms = torch.zeros(self.shape[0], dtype=weight.dtype, device=weight.device).index_add_(
            0, self.entries.rows, self.entries.values * self.entries.values)
        self.factors, self._gram = {}, None

    def apply(self, x):
        """M x for x of shape (C*H*W, r)."""
        images = x.T.reshape(x.shape[1], *self.input_shape)
        return F.conv2d(images, self.weight, stride=self.stride, padding=self.padding).reshape(x.shape[1], -1).T

    def apply_t(self, y):
        """M^T y for y of shape (F*P*Q, r)."""
        outputs = y.T.reshape(y.shape[1], *self.output_shape)
        inputs = torch.nn.grad.conv2d_input((y.shape[1], *self.input_shape), self.weight, outputs,
                                            stride=self.stride, padding=self.padding)
        return inputs.reshape(y.shape[1], -1).T

    def dense(self):
        return self.entries.dense()

    def sparse(self, known=None):
        """M (or its rows in `known`) as a scipy CSR matrix."""
        import scipy.sparse
        rows, cols, values = (t.cpu().numpy() for t in self.entries[:3])
        matrix = scipy.sparse.csr_matrix((values, (rows, cols)), shape=self.shape)
        return matrix if known is None else matrix[known.cpu().numpy()]

    def gram(self, known):
        """M^T M over the rows in `known`, through sparse products on the CPU."""
        everything = bool(known.all())
        if everything and self._gram is not None:
            return self._gram
        if self.weight.device.type == "cpu":
            selected = self.sparse(None if everything else known)
            gram = torch.from_numpy((selected.T @ selected).toarray())
        else:
            selected = self.dense() if everything else self.dense()[known]
            gram = selected.T @ selected
        if everything:
            self._gram = gram
        return gram

    def factor(self, rtol):
        """A cached Factor of M with all rows (M does not depend on the image)."""
        if rtol not in self.factors:
            square_on_cpu = self.shape[0] == self.shape[1] and self.weight.device.type == "cpu"
            self.factors[rtol] = Factor(self.shape, rtol, self.dense, self.apply, self.apply_t,
                                        sparse=self.sparse() if square_on_cpu else None)
        return self.factors[rtol]


def _weights_key(weight, bias, stride, padding, input_shape):
    # Keyed on the weights' bytes, so a cache entry can never outlive a change of weights.
    digest = hashlib.sha1(weight.detach().cpu().numpy().tobytes())
    if bias is not None:
        digest.update(bias.detach().cpu().numpy().tobytes())
    return ("weights", digest.hexdigest(), tuple(stride), tuple(padding), tuple(input_shape), str(weight.device))


def weight_system(weight, bias, stride, padding, input_shape, cache):
    """The WeightSystem of a conv layer, from `cache` (a dict shared across images) when it holds it."""
    key = _weights_key(weight, bias, stride, padding, input_shape)
    if cache is not None and key in cache:
        return cache[key]
    system = WeightSystem(weight, input_shape, tuple(stride), tuple(padding))
    if cache is not None:
        cache[key] = system
    return system


class GradientSystem(NamedTuple):
    """A conv layer's gradient constraints: A (F*k*k, H*W), shared by all channels, and dL/dW per channel."""

    matrix: torch.Tensor
    rhs: torch.Tensor  # (F*k*k, C)

    @classmethod
    def build(cls, output_grad, weight_grad, input_size, kernel_size, stride, padding):
        matrix = grad_constraints(output_grad, input_size, kernel_size, stride, padding)
        return cls(matrix, weight_grad.permute(0, 2, 3, 1).reshape(matrix.shape[0], -1))


class LayerEquations(NamedTuple):
    """Everything one conv layer's input must satisfy."""

    gradients: GradientSystem
    weights: WeightSystem
    known: torch.Tensor  # rows of M whose pre-activation output is known (bool, F*P*Q)
    output: torch.Tensor  # O - b at the known rows, (known rows,)

    @property
    def channels(self):
        return self.weights.input_shape[0]

    @property
    def pixels(self):
        return self.gradients.matrix.shape[1]


class LayerSolve(NamedTuple):
    """A solved conv layer: its input (C, H*W), the system's Spectrum, and its relative residual."""

    x: torch.Tensor
    spectrum: Spectrum
    residual: float


class _Block(NamedTuple):
    """One kind of constraint in a stacked system, scaled by `scale`."""

    scale: float
    apply: object
    apply_t: object
    rhs: torch.Tensor
    gram: object  # builds K^T K of the block
    matrix: object  # builds K of the block


def _hybrid_scales(equations):
    # Each kind of constraint is scaled to unit Frobenius norm so that neither dominates. A kind
    # that offers no equation at all (every ReLU unit off) keeps scale 1: scaling zero up would
    # overflow its Gram matrix into NaN instead of reporting rank 0.
    grad_norm = math.sqrt(equations.channels) * float(torch.linalg.norm(equations.gradients.matrix))
    weight_norm = float(equations.weights.row_norms[equations.known].sum().sqrt())
    return (1.0 / grad_norm if grad_norm > 0 else 1.0), (1.0 / weight_norm if weight_norm > 0 else 1.0)


def _gradient_block(equations, scale):
    matrix, rhs = equations.gradients
    channels, pixels = equations.channels, equations.pixels
    return _Block(scale,
                  lambda x: (matrix @ x.view(channels, pixels).T).T.reshape(-1, 1),
                  lambda y: (matrix.T @ y.view(channels, -1).T).T.reshape(-1, 1),
                  rhs.T.reshape(-1, 1),
                  lambda: torch.block_diag(*[matrix.T @ matrix] * channels),
                  lambda: torch.block_diag(*[matrix] * channels))


def _weight_block(equations, scale):
    weights, known = equations.weights, equations.known

    def scatter(y):
        full = y.new_zeros(weights.shape[0], y.shape[1])
        full[known] = y
        return weights.apply_t(full)

    return _Block(scale, lambda x: weights.apply(x)[known], scatter, equations.output.reshape(-1, 1),
                  lambda: weights.gram(known), lambda: weights.dense()[known])


def joint_system(equations, with_gradients):
    """Weight constraints (and, with_gradients, the gradient constraints of every channel) on x (C*H*W, 1)."""
    grad_scale, weight_scale = _hybrid_scales(equations) if with_gradients else (1.0, 1.0)
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


def _deflated_hybrid(equations, dtype):
    """The hybrid first layer, fast: weight constraints solved through a factorisation cached per
    model, then corrected by the least-squares fit of both kinds of constraints within the span of
    M's smallest singular directions, the only ones where the weights alone are unreliable."""
    weights, channels = equations.weights, equations.channels
    system = joint_system(equations, with_gradients=True)
    factor = weights.factor(rank_rtol(torch.float64, weights.shape))
    subspace = factor.small_subspace(min(weights.shape[1], DEFLATION_SIZE))
    grad_scale, weight_scale = _hybrid_scales(equations)
    matrix = equations.gradients.matrix
    directions = subspace.basis.shape[1]
    grad_images = (matrix @ subspace.basis.view(channels, matrix.shape[1], directions)).reshape(-1, directions)
    reduced = torch.cat([grad_scale * grad_images, weight_scale * subspace.images])
    x = factor.least_squares(equations.output.reshape(-1, 1))
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
    for _ in range(_DEFLATION_STEPS):
        coefficients = vectors @ (inverse[:, None] * (vectors.T @ (reduced.T @ (system.rhs - system.apply(x)))))
        x = x + subspace.basis @ coefficients
    spectrum = Spectrum(weights.shape[1] - int((~keep).sum()), top / floor if floor > 0 else math.inf)
    return x, spectrum, system


def solve_layer(equations, method, dtype, fallback=False):
    """Solve one conv layer for its input with `method`: a LayerSolve.

    fallback: an attempt to repair rank-deficient gradient constraints; gives up (None) rather
    than analyse a large system that is rank-deficient too.
    """
    matrix, rhs = equations.gradients
    channels, pixels, known = equations.channels, equations.pixels, equations.known
    if method == "hybrid" and not bool(known.any()):
        method = "gradients"  # no weight constraint left (every ReLU unit off): the per-channel solve is the same
    if method == "gradients":
        system = System(matrix.shape, lambda x: matrix @ x, lambda y: matrix.T @ y, rhs, matrix=matrix)
        x, spectrum = solve(system, rank_rtol(dtype, matrix.shape))
        return LayerSolve(x.T, Spectrum(spectrum.rank * channels, spectrum.cond), system.residual(x))
    weights = equations.weights
    if bool(known.all()) and weights.shape[0] >= weights.shape[1]:
        # M alone could determine the input and does not depend on the image: factorise it once.
        if method == "hybrid":
            x, spectrum, system = _deflated_hybrid(equations, dtype)
        else:
            system = joint_system(equations, with_gradients=False)
            factor = weights.factor(rank_rtol(dtype, weights.shape))
            x, spectrum = factor.solve(system), factor.spectrum
    else:
        if channels * pixels > JOINT_MAX_UNKNOWNS:
            raise RConvError(f"the {method} system couples all {channels * pixels} input values of a conv layer "
                             f"in one dense solve (at most {JOINT_MAX_UNKNOWNS} here); use first_layer="
                             f"'gradients' with enough filters (see min_filters) for inputs this large")
        system = joint_system(equations, with_gradients=method == "hybrid")
        solved = solve(system, rank_rtol(dtype, system.shape), fast_only=fallback)
        if solved is None:
            return None
        x, spectrum = solved
    return LayerSolve(x.view(channels, pixels), spectrum, system.residual(x))
