"""Where the suite's relative paths point: the repository's root in a checkout, whatever the working directory.

Jupyter runs a notebook from the notebook's own folder, run_all.py from the repository's root,
and Colab from /content. A notebook's `results_dir = "results/..."` must land in the same place
in the first two, so relative paths are read from the checkout's root, never from the working
directory, whenever the library runs from a checkout.
"""

from __future__ import annotations

from pathlib import Path

# The folder above the package (this file is rconv/common/paths.py): the checkout's root when the library runs from one.
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# A file only a checkout has (an installed suite ships the package and the facade, not the runner).
_CHECKOUT_MARKER = "run_all.py"


def repository_root():
    """The checkout the library runs from, or None when it is installed (site-packages, Colab)."""
    return _PACKAGE_PARENT if (_PACKAGE_PARENT / _CHECKOUT_MARKER).is_file() else None


def resolve_path(path):
    """A path as the suite reads it, made absolute.

    Absolute paths are kept; relative ones are relative to the repository's root when the
    library runs from a checkout (whatever the working directory), else to the working directory.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = repository_root()
    return (root if root is not None else Path.cwd()) / path
