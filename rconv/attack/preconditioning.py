"""A preconditioner for the normal equations M^T M of a conv layer's weight constraints, for Krylov solves.

Away from the image's border, M^T M acts like a convolution: in Fourier space, one small C x C
matrix per frequency (its symbol), inverted cheaply. The border breaks that: the rows of M that
would read past it are missing, and M's smallest singular directions live in a frame a few kernel
widths wide along it (measured on a 16-channel, 3x3 layer: all of its smallest five). So the
preconditioner solves the frame exactly, through a sparse factorisation of its block of M^T M,
and the rest through the symbol (symmetric multiplicative Schwarz, linalg.krylov). With stride,
the symbol no longer diagonalises M^T M and a per-unknown diagonal takes its place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..common.geometry import conv_output_size, pair
from ..linalg.krylov import symmetric_schwarz
from ..linalg.memory import check
from .constraints import weight_entries

# The frame solved exactly is this many kernel widths wide: each CG step solves it once, so a wider frame
# saves steps but costs more per step and in its factorisation. Whole solves (a 128-px net's second layer,
# 16 channels at 64 px, 5x5, float32 gradients, with the error bound's resolves), by frame width: 1 px 45 s,
# 2 px 33 s, 3 px 29 s, 5 px (one kernel) 21 s, 8 px 32 s; one kernel width also converged at 112 px.
FRAME_KERNELS = 1.0
# Eigenvalues of the symbol below this fraction of its largest are lifted to it: the symbol of a valid
# convolution may vanish at a frequency the border's rows still determine.
_SYMBOL_FLOOR = 1e-10
_FLOAT64_BYTES, _COMPLEX128_BYTES = 8, 16
# scipy's COO and CSR forms of a sparse matrix take about this many bytes per nonzero at their peak.
_SPARSE_BYTES_PER_ENTRY = 40


class Plan(NamedTuple):
    """The preconditioner's size, known before anything is built: for memory checks and reports."""

    frame_width: int  # pixels
    frame_unknowns: int
    frame_entries: int  # nonzeros of M's rows that read the frame
    frame_gram_entries: int  # nonzeros of the frame's block of M^T M (an upper bound)
    symbol_bytes: int

    @property
    def bytes(self):
        return _SPARSE_BYTES_PER_ENTRY * (self.frame_entries + self.frame_gram_entries) + self.symbol_bytes


def _frame(input_shape, wide):
    """(H*W,) bool: the pixels within `wide` pixels of the border."""
    _, height, width = input_shape
    y, x = torch.arange(height), torch.arange(width)
    inner_y = torch.minimum(y, height - 1 - y)[:, None]
    inner_x = torch.minimum(x, width - 1 - x)[None, :]
    return (torch.minimum(inner_y, inner_x) < wide).reshape(-1)


def _outputs_reading(frame, input_shape, kernel, stride, padding):
    """(P*Q,) bool: the output positions whose window reads a frame pixel."""
    _, height, width = input_shape
    mask = frame.to(torch.float64).view(1, 1, height, width)
    reach = F.conv2d(mask, mask.new_ones(1, 1, *kernel), stride=stride, padding=padding)
    return (reach > 0).reshape(-1)


def plan(weight_shape, input_shape, stride, padding):
    """The Plan of a layer's preconditioner: a frame FRAME_KERNELS kernel widths wide."""
    return _plan(weight_shape, input_shape, stride, padding, math.ceil(FRAME_KERNELS * max(weight_shape[2:])))


def _plan(weight_shape, input_shape, stride, padding, wide):
    filters, channels, *kernel = weight_shape
    stride, padding = pair(stride), pair(padding)
    frame = _frame(input_shape, wide)
    outputs = int(_outputs_reading(frame, input_shape, kernel, stride, padding).sum())
    pixels = int(frame.sum())
    reach = math.prod(min(2 * k - 1, size) for k, size in zip(kernel, input_shape[1:]))
    symbol = math.prod(input_shape[1:]) * channels * channels * _COMPLEX128_BYTES if max(stride) == 1 else 0
    return Plan(wide, channels * pixels, outputs * filters * channels * math.prod(kernel),
                channels * pixels * channels * reach, 3 * symbol)


def _frame_solver(weight, input_shape, stride, padding, known, columns, wide, memory_limit, label):
    """(M^T M)[frame, frame]^-1 through a sparse factorisation (known rows of M only)."""
    from ..linalg.sparse import FillTooLarge, SparseFactor
    frame = _frame(input_shape, wide)
    if max(stride) == 1 and bool(known.all()):
        gram = _stride_one_frame_gram(weight, input_shape, padding, frame)
    else:
        gram = _product_frame_gram(weight, input_shape, stride, padding, known, frame, columns)
    try:
        factor = SparseFactor(gram, positive_definite=True, memory_limit=memory_limit)
    except FillTooLarge as error:
        check(error.need, f"{label}: the factorisation of its Krylov preconditioner's {len(columns):,}-unknown "
                          f"frame", memory_limit)
        raise
    return lambda r: torch.from_numpy(factor.solve(r.numpy())).to(r.dtype)


def _product_frame_gram(weight, input_shape, stride, padding, known, frame, columns):
    """The frame's block of M^T M as the sparse product of M's known rows that read the frame."""
    import scipy.sparse
    outputs = _outputs_reading(frame, input_shape, weight.shape[2:], stride, padding)
    entries = weight_entries(weight, input_shape[1:], stride, padding, outputs=outputs)
    keep = known[entries.rows]
    rows, cols, values = entries.rows[keep].numpy(), entries.cols[keep].numpy(), entries.values[keep].numpy()
    del entries, keep
    position = torch.full((math.prod(input_shape),), -1, dtype=torch.long)
    position[columns] = torch.arange(len(columns))
    local = position[torch.from_numpy(cols)].numpy()
    inside = local >= 0
    matrix = scipy.sparse.csr_matrix((values[inside], (rows[inside], local[inside])),
                                     shape=(known.numel(), len(columns)))
    return (matrix.T @ matrix).tocsr()


def _stride_one_frame_gram(weight, input_shape, padding, frame):
    """The frame's block of M^T M for stride 1 and every row known, from the kernels' correlations.

    Why not the sparse product: its cost grows with the square of each row's entries (5 s of a 128-px
    5x5 layer's 21 s). With stride 1, (M^T M)[(c, p), (c', p + d)] = sum over kernel offsets u of
    T_d[c, c'](u) [the output that reads p at offset u exists], T_d(u) = sum_o W[o, c, u] W[o, c', u + d].
    """
    import scipy.sparse
    _, channels, kh, kw = weight.shape
    _, height, width = input_shape
    ph, pw = pair(padding)
    out_h, out_w = conv_output_size((height, width), (kh, kw), (1, 1), (ph, pw))
    shifts = [(di, dj) for di in range(1 - kh, kh) for dj in range(1 - kw, kw)]
    padded = F.pad(weight, (kw - 1, kw - 1, kh - 1, kh - 1))
    correlations = torch.stack([torch.einsum("oaij,obij->abij", weight,
                                             padded[:, :, kh - 1 + di:2 * kh - 1 + di, kw - 1 + dj:2 * kw - 1 + dj])
                                for di, dj in shifts])  # (D, C, C, kh, kw)
    pixels = torch.nonzero(frame)[:, 0]
    y, x = pixels // width, pixels % width
    reads_y = ((y[:, None] + ph - torch.arange(kh)[None, :]) >= 0) & ((y[:, None] + ph - torch.arange(kh)) < out_h)
    reads_x = ((x[:, None] + pw - torch.arange(kw)[None, :]) >= 0) & ((x[:, None] + pw - torch.arange(kw)) < out_w)
    reads = (reads_y[:, :, None] & reads_x[:, None, :]).reshape(len(pixels), -1).to(weight.dtype)  # (N, kh*kw)
    values = torch.einsum("nu,dabu->ndab", reads, correlations.reshape(len(shifts), channels, channels, -1))
    offsets = torch.tensor(shifts)
    qy, qx = y[:, None] + offsets[None, :, 0], x[:, None] + offsets[None, :, 1]  # (N, D)
    position = torch.full((height * width,), -1, dtype=torch.long)
    position[pixels] = torch.arange(len(pixels))
    inside = (qy >= 0) & (qy < height) & (qx >= 0) & (qx < width)
    partner = torch.where(inside, position[(qy * width + qx).clamp(0, height * width - 1)], -1)
    n, d = torch.nonzero(partner >= 0, as_tuple=True)
    count = len(pixels)
    rows = (torch.arange(channels)[None, :, None] * count + n[:, None, None]).expand(-1, channels, channels)
    cols = (torch.arange(channels)[None, None, :] * count + partner[n, d][:, None, None]).expand(-1, channels, channels)
    size = channels * count
    return scipy.sparse.csr_matrix((values[n, d].reshape(-1).numpy(), (rows.reshape(-1).numpy(),
                                                                      cols.reshape(-1).numpy())), shape=(size, size))


def _symbol_solver(weight, input_shape):
    """An approximate (M^T M)^-1 for stride 1: M as a periodic convolution, inverted frequency by frequency."""
    channels, height, width = input_shape
    transform = torch.fft.fft2(weight, s=(height, width))  # (F, C, H, W)
    symbol = torch.einsum("fcuv,fduv->uvcd", transform, transform.conj())
    values, vectors = torch.linalg.eigh(symbol)
    values = values.clamp_min(_SYMBOL_FLOOR * float(values.max()))
    inverse = (vectors / values[..., None, :]) @ vectors.conj().transpose(-2, -1)

    def solve(r):
        spectra = torch.fft.fft2(r.T.reshape(-1, channels, height, width))
        solved = torch.einsum("uvcd,rduv->rcuv", inverse, spectra)
        return torch.fft.ifft2(solved).real.reshape(r.shape[1], -1).T.contiguous()

    return solve


def _weight_diagonal(weight, input_shape, stride, padding, known):
    """diag(M^T M) (C*H*W, 1): each unknown's squared column norm over the known rows."""
    output_shape = (weight.shape[0], *conv_output_size(input_shape[1:], weight.shape[2:], stride, padding))
    mask = known.to(weight.dtype).view(1, *output_shape)
    return torch.nn.grad.conv2d_input((1, *input_shape), weight * weight, mask, stride=stride,
                                      padding=padding).reshape(-1, 1)


def _inverse_diagonal(diagonal):
    inverse = torch.where(diagonal > 0, 1.0 / diagonal.clamp_min(torch.finfo(diagonal.dtype).tiny), 1.0)
    return lambda r: inverse * r


def _diagonal_solver(weight, input_shape, stride, padding, known):
    """1 / diag(M^T M)."""
    return _inverse_diagonal(_weight_diagonal(weight, input_shape, stride, padding, known))


def joint_preconditioner(weight, input_shape, stride, padding, known, output_grad, weight_scale, grad_scale):
    """1 / diag of the joint normal equations (weight constraints where known, and gradient constraints, each
    scaled), on tensors (C*H*W, r): for a layer whose weight constraints are partial (ReLU units off).

    Why not the symbol: with half of M's rows missing, M^T M is no convolution, and the gradient constraints,
    which the symbol leaves out, are what make the system well conditioned. Measured on a 128-px net's second
    layer (32 channels at 64 px, 72 filters 5x5, ReLU, half the units on), CG steps to 1e-10: weights alone with
    the symbol 510; both kinds with the symbol 277, with nothing 184, with this diagonal 184, with the per-pixel
    32 x 32 blocks 185, with a symbol shifted by the gradients' mean diagonal 169-187: the diagonal costs
    nothing and keeps CG independent of the two kinds' scales.
    """
    channels = input_shape[0]
    kernel = weight.shape[2:]
    # A's column norms: each output-gradient entry appears once per kernel offset that reads the pixel
    ones = output_grad.new_ones(output_grad.shape[0], 1, *kernel)
    gradient = torch.nn.grad.conv2d_input((1, 1, *input_shape[1:]), ones, (output_grad ** 2)[None], stride=stride,
                                          padding=padding).reshape(1, -1).expand(channels, -1).reshape(-1, 1)
    weights = _weight_diagonal(weight, input_shape, stride, padding, known)
    return _inverse_diagonal(weight_scale ** 2 * weights + grad_scale ** 2 * gradient)


class _Parts(NamedTuple):
    """What a preconditioner is made of, that depends only on the weights and the rows known."""

    columns: torch.Tensor  # the frame's unknowns
    local: object  # r -> the frame's block of M^T M solved exactly
    approximate: object  # r -> the symbol's (or the diagonal's) approximate solve


def conv_preconditioner(weight, input_shape, stride, padding, known, gram_apply, *, memory_limit=None,
                        label="conv layer", cache=None):
    """The preconditioner of M^T M on tensors (C*H*W, r), for linalg.krylov.normal_cg.

    weight (F, C, kh, kw); known: bool (F*P*Q,) rows of M in the system; gram_apply: M^T M over
    them. Raises RConvError (memory.check) before building what would not fit in memory_limit.
    cache: a dict kept with the weights; when every row is known, the frame's factorisation and the symbol
    are kept there for the model's next images (seconds each at 128 px and more).
    """
    stride, padding = pair(stride), pair(padding)
    reusable = cache is not None and bool(known.all())
    parts = cache.get("preconditioner") if reusable else None
    if parts is None:
        parts = _build(weight, input_shape, stride, padding, known, memory_limit, label)
        if reusable:
            cache["preconditioner"] = parts
    return symmetric_schwarz(gram_apply, parts.columns, parts.local, parts.approximate)


def _build(weight, input_shape, stride, padding, known, memory_limit, label):
    layout = plan(weight.shape, input_shape, stride, padding)
    check(layout.bytes, f"{label}: the preconditioner of its Krylov solve (a {layout.frame_unknowns:,}-unknown "
                        f"frame factorised, and the symbol)", memory_limit)
    frame = _frame(input_shape, layout.frame_width)
    columns = (torch.arange(input_shape[0])[:, None] * frame.numel() + torch.nonzero(frame)[:, 0][None, :]).reshape(-1)
    local = _frame_solver(weight, input_shape, stride, padding, known, columns, layout.frame_width, memory_limit,
                          label)
    if max(stride) == 1:
        approximate = _symbol_solver(weight, input_shape)
    else:
        approximate = _diagonal_solver(weight, input_shape, stride, padding, known)
    return _Parts(columns, local, approximate)
