"""How much memory a solve may take, and a clear error before an allocation that would not fit."""

from __future__ import annotations

import os

from ..common.errors import RConvError

# Share of the memory available when a reconstruction starts that its solves may take: the rest
# stays for PyTorch, the caller's data and the operating system.
_USABLE_SHARE = 0.75
_GB, _MB = 2 ** 30, 2 ** 20


def _proc_field(path, field):
    """A "Field:   123 kB" line of a /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path) as info:
            for line in info:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_space_left():
    """Bytes this process may still map under its address-space limit (ulimit -v), None when unlimited:
    a machine with free memory still refuses allocations past it."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError):
        return None
    if limit == resource.RLIM_INFINITY:  # the usual case, decided without reading /proc on every check
        return None
    mapped = _proc_field("/proc/self/status", "VmSize")
    if mapped is None:
        return None
    return max(0, limit - mapped)


def available_bytes():
    """The memory available to new allocations now: MemAvailable on Linux (physical memory elsewhere), or less
    when the process's address-space limit leaves less."""
    available = _proc_field("/proc/meminfo", "MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = None
    left = _address_space_left()
    return left if available is None else available if left is None else min(available, left)


def default_limit():
    """The bytes a reconstruction's solves may take when the caller sets no memory_limit."""
    available = available_bytes()
    return None if available is None else int(_USABLE_SHARE * available)


def size(nbytes):
    """A byte count for people: GB from 1 GB on, MB below."""
    return f"{nbytes / _GB:.1f} GB" if nbytes >= _GB else f"{nbytes / _MB:.0f} MB"


def check(nbytes, what, limit):
    """Raise RConvError naming `what` if `nbytes` exceed `limit` (bytes; None: no limit), or the usable share of
    the address space left now under `ulimit -v`, which the allocations before this one have used up in part."""
    if limit is not None and nbytes > limit:
        raise RConvError(f"{what} would need {size(nbytes)}, more than the {size(limit)} this reconstruction may "
                         f"use (memory_limit); R-CONV stops before allocating it")
    left = _address_space_left()
    if left is not None and nbytes > _USABLE_SHARE * left:
        raise RConvError(f"{what} would need {size(nbytes)}, more than the {size(int(_USABLE_SHARE * left))} of "
                         f"address space this process may still map (ulimit -v); R-CONV stops before allocating it")


def ran_out(error):
    """Whether `error` is a failed allocation: a MemoryError (Python's, NumPy's, PARDISO's), or the RuntimeError
    torch's CPU allocator raises instead."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
