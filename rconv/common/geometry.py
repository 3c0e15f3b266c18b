"""Conv geometry: output sizes, and which input pixels each kernel offset reaches.

One footprint per axis serves ConvNet (output sizes), the counting bound of the
gradient constraints (offsets and pixels per stride residue) and the constraint
report (pixels no kernel position reaches).
"""

from __future__ import annotations

from dataclasses import dataclass


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
