"""The argument check every public function shares: a whole number within its range, or an RConvError naming it."""

from __future__ import annotations

import numbers

from .errors import RConvError


def as_whole(value):
    """value as an int when it is a whole number (a Python, numpy or torch integer; never a bool), else None."""
    import numpy as np
    import torch
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (numbers.Integral, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value)
    return None


def whole_number(value, name, *, least=1, most=None, hint=""):
    """value as an int, or an RConvError: "<name> must be a whole number >= <least><hint>; got <value>".

    `most` bounds it from above too (the message then gives the range); `hint` says more, such as
    what None would mean where a function takes it.
    """
    whole = as_whole(value)
    if whole is not None and whole >= least and (most is None or whole <= most):
        return whole
    bounds = f">= {least}" if most is None else f"from {least} to {most}"
    raise RConvError(f"{name} must be a whole number {bounds}{hint}; got {value!r}")


def whole_numbers(values, name, *, least=1, what=None):
    """values (at least one) as a list of ints, or an RConvError: "<name> must be whole numbers >= <least>; got
    <values>", or with `what` "<name> must be a non-empty list of <what>, whole numbers >= <least>; ..."."""
    try:
        wholes = [as_whole(value) for value in values]
    except TypeError:
        wholes = [None]
    if not wholes or any(whole is None or whole < least for whole in wholes):
        kind = f"a non-empty list of {what}, whole numbers" if what else "whole numbers"
        raise RConvError(f"{name} must be {kind} >= {least}; got {values!r}")
    return wholes
