"""A conv layer's equations on its input x (C, H, W): both kinds of constraint, dense or applied as convolutions.

Gradient constraints: A x[c] = dL/dW[:, c], with A (F*k*k, H*W) shared by every channel.
Weight constraints: M x + b = O, usable at the outputs whose pre-activation is known.
Each is applied as a convolution (so nothing of the size of a dense matrix is needed) and
built densely or sparsely only on demand; what depends only on the weights is cached per model.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..common.geometry import conv_output_size, pair
from ..linalg.solvers import CHOLESKY_MIN_UNKNOWNS, Factor, NormalFactor
from .constraints import grad_constraints, weight_entries

_FLOAT64_BYTES = 8
# Layers up to this many unknowns (a dense Gram of 0.5 GB) build their sparse Gram matrix from the
# kernels' patches.
_PATCH_GRAM_MAX_UNKNOWNS = 8192
# Entries of the per-position kernel blocks formed at once by _patch_gram (0.4 GB in float64).
_PATCH_GRAM_CHUNK = 50_000_000


def gram_entries_bound(input_shape, kernel):
    """An upper bound on the nonzeros of a conv layer's M^T M, known before building it: two unknowns meet in
    a row only when their pixels lie less than a kernel apart, in any pair of channels."""
    channels, *sizes = input_shape
    unknowns = math.prod(input_shape)
    reach = math.prod(min(2 * k - 1, size) for k, size in zip(kernel, sizes))
    return unknowns * min(unknowns, channels * reach)


class ResidueClass(NamedTuple):
    """The rows of A with kernel offsets (i, j) = (ry, rx) mod the stride, and the only pixels they reach."""

    rows: torch.Tensor
    pixels: torch.Tensor


class GradientSystem:
    """A conv layer's gradient constraints A x[c] = dL/dW[:, c], with A shared by all channels.

    A is applied as convolutions of the layer's output gradient; its dense form (whole, or one
    block per stride residue class, which A never mixes) is built on demand.
    """

    def __init__(self, output_grad, weight_grad, input_size, kernel_size, stride, padding):
        self.output_grad = output_grad  # dL/dO, (F, P, Q)
        self.input_size, self.kernel_size = pair(input_size), pair(kernel_size)
        self.stride, self.padding = pair(stride), pair(padding)
        filters, self.channels = weight_grad.shape[:2]
        self.shape = (filters * self.kernel_size[0] * self.kernel_size[1], self.input_size[0] * self.input_size[1])
        self.rhs = weight_grad.permute(0, 2, 3, 1).reshape(self.shape[0], -1)  # (F*k*k, C)
        self._matrix = None

    @property
    def matrix(self):
        """A, dense (F*k*k, H*W)."""
        if self._matrix is None:
            self._matrix = grad_constraints(self.output_grad, self.input_size, self.kernel_size, self.stride,
                                            self.padding)
        return self._matrix

    def dense_bytes(self):
        return self.shape[0] * self.shape[1] * _FLOAT64_BYTES

    def to(self, dtype):
        """The same constraints with their tensors in `dtype` (for products in a lower precision)."""
        return GradientSystem(self.output_grad.to(dtype), self._weight_grad().to(dtype), self.input_size,
                              self.kernel_size, self.stride, self.padding)

    def cropped(self, input_size):
        """The same constraints on the top-left `input_size` of the input: geometry.covered_size, whose pixels
        left out no kernel position reaches, so that A never reads them."""
        return GradientSystem(self.output_grad, self._weight_grad(), input_size, self.kernel_size, self.stride,
                              self.padding)

    def _weight_grad(self):
        """dL/dW (F, C, kh, kw) from the right-hand sides."""
        filters, (kh, kw) = self.output_grad.shape[0], self.kernel_size
        return self.rhs.reshape(filters, kh, kw, -1).permute(0, 3, 1, 2)

    def apply(self, x):
        """A x for x of shape (H*W, r): the weight gradient each column would produce."""
        images = x.T.reshape(1, x.shape[1], *self.input_size)
        filters = self.output_grad.shape[0]
        grads = torch.nn.grad.conv2d_weight(images, (filters, x.shape[1], *self.kernel_size), self.output_grad[None],
                                            stride=self.stride, padding=self.padding)
        return grads.permute(0, 2, 3, 1).reshape(self.shape[0], x.shape[1])

    def apply_t(self, y):
        """A^T y for y of shape (F*k*k, r)."""
        filters = self.output_grad.shape[0]
        kernels = y.reshape(filters, *self.kernel_size, y.shape[1]).permute(0, 3, 1, 2)
        images = torch.nn.grad.conv2d_input((1, y.shape[1], *self.input_size), kernels, self.output_grad[None],
                                            stride=self.stride, padding=self.padding)
        return images.reshape(y.shape[1], -1).T

    def frobenius(self):
        """|A|_F without forming A: each output gradient entry appears once per kernel offset inside the image."""
        counts = [torch.tensor([sum(0 <= s * p + i - pad < size for i in range(k)) for p in range(out)],
                               dtype=self.output_grad.dtype, device=self.output_grad.device)
                  for size, k, s, pad, out in zip(self.input_size, self.kernel_size, self.stride, self.padding,
                                                  self.output_grad.shape[1:])]
        return math.sqrt(float((self.output_grad ** 2 * counts[0][:, None] * counts[1][None, :]).sum()))

    def residue_classes(self):
        """One ResidueClass per stride residue (ry, rx): A is block diagonal over them."""
        (kh, kw), (sh, sw), (ph, pw), (h, w) = self.kernel_size, self.stride, self.padding, self.input_size
        device = self.output_grad.device
        i, j = torch.arange(kh, device=device), torch.arange(kw, device=device)
        y, x = torch.arange(h, device=device), torch.arange(w, device=device)
        offsets = torch.arange(self.shape[0], device=device).reshape(-1, kh, kw)
        classes = []
        for ry in range(sh):
            for rx in range(sw):
                rows = offsets[:, i % sh == ry][:, :, j % sw == rx].reshape(-1)
                pixels = (y[(y + ph) % sh == ry][:, None] * w + x[(x + pw) % sw == rx][None, :]).reshape(-1)
                if len(rows) and len(pixels):
                    classes.append(ResidueClass(rows, pixels))
        return classes


class WeightSystem:
    """A conv layer's weight constraints M x + b = O, and what depends only on its weights.

    M is applied as a convolution and stored by its nonzeros; dense and sparse copies,
    factorisations and the deflation subspace are built when first needed and then reused.
    """

    def __init__(self, weight, input_shape, stride, padding):
        self.weight, self.input_shape, self.stride, self.padding = weight, tuple(input_shape), stride, padding
        self.output_shape = (weight.shape[0], *conv_output_size(input_shape[1:], weight.shape[2:], stride, padding))
        self.shape = (math.prod(self.output_shape), math.prod(self.input_shape))
        # |row (f, p, q)|^2 = sum of W[f]^2 over the kernel offsets inside the image: a convolution of ones
        ones = weight.new_ones(1, *self.input_shape)
        self.row_norms = F.conv2d(ones, weight * weight, stride=stride, padding=padding).reshape(-1)
        self.factors, self._entries, self._gram, self._sparse_gram = {}, None, None, None

    def to(self, dtype):
        """The same constraints with the weights in `dtype` (for products in a lower precision); nothing cached."""
        return WeightSystem(self.weight.to(dtype), self.input_shape, self.stride, self.padding)

    @property
    def entries(self):
        """M's nonzeros, built when first needed (a hidden layer solved from its gradients never needs them)."""
        if self._entries is None:
            self._entries = weight_entries(self.weight, self.input_shape[1:], self.stride, self.padding)
        return self._entries

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
        """M^T M over the rows in `known` as a dense tensor, through sparse products on the CPU."""
        everything = bool(known.all())
        if everything and self._gram is not None:
            return self._gram
        if self.weight.device.type == "cpu":
            gram = torch.from_numpy(self._product_gram(known).toarray())
        else:
            selected = self.dense() if everything else self.dense()[known]
            gram = selected.T @ selected
        if everything:
            self._gram = gram
        return gram

    def sparse_gram(self, known):
        """M^T M over the rows in `known` as a scipy sparse matrix (cached for all rows)."""
        everything = bool(known.all())
        if everything and self._sparse_gram is not None:
            return self._sparse_gram
        if self.shape[1] <= _PATCH_GRAM_MAX_UNKNOWNS and self.weight.device.type == "cpu":
            gram = self._patch_gram(known)
        else:
            gram = self._product_gram(known)
        if everything:
            self._sparse_gram = gram
        return gram

    def _product_gram(self, known):
        """M^T M over the rows in `known` as a sparse product."""
        selected = self.sparse(None if bool(known.all()) else known)
        return (selected.T @ selected).tocsr()

    def _patch_gram(self, known):
        """M^T M = sum over output positions o of P_o^T (W^T D_o W) P_o, with W the (F, C*k*k) kernels, D_o
        the filters known at o and P_o the patch o reads: batched products and one scatter-add into a
        dense matrix, instead of a sparse product whose cost grows with the square of each row's entries."""
        import scipy.sparse
        filters = self.weight.shape[0]
        kernels = self.weight.reshape(filters, -1)  # (F, C*k*k)
        shown = known.view(filters, -1).to(kernels.dtype)  # (F, O): row (f, o) known
        patches = self._patch_pixels()  # (O, C*k*k), -1 where the kernel reads padding
        inside = (patches >= 0).to(kernels.dtype)
        unknowns = self.shape[1]
        gram = kernels.new_zeros(unknowns * unknowns)
        span = patches.shape[1]
        step = max(1, _PATCH_GRAM_CHUNK // (span * span))
        for start in range(0, patches.shape[0], step):
            part = slice(start, start + step)
            blocks = torch.einsum("fa,fo,fb->oab", kernels, shown[:, part], kernels)
            blocks = blocks * inside[part, :, None] * inside[part, None, :]
            index = patches[part].clamp_min(0)
            gram.index_add_(0, (index[:, :, None] * unknowns + index[:, None, :]).reshape(-1), blocks.reshape(-1))
        with warnings.catch_warnings():  # torch calls its sparse CSR tensors beta; this conversion is all we use
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            compressed = gram.view(unknowns, unknowns).to_sparse_csr()  # faster than scipy's scan of a dense array
        return scipy.sparse.csr_matrix((compressed.values().numpy(), compressed.col_indices().numpy(),
                                        compressed.crow_indices().numpy()), shape=(unknowns, unknowns))

    def _patch_pixels(self):
        """The input pixel (c, y, x) each output position reads at each kernel entry, -1 in the padding."""
        channels, height, width = self.input_shape
        kh, kw = self.weight.shape[2:]
        (sh, sw), (ph, pw) = self.stride, self.padding
        out_h, out_w = self.output_shape[1:]
        y = (torch.arange(out_h)[:, None] * sh + torch.arange(kh)[None, :] - ph)  # (P, kh)
        x = (torch.arange(out_w)[:, None] * sw + torch.arange(kw)[None, :] - pw)  # (Q, kw)
        inside = ((y >= 0) & (y < height))[:, None, None, :, None] & ((x >= 0) & (x < width))[None, :, None, None, :]
        pixels = (torch.arange(channels)[None, None, :, None, None] * (height * width)
                  + y[:, None, None, :, None] * width + x[None, :, None, None, :])  # (P, Q, C, kh, kw)
        return torch.where(inside, pixels, -1).reshape(out_h * out_w, -1)

    def factor(self, rtol):
        """A cached Factor of M with all rows (M does not depend on the image), for dense-sized layers."""
        if rtol not in self.factors:
            rows, unknowns = self.shape
            wanted = rows == unknowns or (rows > unknowns and unknowns >= CHOLESKY_MIN_UNKNOWNS)  # see Factor
            self.factors[rtol] = Factor(self.shape, rtol, self.dense, self.apply, self.apply_t,
                                        sparse=self.sparse() if wanted and self.weight.device.type == "cpu" else None)
        return self.factors[rtol]

    def normal_factor(self, rtol, memory_limit):
        """A cached NormalFactor of M with all rows, for layers too large for dense factorisations."""
        key = ("normal", rtol)
        if key not in self.factors:
            everything = torch.ones(self.shape[0], dtype=torch.bool)
            like = torch.empty(0, dtype=self.weight.dtype, device=self.weight.device)
            self.factors[key] = NormalFactor(self.sparse_gram(everything), self.apply, self.apply_t, rtol, like,
                                             memory_limit)
        return self.factors[key]


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
        return self.gradients.shape[1]

    @property
    def unknowns(self):
        return self.weights.shape[1]

    def to(self, dtype):
        """The same equations with their tensors in `dtype` (for products in a lower precision)."""
        return LayerEquations(self.gradients.to(dtype), self.weights.to(dtype), self.known, self.output.to(dtype))

