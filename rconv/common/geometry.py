"""Conv and pool geometry: output sizes, which input pixels each kernel offset reaches, and pool windows.

One footprint per axis serves ConvNet (output sizes), the counting bound of the
gradient constraints (offsets and pixels per stride residue) and the constraint
report (pixels no kernel position reaches). pool_spec reads a pooling layer as the
window the attack inverts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import RConvError


def pair(value):
    """(value, value) for an int, the value itself for a pair."""
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def conv_output_size(size, kernel_size, stride, padding):
    """(P, Q) of a conv layer's output for an input of `size` (an int or (H, W))."""
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in
                 zip(pair(size), pair(kernel_size), pair(stride), pair(padding)))


@dataclass(frozen=True)
class AxisFootprint:
    """How the input pixels along one axis meet the kernel positions of a conv layer.

    Pixel y meets kernel offset i at output position p when y + padding = stride * p + i, so
    only offsets with i = y + padding (mod stride) reach it: the pixels split into `stride`
    residue classes r = (y + padding) % stride.
    """

    outputs: int  # output positions along the axis
    covered: tuple  # per input pixel: whether some kernel position reaches it
    offsets: tuple  # per residue class: kernel offsets of that class
    pixels: tuple  # per residue class: covered input pixels of that class

    @property
    def uncovered(self):
        return len(self.covered) - sum(self.covered)


def axis_footprint(size, kernel, stride, padding):
    """The AxisFootprint of one axis: input `size`, `kernel` offsets, `stride`, zero `padding`."""
    outputs = (size + 2 * padding - kernel) // stride + 1
    offsets, pixels = [0] * stride, [0] * stride
    for i in range(kernel):
        offsets[i % stride] += 1
    covered = []
    for y in range(size):
        reached = any((y + padding - i) % stride == 0 and 0 <= (y + padding - i) // stride < outputs
                      for i in range(kernel))
        covered.append(reached)
        if reached:
            pixels[(y + padding) % stride] += 1
    return AxisFootprint(outputs, tuple(covered), tuple(offsets), tuple(pixels))


def footprints(input_size, kernel_size, stride, padding):
    """The AxisFootprint of both axes, (rows, columns)."""
    return tuple(axis_footprint(*axis) for axis in
                 zip(pair(input_size), pair(kernel_size), pair(stride), pair(padding)))


def covered_size(input_size, kernel_size, stride, padding):
    """(H', W'): the top-left part of a conv layer's input that holds every pixel some kernel position reaches,
    where the pixels none reaches form a bottom and a right border and the same conv of that part gives the same
    output (a stride-2, 3x3, unpadded layer on a 12-px input reads 11 rows and columns); None where they lie
    elsewhere (a kernel smaller than its stride leaves gaps) or cropping would move the padding's reach."""
    sides = []
    for axis in footprints(input_size, kernel_size, stride, padding):
        reached = sum(axis.covered)
        if axis.covered != (True,) * reached + (False,) * axis.uncovered:
            return None
        sides.append(reached)
    size = tuple(sides)
    if conv_output_size(size, kernel_size, stride, padding) != conv_output_size(input_size, kernel_size, stride,
                                                                                padding):
        return None
    return size


# The pools R-CONV inverts: their windows tile the map (stride = window, no padding).
POOL_KINDS = ("avg", "max")


def pool_spec(pool, conv_output=None):
    """(kind, window) of a pool given as ("avg" | "max", s) or as nn.AvgPool2d, nn.MaxPool2d or
    nn.AdaptiveAvgPool2d (the last only where its output size divides `conv_output`, (Ho, Wo))."""
    if isinstance(pool, (tuple, list)) and len(pool) == 2 and pool[0] in POOL_KINDS:
        kind, size = pool[0], pool[1]
    elif isinstance(pool, (nn.AvgPool2d, nn.MaxPool2d)):
        kind = "avg" if isinstance(pool, nn.AvgPool2d) else "max"
        size, stride = pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size)
        plain = pair(pool.padding) == (0, 0) and not pool.ceil_mode
        if isinstance(pool, nn.AvgPool2d):
            plain = plain and pool.divisor_override is None
        if isinstance(pool, nn.MaxPool2d):
            plain = plain and pair(pool.dilation) == (1, 1)
        if size != stride or size[0] != size[1] or not plain:
            raise RConvError(f"only square pools with stride equal to the window and no padding are inverted; "
                             f"got {pool}")
        size = size[0]
    elif isinstance(pool, nn.AdaptiveAvgPool2d):
        if conv_output is None:
            raise RConvError("an AdaptiveAvgPool2d needs the conv output's size to become an AvgPool")
        if not isinstance(pool.output_size, int) and None in tuple(pool.output_size):
            raise RConvError(f"AdaptiveAvgPool2d{tuple(pool.output_size)} keeps a side as it is; give both sides")
        target = pair(pool.output_size)
        if any(o % t for o, t in zip(conv_output, target)) or conv_output[0] // target[0] != conv_output[1] // target[1]:
            raise RConvError(f"AdaptiveAvgPool2d{target} on a {tuple(conv_output)} map is no square AvgPool")
        kind, size = "avg", conv_output[0] // target[0]
    else:
        raise RConvError(f"pool must be ('avg' | 'max', size), nn.AvgPool2d, nn.MaxPool2d or "
                         f"nn.AdaptiveAvgPool2d; got {pool!r}")
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise RConvError(f"pool size must be a positive whole number; got {size!r}")
    return kind, int(size)
