"""The optional packages (breaching, Dask, Opacus): whether one can be used here, and if not, why."""

from __future__ import annotations


def missing(load):
    """Why an optional package cannot be used here: the ImportError `load()` raises (its message names the
    install command), or "" when it loads."""
    try:
        load()
    except ImportError as error:
        return str(error)
    return ""
