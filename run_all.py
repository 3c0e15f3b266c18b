"""Execute every notebook of the suite with papermill and regenerate results/.

    python run_all.py                          # all notebooks; stored notebooks and results/ are updated
    python run_all.py --only Test_on_CIFAR10   # one notebook (repeat --only for more)
    python run_all.py --quick --results-dir DIR   # a few images each; stored notebooks stay untouched
    python run_all.py --list
    python run_all.py --render                 # rewrite the templated notebooks whose cells left their template
    python run_all.py --workers 2              # the Experiments' sweeps on a LocalCluster of 2 workers (Dask)
    python run_all.py --scheduler tcp://host:8786   # ... or on a running Dask cluster

notebooks.toml lists the notebooks; the Various_settings and Testing ones are rendered from templates/
(--render), then executed like the others. --jobs N runs N notebooks side by side; --workers and
--scheduler spread each Experiments notebook's sweeps over a Dask cluster (its `scheduler` parameter),
whose tables are identical to a serial run's but for the seconds columns. A cell that runs longer
than --cell-timeout seconds has hung, and fails its notebook.

Each notebook runs into its own staging folder inside the results folder. Only when it succeeds
do its executed notebook and its results subfolder (CSVs, figures) replace the stored ones,
together, with summary.csv and README.md rebuilt from the stored results; a notebook that fails,
or a run stopped with Ctrl-C, leaves everything as it was. run_all marks the results folders it
makes (.run_all.json says whether they hold quick or full results) and refuses a folder that is
not empty and not its own, a quick run into full results (or into the repository's results/),
and a second run on the same folder while one holds its lock (.run_all.lock). The exit status is
non-zero when a notebook failed, and the message names the notebook and the cell.
"""
import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from typing import NamedTuple

import nbformat
from jupyter_client.manager import AsyncKernelManager

# EXPERIMENTS, LOCK and MARKER too: what a reader of run_all (or a test) looks for here
from runner import EXPERIMENTS, NOTEBOOKS, ON_CLUSTER, ROOT  # noqa: F401
from runner.cluster import dask_cluster
from runner.folders import LOCK, MARKER, STAGING, STORED_RESULTS, Refused, relative, results_folder, store  # noqa: F401
from runner.notebooks import clean, render, render_stored
from runner.summary import ENVIRONMENT, environment_warnings, recorded_environment, summarize

INTERRUPTED = 130  # the shell's exit status after Ctrl-C
CELL_TIMEOUT = 7200  # seconds; the longest cell of a full run (Success_rates' sweep) takes under an hour
_STOP_SECONDS = 10  # after Ctrl-C, how long the running notebooks get to notice their killed kernels
_KILL_EVERY = 0.5  # seconds between two passes killing kernels, one of which may have been starting


class _Job(NamedTuple):
    name: str
    source: Path  # the notebook it executes: the stored one, or its template rendered into the stage
    stage: Path  # its staging folder: results/, notebook.ipynb, kernel.log
    folder: Path  # the results subfolder its staged results/ replaces
    output: Path  # where its executed notebook is stored
    parameters: dict  # results_dir points at stage/results


class _Outcome(NamedTuple):
    name: str
    ok: bool
    seconds: float
    error: str = ""  # where it failed: the cell and its exception


def _kernel_class(job, kernels):
    """The kernel manager of a job's notebook: the kernel's own output goes to the job's kernel.log, not the
    terminal, and it enters `kernels` so that Ctrl-C can kill it (nbclient still starts and shuts it down)."""
    class Kernel(AsyncKernelManager):
        async def start_kernel(self, **options):
            kernels[job.name] = self
            with open(job.stage / "kernel.log", "w") as log:
                await super().start_kernel(stdout=log, stderr=log, **options)
    return Kernel


def _execute(job, cell_timeout, kernels):
    """Run a job's notebook into its staging folder (in an executor's thread); returns its outcome."""
    import papermill
    started, start = [None], time.perf_counter()
    try:
        papermill.execute_notebook(
            str(job.source), str(job.stage / "notebook.ipynb"), parameters=job.parameters,
            kernel_name="python3", progress_bar=False, execution_timeout=cell_timeout, coalesce_streams=True,
            kernel_manager_class=_kernel_class(job, kernels), resources={"metadata": {"path": str(ROOT)}},
            on_cell_start=lambda cell, cell_index: started.__setitem__(0, cell_index))
        clean(job.stage / "notebook.ipynb", job.parameters["results_dir"], relative(job.folder))
        error = ""
    except Exception as failure:  # a failing or hung cell, a dead kernel, an unreadable notebook, a full disk, ...
        cell = getattr(failure, "cell_index", started[0])
        what = f"{getattr(failure, 'ename', type(failure).__name__)}: {str(getattr(failure, 'evalue', failure))[:300]}"
        error = what if cell is None else f"cell {cell} ({what})"
    return _Outcome(job.name, not error, time.perf_counter() - start, error)


def _jobs(names, results_dir, quick, in_place, data_root, scheduler=None):
    """A job per notebook, its staging folder made; the Experiments get `scheduler` (a Dask scheduler's
    address) when given."""
    try:  # run what a template renders, so that no value an earlier run baked in lingers
        rendered = {name: nbformat.writes(render(name)) for name in names if "template" in NOTEBOOKS[name]}
    except OSError as error:
        raise Refused(f"cannot render a templated notebook: {error.strerror or error} ({error.filename})") from error
    jobs = []
    try:
        for name in names:
            entry = NOTEBOOKS[name]
            parameters = dict(entry["quick"] if quick else {})
            if scheduler is not None and name in ON_CLUSTER:
                parameters["scheduler"] = scheduler
            if data_root:
                # relative to the repository, where the kernels run: stored notebooks keep no machine's paths
                parameters["data_root"] = os.path.relpath(Path(data_root).resolve(), ROOT)
            stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{name}-", dir=results_dir))
            output = ROOT / entry["path"] if in_place else results_dir / "notebooks" / entry["path"]
            source = ROOT / entry["path"]
            if name in rendered:
                source = stage / "source.ipynb"
                source.write_text(rendered[name])
            jobs.append(_Job(name, source, stage, results_dir / entry["results"], output,
                             dict(parameters, results_dir=relative(stage / "results"))))
    except BaseException as error:  # an unwritable folder, or Ctrl-C: leave no staging folder behind
        for job in jobs:
            shutil.rmtree(job.stage, ignore_errors=True)
        if isinstance(error, OSError):
            raise Refused(f"cannot write results to {results_dir} ({error.strerror or error})") from error
        raise
    return jobs


def _stop(futures, kernels):
    """Stop the running notebooks: kill their kernels (again, for one that was still starting) until every
    thread has returned, so that no late write lands in a staging folder about to be removed."""
    deadline = time.monotonic() + _STOP_SECONDS
    while wait(futures, timeout=_KILL_EVERY).not_done and time.monotonic() < deadline:
        for kernel in list(kernels.values()):
            process = getattr(kernel.provisioner, "process", None)
            if process is not None:
                process.kill()


def _run(jobs, results_dir, parallel, cell_timeout):
    """Run the jobs, storing each one that succeeds; returns (outcomes, summary table or None, interrupted)."""
    from tqdm import tqdm
    outcomes, table, interrupted = [], None, False
    bar = tqdm(total=len(jobs), desc="notebooks", unit="notebook")
    pool = ThreadPoolExecutor(parallel)
    kernels = {}  # job name -> the kernel running its notebook, for Ctrl-C to kill
    futures = {pool.submit(_execute, job, cell_timeout, kernels): job for job in jobs}
    try:
        for future in as_completed(futures):
            job, outcome = futures[future], future.result()
            if outcome.ok:
                try:
                    summary = summarize(results_dir, {job.name: job.stage / "results"})
                    texts = {job.output: (job.stage / "notebook.ipynb").read_text(),
                             results_dir / "README.md": summary.readme,
                             results_dir / ENVIRONMENT: recorded_environment(results_dir, job.name)}
                    if summary.table is not None:
                        texts[results_dir / "summary.csv"] = summary.table.to_csv(index=False)
                    store(job.stage, job.folder, texts)
                    table = summary.table
                except Exception as error:  # results the summary cannot read, a full disk, ...
                    outcome = outcome._replace(ok=False, error=f"storing its results failed: "
                                                               f"{type(error).__name__}: {error}"[:400])
            outcomes.append(outcome)
            bar.update()
            tqdm.write(f"{'ok    ' if outcome.ok else 'FAILED'} {outcome.name} ({outcome.seconds:.0f} s)")
    except KeyboardInterrupt:
        interrupted = True
    finally:  # after Ctrl-C (or a fault in run_all itself): stop the notebooks, drop the unfinished stages
        pool.shutdown(wait=False, cancel_futures=True)
        _stop(futures, kernels)
        finished = {outcome.name for outcome in outcomes}
        for job in jobs:
            if job.name not in finished:
                shutil.rmtree(job.stage, ignore_errors=True)
        bar.close()
    return outcomes, table, interrupted


def main(argv=None):
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few images per notebook, for tests")
    parser.add_argument("--only", action="append", metavar="NAME", help="a notebook's name; repeatable")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA, then data/)")
    parser.add_argument("--results-dir", help="where CSVs, figures and the executed notebooks go: a new or empty "
                                              "folder, or one run_all made for results of the same kind "
                                              "(default: results/, with the stored notebooks updated in place)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run side by side, each in its own kernel")
    parser.add_argument("--cell-timeout", type=int, default=CELL_TIMEOUT, metavar="SECONDS",
                        help=f"a cell running longer has hung and fails its notebook (default {CELL_TIMEOUT})")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N", help="run the Experiments' sweeps on a Dask "
                                                                   "LocalCluster of N workers started for the run")
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="run the Experiments' sweeps on the running Dask "
                                                                "cluster whose scheduler is at ADDRESS")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    parser.add_argument("--render", action="store_true", help="rewrite, without outputs, each templated notebook "
                                                              "whose cells differ from its template's, and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, entry in NOTEBOOKS.items():
            print(f"{name:18} {entry['path']:40} results/{entry['results']}")
        return 0
    if args.render:
        for name in render_stored():
            print(f"rendered {NOTEBOOKS[name]['path']} from {NOTEBOOKS[name]['template']}; run it to store outputs")
        return 0
    names = list(dict.fromkeys(args.only or NOTEBOOKS))
    unknown = [name for name in names if name not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook {', '.join(unknown)}; choose from {', '.join(NOTEBOOKS)}")
    for option in ("jobs", "workers", "cell_timeout"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1; got {getattr(args, option)}")
    if args.scheduler is not None and not args.scheduler.strip():
        parser.error("--scheduler needs a Dask scheduler's address, such as tcp://host:8786")
    on_cluster = (args.workers or args.scheduler) and set(names) & set(ON_CLUSTER)
    if on_cluster:
        from rconv.studies.executors import distributed_missing
        if distributed_missing():
            parser.error(distributed_missing())
    if args.quick and args.results_dir is None:
        parser.error("--quick runs a few images only; give --results-dir so that the stored notebooks and "
                     "results/ stay untouched")
    results_dir = STORED_RESULTS if args.results_dir is None else Path(args.results_dir).expanduser().resolve()
    # the stored notebooks are updated only by a full run into the repository's results/
    in_place = results_dir == STORED_RESULTS and not args.quick

    if args.jobs > 1:
        # Kernels inherit this: several multi-threaded kernels on few cores would spin against each other.
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(variable, threads)
    for warning in environment_warnings(results_dir, names):
        print(f"warning: {warning}", file=sys.stderr)
    # papermill logs each failure as it happens; _report says it once, with the cell.
    logging.getLogger("papermill").addHandler(logging.NullHandler())
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a run as Ctrl-C does
    jobs, outcomes, table, interrupted = [], [], None, False
    try:
        with results_folder(results_dir, "quick" if args.quick else "full"), \
                dask_cluster(args.scheduler or args.workers if on_cluster else None) as scheduler:
            jobs = _jobs(names, results_dir, args.quick, in_place, args.data_root, scheduler)
            outcomes, table, interrupted = _run(jobs, results_dir, args.jobs, args.cell_timeout)
    except Refused as error:
        parser.error(str(error))
    except KeyboardInterrupt:  # before any notebook started: no results were touched
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _report(outcomes, table, interrupted, jobs, results_dir)


def _report(outcomes, table, interrupted, jobs, results_dir):
    """Print the stored summary and every failure; returns the exit status."""
    print()
    if table is not None:
        columns = [column for column in ("notebook", "dtype", "images", "exact", "rank_deficient", "median_psnr",
                                          "median_seconds") if column in table.columns]
        print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nsummary: {relative(results_dir / 'summary.csv')}")
    stages = {job.name: job.stage for job in jobs}
    failed = [outcome for outcome in outcomes if not outcome.ok]
    for outcome in failed:
        print(f"FAILED: {outcome.name} at {outcome.error}; its stored notebook and results are unchanged, and "
              f"its partial run is kept in {relative(stages[outcome.name])} until the next run", file=sys.stderr)
    if interrupted:
        print("interrupted: every notebook that had not finished left its stored notebook and results as they "
              "were", file=sys.stderr)
        return INTERRUPTED
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
