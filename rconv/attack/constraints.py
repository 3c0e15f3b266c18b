"""The two kinds of linear constraints a conv layer puts on its input, and the counting bound.

Gradient constraints: dL/dW[f, c, i, j] = sum_pq dL/dO[f, p, q] * x_padded[c, s*p + i, s*q + j],
one matrix A shared by every input channel. Weight constraints: O = conv(x, W) + b, one
matrix M over all channels, usable where the pre-activation output O is known.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..common.errors import RConvError
from ..common.geometry import conv_output_size, footprints, pair


def grad_constraints(output_grad, input_size, kernel_size, stride=1, padding=0):
    """The matrix A of a conv layer's gradient constraints, shared by every input channel c.

    A @ x[c].flatten() == weight_grad[:, c].flatten(), because
    dL/dW[f, c, i, j] = sum_pq output_grad[f, p, q] * x_padded[c, s*p + i, s*q + j].

    Args:
        output_grad: dL/dO of the layer's pre-activation output, shape (F, P, Q).
        input_size: (H, W) of the layer's input.
    Returns a (F*kh*kw, H*W) tensor; rows are ordered (f, i, j) like weight_grad[:, c].
    """
    if output_grad.dim() != 3:
        raise RConvError(f"output_grad must have shape (F, P, Q); got {tuple(output_grad.shape)}")
    filters, out_h, out_w = output_grad.shape
    (h, w), (kh, kw), (sh, sw), (ph, pw) = pair(input_size), pair(kernel_size), pair(stride), pair(padding)
    expected = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw))
    if (out_h, out_w) != tuple(expected):
        raise RConvError(f"output_grad is {out_h}x{out_w}, but a {kh}x{kw} kernel with stride {(sh, sw)} and "
                         f"padding {(ph, pw)} on a {h}x{w} input gives {expected[0]}x{expected[1]}")
    padded = output_grad.new_zeros(filters, kh, kw, h + 2 * ph + kh, w + 2 * pw + kw)
    for i in range(kh):
        for j in range(kw):
            padded[:, i, j, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw] = output_grad
    return padded[..., ph:ph + h, pw:pw + w].reshape(filters * kh * kw, h * w)


class SparseEntries(NamedTuple):
    """A sparse matrix by its nonzeros: entry (rows[k], cols[k]) holds values[k]."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple

    def dense(self):
        matrix = self.values.new_zeros(self.shape)
        matrix[self.rows, self.cols] = self.values
        return matrix


def weight_entries(weight, input_size, stride, padding, outputs=None):
    """Nonzeros of the weight-constraint matrix: rows (f, p, q), columns (c, y, x), values W[f, c, i, j].

    outputs: a bool mask over the output positions (P*Q,): only their rows (numbered as in the whole matrix).
    """
    filters, channels, kh, kw = weight.shape
    (h, w), (sh, sw), (ph, pw) = pair(input_size), pair(stride), pair(padding)
    out_h, out_w = conv_output_size((h, w), (kh, kw), (sh, sw), (ph, pw))
    device = weight.device
    p, q = torch.arange(out_h, device=device), torch.arange(out_w, device=device)
    f_offset = torch.arange(filters, device=device)[:, None, None] * (out_h * out_w)
    c_offset = torch.arange(channels, device=device)[None, :, None] * (h * w)
    rows, cols, values = [], [], []
    for i in range(kh):
        y = sh * p + i - ph
        inside_y = (y >= 0) & (y < h)
        for j in range(kw):
            x = sw * q + j - pw
            inside_x = (x >= 0) & (x < w)
            positions = (p[inside_y, None] * out_w + q[None, inside_x]).flatten()
            pixels = (y[inside_y, None] * w + x[None, inside_x]).flatten()
            if outputs is not None:
                pixels, positions = pixels[outputs[positions]], positions[outputs[positions]]
            shape = (filters, channels, len(positions))
            rows.append((f_offset + positions).expand(shape).flatten())
            cols.append((c_offset + pixels).expand(shape).flatten())
            values.append(weight[:, :, i, j, None].expand(shape).flatten())
    return SparseEntries(torch.cat(rows), torch.cat(cols), torch.cat(values),
                         (filters * out_h * out_w, channels * h * w))


def weight_constraints(weight, input_size, stride=1, padding=0):
    """The matrix M of a conv layer's weight constraints: M @ x.flatten() + bias == O.flatten().

    O is the layer's pre-activation output (F, P, Q); x its input (C, H, W).
    Returns a dense (F*P*Q, C*H*W) tensor.
    """
    if weight.dim() != 4:
        raise RConvError(f"weight must have shape (F, C, kh, kw); got {tuple(weight.shape)}")
    if min(conv_output_size(pair(input_size), weight.shape[2:], pair(stride), pair(padding))) < 1:
        raise RConvError(f"a {tuple(weight.shape[2:])} kernel does not fit a {tuple(pair(input_size))} input "
                         f"with padding {padding}")
    return weight_entries(weight, input_size, stride, padding).dense()


def max_equations(channels, input_size, kernel_size, stride, padding, filters, weight_constraints, batch_size=1):
    """The most independent equations a conv layer's constraints can offer (a counting bound on its rank): its
    weight constraints (known outputs, or pooled values) plus, per input channel, its gradient constraints.

    Those split by stride residue class (see min_filters): a class meets filters * (its offsets) rows, but at most
    as many independent ones as it has pixels (over a batch, batch_size times as many), nor more than its offsets
    times the output gradient's own rank (at most the filters, at most the output positions). A stride-2 3x3 layer's
    odd rows and columns meet one offset each: 16 filters give at most 16 equations for their 36 pixels.
    """
    rows, columns = footprints(input_size, kernel_size, stride, padding)
    output_rank = min(filters, batch_size * rows.outputs * columns.outputs)
    per_channel = sum(min(output_rank * offsets_y * offsets_x, batch_size * pixels_y * pixels_x)
                      for offsets_y, pixels_y in zip(rows.offsets, rows.pixels)
                      for offsets_x, pixels_x in zip(columns.offsets, columns.pixels))
    return channels * per_channel + weight_constraints


def min_filters(input_size, kernel_size, stride=1, padding=0):
    """The fewest filters whose gradient constraints can determine a layer's input (a counting bound).

    With stride s, pixel (y, x) meets only kernel offsets i = y + padding (mod s), so the
    gradient constraints split into s*s independent groups, one per residue class; each
    group needs filters * (its offsets) >= (its pixels). Returns math.inf when some pixel
    meets no kernel position at all. ReLU zeros in the output gradient raise the real need.
    """
    rows, columns = footprints(input_size, kernel_size, stride, padding)
    if rows.uncovered or columns.uncovered:
        return math.inf
    need = 0
    for offsets_y, pixels_y in zip(rows.offsets, rows.pixels):
        for offsets_x, pixels_x in zip(columns.offsets, columns.pixels):
            if pixels_y * pixels_x:
                need = max(need, math.ceil(pixels_y * pixels_x / (offsets_y * offsets_x)))
    return need
