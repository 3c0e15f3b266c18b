"""The mini-batch study: R-CONV (and the breaching baselines) on the mean gradients of B images.

batch_sweep attacks consecutive batches of a dataset's images for each network, batch size and
gradient dtype, and writes one tidy row per image: the counting bound beside the outcome, the
recovered label, exactness and the image metrics after matching each original to its
reconstruction (the attack returns a batch in no particular order). batch_summary condenses it.
"""

from __future__ import annotations

from typing import NamedTuple

from ..analysis.reports import constraint_report, match_batch
from ..attack.reconstruct import reconstruct
from ..cases.client import as_dtype, client_gradients, dtype_name
from ..cases.models import convnet_settings
from ..cases.setup import setup
from ..common.checks import whole_number, whole_numbers
from .baselines import run_baseline
from .executors import run_tasks


class _BatchTask(NamedTuple):
    """One batch of one network: its images' indices, the gradients' dtype, and the baselines to run beside."""

    dataset: str
    model: str
    seed: int
    dtype: str
    indices: tuple
    data_root: str | None
    overrides: tuple  # build_model's overrides as (name, value) pairs
    baselines: tuple  # (name, iterations) pairs


def _rows(setting, result, matched, method):
    reasons = list(getattr(result, "reasons", []))
    return [dict(setting, method=method, seconds=result.seconds, found=len(result.image),
                 batch_exact=bool(result.exact), reason=reasons[0] if reasons else "") | row
            for row in matched.table.to_dict("records")]


def _batch_task(task, cache):
    """The rows of one batch: R-CONV first, then each baseline on the same gradients."""
    case = setup(task.dataset, task.model, list(task.indices), task.seed, data_root=task.data_root,
                 **dict(task.overrides))
    batch = len(task.indices)
    bound = constraint_report(case.model, tuple(case.images.shape[1:]), batch_size=batch).attrs["max_batch"]
    init = dict(task.overrides).get("init", convnet_settings(task.model).get("init", "paper"))
    setting = dict(dataset=case.info["name"], model=task.model, init=init, seed=task.seed, dtype=task.dtype,
                   batch_size=batch, first_index=task.indices[0], max_batch=bound, within_bound=batch <= bound)
    grads = client_gradients(case.model, case.images, case.labels, dtype=as_dtype(task.dtype))
    weights = cache((case.info["name"], task.model, task.seed, repr(task.overrides)))
    result = reconstruct(case.model, grads, tuple(case.images.shape[1:]), cache=weights)
    rows = _rows(setting, result, match_batch(case.images, case.labels, result), "rconv")
    for name, iterations in task.baselines:
        baseline = run_baseline(name, case.model, grads, tuple(case.images.shape[1:]), iterations=iterations,
                                batch_size=batch)
        rows += _rows(setting, baseline, match_batch(case.images, case.labels, baseline), name)
    for row in rows:
        row["index"] = task.indices[row["member"]]
    return rows


def _check_sizes(batch_sizes):
    return whole_numbers(batch_sizes, "batch_sizes")


def batch_sweep(dataset, models, batch_sizes, *, dtypes=("float64", "float32"), batches=1, seed=50, data_root=None,
                overrides=None, baselines=None, executor=None, progress=True):
    """One row per image of each batch: R-CONV (and baselines) on the mean gradients of B consecutive images.

    Args:
        models: preset names; batch_sizes: the B to try; batches: how many batches of each size
            (batch k of size B holds images k*B .. k*B + B - 1).
        overrides: build_model's overrides for every network, e.g. {"init": "default"}.
        baselines: None, or a dict baseline name -> iterations, run through breaching on the same gradients.
        executor: None (here, one batch after another), or a concurrent.futures.Executor / Dask Client.
    """
    import pandas as pd
    sizes = _check_sizes(batch_sizes)
    whole_number(batches, "batches")
    dtypes = [dtype_name(as_dtype(d)) for d in dtypes]
    pairs = tuple(sorted((baselines or {}).items()))
    changes = tuple(sorted((overrides or {}).items()))
    tasks = [_BatchTask(dataset, model, seed, dtype, tuple(range(k * size, (k + 1) * size)), data_root, changes, pairs)
             for model in models for size in sizes for dtype in dtypes for k in range(batches)]
    return run_tasks(_batch_task, tasks, lambda results: pd.DataFrame([r for rows in results for r in rows]),
                     executor=executor, desc="batches", unit="image", sizes=[len(t.indices) for t in tasks],
                     progress=progress)

