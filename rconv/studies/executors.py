"""Running an experiment's tasks: here, one after another, or on any concurrent.futures.Executor.

A sweep is cut into small self-contained tasks, records of plain values (dataset, image indices,
preset, seed, settings, the data folder as a path string), and a module-level function that turns
one task into its rows. `run_tasks` runs them in this process (executor=None) or submits them to an
executor: a dask.distributed Client (a LocalCluster on this machine, or a cluster anywhere; see
`executor_for`), a ProcessPoolExecutor, ... The results come back in the tasks' order however the
tasks were spread, and every task runs on one torch thread, so a table is the same whichever
executor made it: threaded BLAS adds in an order that depends on the thread count, and float64
reconstructions near 270 dB PSNR show those last bits. (Workers on different kinds of CPU may
still round differently.)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import numbers
import traceback
from typing import NamedTuple

import torch

from ..common.errors import RConvError
from ..common.optional import missing
from ..common.progress import progress_bar

DISTRIBUTED_PIN = "dask[distributed]==2026.8.0"  # as requirements-distributed.txt
_INSTALL_HINT = (f"running the studies on a Dask cluster needs the optional dask.distributed package, which is not "
                 f"installed here: pip install -r requirements-distributed.txt in the repository's root (or pip "
                 f"install \"{DISTRIBUTED_PIN}\")")
# Tasks run on one torch thread: the parallelism comes from running tasks side by side, and the
# rounding of every result then does not depend on the executor (see the module's docstring).
_TASK_THREADS = 1
# A worker keeps the factorisations of this many models, the ones it used last: LeNet_All_ReLU's
# take about half a gigabyte, and tasks of neighbouring seeds interleave on a worker.
_MODELS_PER_WORKER = 2
# A task of about this many attacks (a second or more of work) pays for its own setup (a model
# built, images read: up to a second from torchvision's files) and for the executor's
# bookkeeping, while a sweep still splits into many more tasks than a cluster has workers.
ATTACKS_PER_TASK = 100
# SweepFailed's message lists this many failed tasks; .failures holds them all.
_LISTED_FAILURES = 5


class TaskFailure(NamedTuple):
    """A task that raised: its inputs, the exception in a line, and the traceback as its worker saw it."""

    task: object
    error: str
    traceback: str


class SweepFailed(RuntimeError):
    """Some tasks of a sweep raised (errors that are not RConvError): `failures` lists them (TaskFailure:
    inputs, error, traceback) and `table` holds what the other tasks produced, in their order."""

    def __init__(self, desc, failures, tasks, table):
        self.failures, self.table = list(failures), table
        listed = "; ".join(f"{failure.task!r} raised {failure.error}" for failure in self.failures[:_LISTED_FAILURES])
        more = f"; and {len(self.failures) - _LISTED_FAILURES} more" if len(self.failures) > _LISTED_FAILURES else ""
        super().__init__(f"{len(self.failures)} of {tasks} tasks of {desc} failed, and the rows of the others are in "
                         f"this error's .table (its .failures has every failed task's inputs and traceback): "
                         f"{listed}{more}")


def chunked(items, size):
    """items (a sequence) cut into tuples of at most `size`, in order: the image indices of a sweep's tasks."""
    items, size = list(items), max(1, int(size))
    return [tuple(items[start:start + size]) for start in range(0, len(items), size)]


def path_text(path):
    """A data folder as a task carries it: a string, read on the worker as load_images reads it (None: the
    worker's $RCONV_DATA, then data/)."""
    return None if path is None else str(path)


def _new_cache(model):
    """An empty cache for `model`: reconstruct() fills it with what depends only on the model's weights."""
    return {}


@functools.lru_cache(maxsize=_MODELS_PER_WORKER)
def _worker_cache(model):
    """The cache of `model` (any hashable description of it) in this worker process, kept across its tasks.

    Why a memoised function: a worker's cache must live exactly as long as the worker process, and
    concurrent.futures offers no per-worker hook common to every executor (a ProcessPoolExecutor's
    initializer is fixed when the pool is made; Dask's worker plugins are Dask's alone). The
    process's own memo is the one place with that lifetime: bounded (the models used last), keyed
    on the model, so it never hands a task another model's entries (which are keyed on the
    weights' bytes besides), and only ever called inside workers; a serial run uses a cache of its own.
    """
    return _new_cache(model)


@contextlib.contextmanager
def _threads(count):
    """torch on `count` threads for the block, as it was afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_worker(function, task):
    """What an executor runs: one task, on one thread, with its worker process's model caches."""
    with _threads(_TASK_THREADS):
        return function(task, _worker_cache)


def _failure(task, error):
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return TaskFailure(task, f"{type(error).__name__}: {error}", "".join(lines))


def _serial(function, tasks):
    """(position, result, error) per task, run here in order with a cache of this run's own."""
    cache = functools.lru_cache(maxsize=_MODELS_PER_WORKER)(_new_cache)
    with _threads(_TASK_THREADS):
        for position, task in enumerate(tasks):
            try:
                yield position, function(task, cache), None
            except RConvError:
                raise
            except Exception as error:  # a fault of this task: the others go on
                yield position, None, error


def _submitted(function, tasks, executor):
    """(position, result, error) per task as the executor finishes them; the rest cancelled on the way out."""
    futures = {executor.submit(_in_worker, function, task): position for position, task in enumerate(tasks)}
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                yield futures[future], future.result(), None
            except RConvError:
                raise
            except Exception as error:  # a fault of this task, a lost worker, a cancelled future
                yield futures[future], None, error
    finally:  # after an RConvError or Ctrl-C, nothing more is started
        for future in futures:
            future.cancel()


def _as_executor(executor):
    """A concurrent.futures.Executor for `executor`: itself, or a Dask Client's executor."""
    if isinstance(executor, concurrent.futures.Executor):
        return executor
    if callable(getattr(executor, "get_executor", None)):  # a dask.distributed Client
        return executor.get_executor(pure=False)  # every task runs, even one equal to an earlier one
    raise RConvError(f"executor must be None (serial), a concurrent.futures.Executor or a dask.distributed "
                     f"Client; got {type(executor).__name__}")


def run_tasks(function, tasks, collect, *, executor=None, desc, unit="task", sizes=None, progress=True):
    """collect(results) of function(task, cache) over the tasks, results in the tasks' order.

    Args:
        function: a module-level function (workers import it by name) of a task and `cache`:
            cache(model) is the dict reconstruct() keeps for that model (any hashable description
            of it) across the tasks its worker runs. Returns the task's result: plain picklable
            values (rows as dicts; tensors travel too).
        tasks: picklable records of plain values; each says everything its function needs.
        collect: makes the sweep's table from the results of the tasks that succeeded, in order.
        executor: None runs the tasks here, one after another; a concurrent.futures.Executor (a
            ProcessPoolExecutor, ...) or a dask.distributed Client runs them there.
        sizes: how far each task moves the progress bar, which follows the tasks as they finish
            (default one step per task).
    A task's RConvError (its inputs refused: a missing pack, an index past its end) is raised as
    it is and the tasks not yet started are cancelled. Any other exception stops only its task:
    once every task has ended, SweepFailed names the failed tasks with their inputs, and its
    `.table` holds collect() of the others' results.
    """
    tasks = list(tasks)
    sizes = [1] * len(tasks) if sizes is None else list(sizes)
    outcomes = _serial(function, tasks) if executor is None else _submitted(function, tasks, _as_executor(executor))
    results, failures = [None] * len(tasks), {}
    bar = progress_bar(total=sum(sizes), desc=desc, unit=unit, enabled=progress)
    try:
        for position, result, error in outcomes:
            if error is None:
                results[position] = result
            else:
                failures[position] = _failure(tasks[position], error)
            bar.update(sizes[position])
    finally:
        outcomes.close()
        bar.close()
    table = collect([result for position, result in enumerate(results) if position not in failures])
    if failures:
        raise SweepFailed(desc, [failures[position] for position in sorted(failures)], len(tasks), table)
    return table


def distributed_missing():
    """Why the studies cannot run on a Dask cluster here, in one sentence naming the install command; ""
    when they can."""
    return missing(_distributed)


def _distributed():
    try:
        import distributed
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return distributed


@contextlib.contextmanager
def executor_for(scheduler):
    """The executor a notebook's `scheduler` parameter names, closing afterwards what it opened.

    scheduler: None runs serially in this process (yields None); a number n starts a Dask
    LocalCluster of n worker processes (one thread each) on this machine, shut down afterwards;
    a string is the address of a running Dask scheduler ("tcp://host:8786"), whose cluster stays
    up. Yields what the experiment loops take as `executor`. Dask is optional: without it a
    cluster raises ImportError naming the install command.
    """
    if scheduler is None:
        yield None
        return
    if isinstance(scheduler, bool) or not isinstance(scheduler, (numbers.Integral, str)) \
            or (isinstance(scheduler, numbers.Integral) and scheduler < 1) or scheduler == "":
        raise RConvError(f"scheduler must be None (serial), a number of local workers (1 or more) or a Dask "
                         f"scheduler's address such as 'tcp://host:8786'; got {scheduler!r}")
    distributed = _distributed()
    if isinstance(scheduler, str):
        try:
            client = distributed.Client(scheduler)
        except (OSError, TimeoutError, ValueError) as error:  # nobody answers; not an address at all
            raise RConvError(f"could not reach the Dask scheduler at {scheduler!r} ({error}); start one "
                             f"(dask scheduler) or give a number of local workers instead") from error
        with client:
            yield client
        return
    with distributed.LocalCluster(n_workers=int(scheduler), threads_per_worker=_TASK_THREADS, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        yield client
