"""How much memory a solve may take, and a clear error before an allocation that would not fit."""

from __future__ import annotations

import os

from ..common.errors import RConvError

# Share of the memory available when a reconstruction starts that its solves may take: the rest
# stays for PyTorch, the caller's data and the operating system.
_USABLE_SHARE = 0.75
_GB, _MB = 2 ** 30, 2 ** 20


def available_bytes():
    """The memory available to new allocations now (MemAvailable on Linux; physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_limit():
    """The bytes a reconstruction's solves may take when the caller sets no memory_limit."""
    available = available_bytes()
    return None if available is None else int(_USABLE_SHARE * available)


def size(nbytes):
    """A byte count for people: GB from 1 GB on, MB below."""
    return f"{nbytes / _GB:.1f} GB" if nbytes >= _GB else f"{nbytes / _MB:.0f} MB"


def check(nbytes, what, limit):
    """Raise RConvError naming `what` if `nbytes` exceed `limit` (bytes; None: no limit)."""
    if limit is not None and nbytes > limit:
        raise RConvError(f"{what} would need {size(nbytes)}, more than the {size(limit)} this reconstruction may "
                         f"use (memory_limit); R-CONV stops before allocating it")
