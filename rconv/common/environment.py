"""What made a set of results: the library versions and the machine whose arithmetic they carry.

float32 results round differently from one torch, numpy, scipy or MKL version to the next, and
from one CPU to another, so results are stored with the environment that made them, and a
regeneration under another environment says so.
"""

from __future__ import annotations

import platform
from importlib import metadata

# The packages whose arithmetic reaches the stored tables (MKL: PARDISO and, through numpy or torch, BLAS).
PINNED_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "mkl", "pandas", "scikit-image")
# Recorded for the reader, never a reason to warn: every sweep's task runs on one torch thread, so the
# tables do not depend on how many cores the machine has.
_INFORMATIONAL = ("cores",)


def _cpu():
    """The processor's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def current_environment():
    """The environment this process computes in: Python, the pinned packages' versions, the CPU and its cores."""
    import os
    return {"python": platform.python_version(), **{package: _version(package) for package in PINNED_PACKAGES},
            "cpu": _cpu(), "cores": os.cpu_count()}


def environment_differences(stored, current):
    """Lines naming what differs between two environments' records (empty when they agree), in the
    keys both hold: a record made by an older suite may lack some."""
    return [f"{key}: {stored[key]} then, {current[key]} now" for key in stored
            if key in current and key not in _INFORMATIONAL and stored[key] != current[key]]
