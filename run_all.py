"""Execute every notebook of the suite with papermill and regenerate results/.

    python run_all.py                          # all notebooks; stored notebooks and results/ are updated
    python run_all.py --only Test_on_CIFAR10   # one notebook (repeat --only for more)
    python run_all.py --quick --results-dir DIR   # a few images each; stored notebooks stay untouched
    python run_all.py --list
    python run_all.py --workers 2              # the Experiments' sweeps on a LocalCluster of 2 workers (Dask)
    python run_all.py --scheduler tcp://host:8786   # ... or on a running Dask cluster

--jobs N runs N notebooks side by side; --workers and --scheduler spread each Experiments
notebook's sweeps over a Dask cluster (its `scheduler` parameter), whose tables are identical to
a serial run's but for the seconds columns.

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
import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent
STORED_RESULTS = ROOT / "results"  # the full results the repository keeps, beside the stored notebooks
MARKER = ".run_all.json"  # in every results folder run_all made: {"kind": "full" or "quick"}
LOCK = ".run_all.lock"  # held by the run writing to a results folder
STAGING = ".staging-"  # prefix of a notebook's staging folder inside the results folder
KINDS = ("full", "quick")
INTERRUPTED = 130  # the shell's exit status after Ctrl-C
# A stopped worker's kernel sees its parent gone within about a second (ipykernel polls once a
# second) and exits; its staging folder is removed only after that, so no late write recreates it.
_KERNEL_EXIT_SECONDS = 1.5
_POLL_SECONDS = 0.2  # how often the main process looks at its workers
_STOP_SECONDS = 10  # a worker asked to stop gets this long before it is killed


class Notebook(NamedTuple):
    """A notebook of the suite and how run_all runs it (its own parameters cell holds the full setting)."""

    path: str  # relative to the repository
    results: str  # subfolder of the results directory
    parameters: dict  # what run_all gives it on a full run, beyond results_dir and data_root
    quick: dict  # what --quick changes


QUICK_IMAGES = dict(n_images=3)
NOTEBOOKS = {
    "LeNet": Notebook("Various_settings/LeNet.ipynb", "various_settings/LeNet", {}, QUICK_IMAGES),
    "LeNet_O": Notebook("Various_settings/LeNet_O.ipynb", "various_settings/LeNet_O", {}, QUICK_IMAGES),
    "O_CNN6": Notebook("Various_settings/O_CNN6.ipynb", "various_settings/O_CNN6", {}, QUICK_IMAGES),
    "LeNet_4_ReLU": Notebook("Various_settings/LeNet_4_ReLU.ipynb", "various_settings/LeNet_4_ReLU", {},
                             QUICK_IMAGES),
    "LeNet_All_ReLU": Notebook("Various_settings/LeNet_All_ReLU.ipynb", "various_settings/LeNet_All_ReLU", {},
                               dict(n_images=1)),  # 1.3 s per attack (the error bound's probe doubles it)
    "Test_on_MNIST": Notebook("Testing/Test_on_MNIST.ipynb", "testing/mnist", {}, QUICK_IMAGES),
    "Test_on_CIFAR10": Notebook("Testing/Test_on_CIFAR10.ipynb", "testing/cifar10", {}, QUICK_IMAGES),
    "Test_on_CIFAR100": Notebook("Testing/Test_on_CIFAR100.ipynb", "testing/cifar100", {}, QUICK_IMAGES),
    "Precision": Notebook("Experiments/Precision.ipynb", "experiments/precision", {},
                          dict(n_images=1, datasets=["cifar10"])),
    "Defences": Notebook("Experiments/Defences.ipynb", "experiments/defences", {},
                         dict(n_images=1, datasets=["cifar10"], gaussian=[1e-6, 1e-2], topk=[1.0, 0.1],
                              quantize=[12, 4])),
    "Filters": Notebook("Experiments/Filters.ipynb", "experiments/filters", {},
                        dict(n_images=1, n_seeds=1, models=["lenet"], positions=[3, 4], scales=[0.5, 1.0, 2.0])),
    "Success_rates": Notebook("Experiments/Success_rates.ipynb", "experiments/success_rates", {},
                              dict(n_images=2, heavy_images=1, n_seeds=1)),
    "Baselines": Notebook("Experiments/Baselines.ipynb", "experiments/baselines", {},
                          dict(n_images=1, datasets=["cifar10"], models=["lenet"], dlg_iterations=3,
                               ig_iterations=10)),
    "High_resolution": Notebook("Experiments/High_resolution.ipynb", "experiments/high_resolution", {},
                                dict(n_images=2, networks=[["lenet", 32], ["lenet_hr64", 64]],
                                     counterexamples=[["lenet", 64]], wide_images=0)),
    "Batches": Notebook("Experiments/Batches.ipynb", "experiments/batches", {},
                        dict(datasets=["cifar100"], models=["lenet_batch"], batch_sizes=[1, 2], dtypes=["float64"], batches=1,
                             baseline_sizes=[2], baseline_iterations={"dlg": 2, "inverting_gradients": 2},
                             show_size=2)),
}
EXPERIMENTS = ("Precision", "Defences", "Filters", "Success_rates", "Baselines", "High_resolution", "Batches")
# Parameters that say how a notebook was run, not what it computed: never baked into a stored
# notebook (a cluster's address means nothing to a reader, and would fail a rerun).
HOW_RUN = ("scheduler",)
# The Experiments whose sweeps take a `scheduler`; High_resolution stays serial, as it measures time and memory.
ON_CLUSTER = ("Precision", "Defences", "Filters", "Success_rates", "Baselines", "Batches")


class _Refused(Exception):
    """A results folder run_all must not (or cannot) write to; the message says why."""


class _Job(NamedTuple):
    """One notebook to run: where it stages, and what it replaces when it succeeds."""

    name: str
    notebook: str  # relative to the repository
    stage: Path  # its staging folder: job.json, worker.log, results/, notebook.ipynb, outcome.json
    folder: Path  # the results subfolder its staged results/ replaces
    output: Path  # where its executed notebook is stored
    parameters: dict  # results_dir points at stage/results


class _Outcome(NamedTuple):
    """How a notebook's run ended."""

    name: str
    ok: bool
    seconds: float
    error: str = ""  # where it failed: the cell and its exception


class _Summary(NamedTuple):
    """What summary.csv and README.md will hold."""

    table: object  # a pandas DataFrame, or None when no Testing or Various_settings results are stored
    readme: str


def _clean(path, staged=None, final=None):
    """Drop what changes on every run (timings, execution counts, the machine's paths) so a rerun gives
    a small diff, and bake papermill's injected parameters into the parameters cell.

    The staging folder's path (`staged`), wherever papermill recorded it, becomes the stored
    results folder's (`final`), so that stored notebooks never name a staging folder.
    """
    import nbformat
    notebook = nbformat.read(path, as_version=4)
    if staged is not None:
        text = nbformat.writes(notebook).replace(json.dumps(staged)[1:-1], json.dumps(final)[1:-1])
        notebook = nbformat.reads(text, as_version=4)
    _bake_parameters(notebook)
    parameters = notebook.metadata.get("papermill", {}).get("parameters")
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)
    if parameters is not None:
        notebook.metadata["papermill"] = {"parameters": {name: value for name, value in parameters.items()
                                                         if name not in HOW_RUN}}
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.outputs = _settle_streams(cell.outputs)
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = None
                _scrub_output(output)
    nbformat.write(notebook, path)


def _bake_parameters(notebook):
    """Write papermill's injected values into the parameters cell, and drop the injected cell.

    Stored, the injected cell would silently override whatever a reader edits in the parameters
    cell; baked in, the parameters cell shows what the stored outputs were computed with.
    """
    def tagged(tag):
        return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]

    injected, parameters = tagged("injected-parameters"), tagged("parameters")
    if not injected or not parameters:
        return
    values = {}
    for cell in injected:
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                    and node.targets[0].id not in HOW_RUN:
                values[node.targets[0].id] = ast.get_source_segment(cell.source, node.value)
    source = parameters[0].source.encode()  # ast's column offsets count bytes
    line_starts = [0] + [k + 1 for k, byte in enumerate(source) if byte == ord("\n")]
    spans = [(line_starts[node.value.lineno - 1] + node.value.col_offset,
              line_starts[node.value.end_lineno - 1] + node.value.end_col_offset, values.pop(node.targets[0].id))
             for node in ast.parse(source).body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in values]
    for start, end, value in reversed(spans):
        source = source[:start] + value.encode() + source[end:]
    parameters[0].source = source.decode() + "".join(f"\n{name} = {value}" for name, value in values.items())
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]


# An absolute path into an environment's packages, as warnings print it: shown from site-packages on.
_PACKAGES_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"<>:]*?/((?:site|dist)-packages)/")
_ROOT_PATH = re.compile(re.escape(str(ROOT)) + r"(/|(?![\w.-]))")


def _scrub(text):
    """text without the absolute paths of the machine that ran it: the repository's become relative."""
    text = _PACKAGES_PATH.sub(r"\1/", text)
    return _ROOT_PATH.sub(lambda match: "" if match.group(1) else ".", text)


def _scrub_output(output):
    """_scrub() on every text an output holds (streams, text/* data, tracebacks), not on images."""
    for key in ("text", "evalue"):
        if key in output:
            output[key] = _scrub("".join(output[key]) if isinstance(output[key], list) else output[key])
    if "traceback" in output:
        output["traceback"] = [_scrub(line) for line in output["traceback"]]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/"):
            output["data"][mime] = _scrub("".join(value) if isinstance(value, list) else value)


def _settle_streams(outputs):
    """Merge consecutive stdout/stderr chunks and keep what a terminal would finally show.

    Progress bars redraw their line with carriage returns, one output chunk per redraw; stored
    as they come they bloat the notebook and make every rerun's diff huge.
    """
    settled = []
    for output in outputs:
        if (output.get("output_type") == "stream" and settled and settled[-1].get("output_type") == "stream"
                and settled[-1].get("name") == output.get("name")):
            settled[-1]["text"] += output["text"]
        else:
            settled.append(output)
    for output in settled:
        if output.get("output_type") == "stream":
            lines = output["text"].split("\n")
            output["text"] = "\n".join(line.rstrip("\r").split("\r")[-1] for line in lines)
    return settled


def _where(error):
    """Where a notebook run failed, in a line: the cell and its exception, or the exception."""
    if hasattr(error, "cell_index"):
        return f"cell {error.cell_index} ({error.ename}: {str(error.evalue)[:300]})"
    return f"{type(error).__name__}: {str(error)[:300]}"


def _worker(stage):
    """A worker process's work: run the job staged in `stage` and write its outcome there.

    main() starts one per notebook, in its own session, so that Ctrl-C reaches only main(),
    which decides what happens to the workers.
    """
    stage = Path(stage)
    job = json.loads((stage / "job.json").read_text())
    start = time.perf_counter()
    error = ""
    try:
        import papermill
        papermill.execute_notebook(str(ROOT / job["notebook"]), str(stage / "notebook.ipynb"),
                                   parameters=job["parameters"], kernel_name="python3", cwd=str(ROOT),
                                   progress_bar=False, log_output=False)
        _clean(stage / "notebook.ipynb", job["staged"], job["final"])
    except Exception as failure:  # a failing cell, a dead kernel, an unreadable notebook, a full disk, ...
        error = _where(failure)
    outcome = dict(ok=not error, seconds=time.perf_counter() - start, error=error)
    _write_atomically(stage / "outcome.json", json.dumps(outcome))


def _beside(path, text):
    """A new file next to `path` holding `text`, ready to replace it with a rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.staged-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def _write_atomically(path, text):
    """Write a file so that a reader (or a crash) sees the old content or the new, never a part."""
    os.replace(_beside(path, text), path)


def _relative(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def _read_marker(folder):
    """The kind of results a folder of run_all's holds ("full" or "quick"), or None when it is not one."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as error:
        raise _Refused(f"{marker} cannot be read ({error}); remove it only if {folder} holds nothing you "
                       f"need") from error
    if kind not in KINDS:
        raise _Refused(f"{marker} names kind {kind!r}, not one of {', '.join(KINDS)}")
    return kind


def _check_results_dir(results_dir, kind):
    """Refuse, before anything is written, a results folder this run must not write to."""
    if kind == "quick" and results_dir == STORED_RESULTS:
        raise _Refused(f"a quick run never writes into {_relative(STORED_RESULTS)}/, which holds the full "
                       f"results beside the stored notebooks; give another --results-dir")
    for parent in results_dir.parents:
        if (parent / MARKER).is_file():
            raise _Refused(f"{results_dir} lies inside the results folder {parent} of run_all.py; give a "
                           f"folder outside it")
    if results_dir.exists() and not results_dir.is_dir():
        raise _Refused(f"--results-dir {results_dir} is a file, not a folder")
    if not results_dir.is_dir():
        return
    held = _read_marker(results_dir)
    try:
        empty = all(entry.name == LOCK for entry in results_dir.iterdir())  # a lock alone holds no results
    except OSError as error:
        raise _Refused(f"cannot read {results_dir} ({error.strerror or error})") from error
    if held is None and not empty:
        raise _Refused(f"{results_dir} is not empty and is not a results folder of run_all.py (it has no "
                       f"{MARKER}); give an empty or new folder")
    if held is not None and held != kind:
        raise _Refused(f"{results_dir} holds {held} results; a {kind} run never writes over them, so give "
                       f"another folder (or remove {results_dir})")


def _hold_lock(handle, results_dir):
    """Lock the open lock file and write this process's id in it, or refuse: another run holds it.

    The operating system releases the lock when its holder exits, however it exits.
    """
    try:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt
            msvcrt.locking(handle, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.read(handle, 32).decode(errors="replace").strip()
        raise _Refused(f"another run_all.py{f' (process {holder})' if holder else ''} is writing to "
                       f"{results_dir} (it holds {LOCK}); wait for it to finish") from error
    os.ftruncate(handle, 0)
    os.write(handle, str(os.getpid()).encode())


@contextlib.contextmanager
def _results_folder(results_dir, kind):
    """The results folder, created if need be, marked as run_all's, and locked for this run."""
    _check_results_dir(results_dir, kind)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(results_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _Refused(f"cannot write results to {results_dir} ({error.strerror or error})") from error
    try:
        _hold_lock(handle, results_dir)
        _check_results_dir(results_dir, kind)  # again, now that no other run can change it
        if _read_marker(results_dir) is None:
            _write_atomically(results_dir / MARKER, json.dumps({"kind": kind}) + "\n")
        for leftover in results_dir.glob(f"{STAGING}*"):  # of runs that failed or were killed
            shutil.rmtree(leftover, ignore_errors=True)
        yield results_dir
    finally:
        os.close(handle)


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C (and SIGTERM) until the block is done, then raise KeyboardInterrupt: a commit is all or
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(number, frame):
        received.append(number)

    previous = {number: signal.signal(number, hold) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            raise KeyboardInterrupt


def _interrupt(number, frame):
    raise KeyboardInterrupt


def _stage(name, results_dir, notebook, subfolder, parameters, output):
    """A job with its staging folder made, its parameters pointing the notebook's results there."""
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGING}{name}-", dir=results_dir))
    staged, final = _relative(stage / "results"), _relative(results_dir / subfolder)
    job = _Job(name, notebook, stage, results_dir / subfolder, output, dict(parameters, results_dir=staged))
    (stage / "job.json").write_text(json.dumps(dict(notebook=notebook, parameters=job.parameters, staged=staged,
                                                    final=final)))
    return job


def _start(job):
    """Start the worker process of a job, in its own session (Ctrl-C goes to main() alone)."""
    with open(job.stage / "worker.log", "w") as log:
        return subprocess.Popen([sys.executable, "-c", "import sys, run_all; run_all._worker(sys.argv[1])",
                                 str(job.stage)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _outcome(job, process):
    """What the worker of a finished job reported, or why it reported nothing."""
    try:
        return _Outcome(job.name, **json.loads((job.stage / "outcome.json").read_text()))
    except (OSError, ValueError, TypeError):
        log = (job.stage / "worker.log").read_text(errors="replace").strip().splitlines()[-3:] \
            if (job.stage / "worker.log").exists() else []
        return _Outcome(job.name, False, 0.0, f"the worker exited with status {process.returncode} without a "
                                              f"result: {' / '.join(log)[:300]}")


def _stop(processes):
    """Stop running workers; their kernels follow them out."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if processes:
        time.sleep(_KERNEL_EXIT_SECONDS)


def _commit(job, summary, results_dir):
    """Put a succeeded job's results subfolder and executed notebook in place, with summary.csv and
    README.md. Every file is first written beside its destination, so that what remains is renames;
    run with interrupts held."""
    staged = job.stage / "results"
    staged.mkdir(exist_ok=True)  # a notebook that wrote nothing still replaces its folder
    job.folder.parent.mkdir(parents=True, exist_ok=True)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    texts = {job.output: (job.stage / "notebook.ipynb").read_text(), results_dir / "README.md": summary.readme}
    if summary.table is not None:
        texts[results_dir / "summary.csv"] = summary.table.to_csv(index=False)
    ready = {}
    try:
        for destination, text in texts.items():
            ready[destination] = _beside(destination, text)
        replaced = job.stage / "replaced"
        had_folder = job.folder.exists()
        if had_folder:
            os.rename(job.folder, replaced)
        try:
            os.rename(staged, job.folder)
        except OSError:
            if had_folder:
                os.rename(replaced, job.folder)
            raise
        for destination, temporary in ready.items():
            os.replace(temporary, destination)
    finally:
        for temporary in ready.values():
            temporary.unlink(missing_ok=True)
    shutil.rmtree(job.stage, ignore_errors=True)


def _render(results_dir, folders=None):
    """summary.csv's table and README.md's text from the results under results_dir, where `folders`
    (name -> folder) stands in for the stored subfolders of the notebooks about to be stored."""
    import pandas as pd
    import rconv_core as rc
    folders = folders or {}
    located = {name: Path(folders.get(name, results_dir / NOTEBOOKS[name][1])) for name in NOTEBOOKS}
    rows = []
    for name, folder in located.items():
        csv = folder / "metrics.csv"
        if name in EXPERIMENTS or not csv.exists():
            continue
        table = pd.read_csv(csv)
        summary = rc.summarize(table, by=("dataset", "model", "first_layer", "dtype"))
        summary.insert(0, "notebook", name)
        rows.append(summary)
    table = pd.concat(rows, ignore_index=True) if rows else None
    return _Summary(table, _readme(results_dir, table, located))


def summarize_results(results_dir, names=None):
    """Rebuild summary.csv (one row per notebook and precision) and README.md from the results stored
    under results_dir; returns the summary table (None when there is none). `names` is kept for
    compatibility: every notebook with stored results is summarised."""
    summary = _render(Path(results_dir))
    if summary.table is not None:
        _write_atomically(Path(results_dir) / "summary.csv", summary.table.to_csv(index=False))
    _write_atomically(Path(results_dir) / "README.md", summary.readme)
    return summary.table


def _notebook_link(notebook, in_place):
    """A notebook as the README under the results folder links to it: the stored one beside results/,
    else the executed copy under the results folder's notebooks/ (a --results-dir run)."""
    return f"../{notebook}" if in_place else f"notebooks/{notebook}"


def _readme(results_dir, summary, located):
    import pandas as pd
    in_place = Path(results_dir).resolve() == STORED_RESULTS
    lines = ["# Results", "",
             "Regenerated by `run_all.py` from the notebooks; do not edit by hand. PSNR in dB with data range 1; "
             "`exact` counts images whose every layer was full rank with small residuals. Seconds are per image "
             "on the machine that ran it (the first image also pays the per-model factorisation).", ""]
    if _read_marker(results_dir) == "quick":
        lines += ["These are quick results (`run_all.py --quick`): a few images per notebook, for testing; "
                  "the paper's 100 images are in a full run.", ""]
    lines += ["| notebook | dataset | model | first layer | images | exact float64 | exact float32 "
              "| median PSNR float64 | median PSNR float32 | median s/image | figures |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, group in summary.groupby("notebook", sort=False) if summary is not None else ():
        by_dtype = {row.dtype: row for row in group.itertuples()}
        first = group.iloc[0]
        notebook, subfolder, _, _ = NOTEBOOKS[name]
        figures = sorted(located[name].glob("*.png"))
        links = ", ".join(f"[{figure.stem}]({subfolder}/{figure.name})" for figure in figures)

        def cell(dtype, field, fmt="{}"):
            row = by_dtype.get(dtype)
            return fmt.format(getattr(row, field)) if row is not None else "-"

        seconds = group.median_seconds.median()
        lines.append(f"| [{name}]({_notebook_link(notebook, in_place)}) | {first.dataset} | {first.model} | {first.first_layer} "
                     f"| {int(group.images.max())} | {cell('float64', 'exact')} | {cell('float32', 'exact')} "
                     f"| {cell('float64', 'median_psnr', '{:.1f}')} | {cell('float32', 'median_psnr', '{:.1f}')} "
                     f"| {seconds:.3f} | {links} |")
    lines += ["", "## Experiments", "", "| notebook | rows | finding | summary | figures |", "| --- | --- | --- | --- | --- |"]
    for name in EXPERIMENTS:
        notebook, subfolder, _, _ = NOTEBOOKS[name]
        folder = located[name]
        if not (folder / "metrics.csv").exists():
            continue
        rows = len(pd.read_csv(folder / "metrics.csv"))
        figures = ", ".join(f"[{f.stem}]({subfolder}/{f.name})" for f in sorted(folder.glob("*.png")))
        lines.append(f"| [{name}]({_notebook_link(notebook, in_place)}) | {rows} | {_finding(name, folder)} | "
                     f"[summary.csv]({subfolder}/summary.csv) | {figures} |")
    return "\n".join(lines) + "\n"


def _finding(name, folder):
    """One sentence per experiment, read off its summary."""
    import pandas as pd
    try:
        summary = pd.read_csv(folder / "summary.csv")
        if name == "Precision":
            at = summary.set_index(["dtype", "first_layer", "relu_test"]).median_psnr
            return (f"float32: the published method (weights, absolute ReLU test) {at[('float32', 'weights', 'absolute')]:.0f}"
                    f" dB median, the default (hybrid, relative) {at[('float32', 'hybrid', 'relative')]:.0f} dB; "
                    f"bfloat16 {at.get(('bfloat16', 'hybrid', 'relative'), float('nan')):.0f} dB, "
                    f"float16 {at.get(('float16', 'hybrid', 'relative'), float('nan')):.0f} dB")
        if name == "Defences":
            breaks = pd.read_csv(folder / "breaking_points.csv")
            plain = breaks[~breaks.project.astype(bool)]
            parts = [f"{row.defence} at {row.breaks_at:g} ({row.dataset})" for row in plain.itertuples()
                     if pd.notna(row.breaks_at)]
            return "median PSNR falls below 20 dB: " + ("; ".join(parts) if parts else "never in the tested range")
        if name == "Filters":
            parts = [f"layer {row.position} {row.measured_filters:.0f} vs {row.rgap_filters}"
                     for row in summary.itertuples() if row.model == summary.model.iloc[0]]
            return f"{summary.model.iloc[0]}, filters the gradient constraints need vs a weight-constraint count: " + \
                ", ".join(parts)
        if name == "Baselines":  # per network: R-CONV's time per image differs 25-fold between them
            medians = pd.read_csv(folder / "metrics.csv").groupby(["model", "method"], sort=False).agg(
                psnr=("psnr", "median"), seconds=("seconds", "median"))
            return "; ".join(f"{model}: " + ", ".join(f"{method} {row.psnr:.0f} dB in {row.seconds:.3g} s"
                                                      for (_, method), row in part.iterrows())
                             for model, part in medians.groupby(level="model", sort=False))
        if name == "High_resolution":
            return _high_resolution_finding(summary)
        if name == "Batches":
            return _batches_finding(summary)
        if name == "Success_rates":
            parts = [f"{row.model} {row.dtype} {row.exact:.1%}" for row in summary.itertuples()]  # as the figure
            return "exact: " + ", ".join(parts)
    except (OSError, KeyError, ValueError, AttributeError):
        return "see the notebook"
    return ""


def _batches_finding(summary):
    """Per dataset, network and dtype: the largest batch whose images all came back exact, and all at
    >= 60 dB, against the counting bound; within the bound, how many images were exact and at
    >= 60 dB per dtype (issue 12's targets); then images claimed exact beyond the bound (none, if
    the attack is honest)."""
    rconv = summary[summary.method == "rconv"]
    parts = []
    for (dataset, model, dtype), part in rconv.groupby(["dataset", "model", "dtype"], sort=False):
        whole, good = part[part.exact == 1.0].batch_size, part[part.good == 1.0].batch_size
        parts.append(f"{dataset} {model} {dtype}: all exact up to B = {whole.max() if len(whole) else 0}, all at "
                     f">= 60 dB up to B = {good.max() if len(good) else 0} (counting bound {part.max_batch.iloc[0]})")
    within = rconv[rconv.batch_size <= rconv.max_batch]
    for dtype, part in within.groupby("dtype", sort=False):
        count = {share: int((part[share] * part.images).round().sum()) for share in ("exact", "good")}
        parts.append(f"within the bound, {dtype}: {count['exact']} exact and {count['good']} at >= 60 dB of "
                     f"{int(part.images.sum())} images")
    beyond = rconv[rconv.batch_size > rconv.max_batch]
    claimed = int((beyond.exact * beyond.images).round().sum()) if len(beyond) else 0
    return "; ".join(parts) + f"; beyond the bound {claimed} of {int(beyond.images.sum())} images claimed exact"


def _high_resolution_finding(summary):
    """Per network the counting bound calls recoverable: exact count, cold and warm seconds, peak memory; then
    how many of the others were reported exact (none, if the attack is honest)."""
    recoverable = summary[summary.verdict == "recoverable"]
    parts = []
    for (size, model), part in recoverable.groupby(["size", "model"], sort=False):
        warm = f", {part.warm_seconds.max():.2g} s warm" if part.warm_seconds.notna().any() else ""
        parts.append(f"{model} {size} px {part.exact.sum()}/{part.images.sum()} exact, "
                     f"{part.cold_seconds.max():.2g} s cold{warm}, {part.peak_mb.max() / 1024:.1f} GB")
    others = summary[summary.verdict.fillna("").str.startswith("not")]
    if len(others):
        sizes = ", ".join(str(size) for size in dict.fromkeys(others["size"]))
        parts.append(f"not recoverable by counting ({'/'.join(dict.fromkeys(others.model))} at {sizes} px): "
                     f"{others.exact.sum()} of {others.images.sum()} reported exact")
    return "float64 and float32 gradients: " + "; ".join(parts)


def _jobs(names, results_dir, quick, in_place, data_root, scheduler=None):
    """A staged job per notebook; the Experiments get `scheduler` (a Dask scheduler's address) when given."""
    jobs = []
    for name in names:
        notebook, subfolder, parameters, quick_parameters = NOTEBOOKS[name]
        parameters = dict(parameters, **(quick_parameters if quick else {}))
        if scheduler is not None and name in ON_CLUSTER:
            parameters["scheduler"] = scheduler
        if data_root:
            # relative to the repository, where the kernels run: stored notebooks keep no machine's paths
            parameters["data_root"] = os.path.relpath(Path(data_root).resolve(), ROOT)
        output = ROOT / notebook if in_place else results_dir / "notebooks" / notebook
        try:
            jobs.append(_stage(name, results_dir, notebook, subfolder, parameters, output))
        except BaseException as error:  # an unwritable folder, or Ctrl-C: leave no staging folder behind
            for job in jobs:
                shutil.rmtree(job.stage, ignore_errors=True)
            if isinstance(error, OSError):
                raise _Refused(f"cannot write results to {results_dir} ({error.strerror or error})") from error
            raise
    return jobs


def _run(jobs, results_dir, parallel):
    """Run the jobs, storing each one that succeeds; returns (outcomes, summary table or None, interrupted)."""
    from tqdm import tqdm
    pending, workers, outcomes, table, interrupted = list(jobs), {}, [], None, False
    bar = tqdm(total=len(jobs), desc="notebooks", unit="notebook")
    try:
        while pending or workers:
            while pending and len(workers) < parallel:
                job = pending.pop(0)
                workers[job.name] = (job, _start(job))
            time.sleep(_POLL_SECONDS)
            for name in [name for name, (_, process) in workers.items() if process.poll() is not None]:
                job, process = workers.pop(name)
                outcome = _outcome(job, process)
                if outcome.ok:
                    try:
                        summary = _render(results_dir, {job.name: job.stage / "results"})
                        with _interrupts_held():
                            _commit(job, summary, results_dir)
                            table = summary.table
                    except Exception as error:  # results the summary cannot read, a full disk, ...
                        outcome = outcome._replace(ok=False, error=f"storing its results failed: "
                                                                   f"{type(error).__name__}: {error}"[:400])
                outcomes.append(outcome)
                bar.update()
                tqdm.write(f"{'ok    ' if outcome.ok else 'FAILED'} {outcome.name} ({outcome.seconds:.0f} s)")
    except KeyboardInterrupt:
        interrupted = True
    finally:  # after Ctrl-C (or a fault in run_all itself): stop the workers, drop the unfinished stages
        _stop([process for _, process in workers.values()])
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
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel processes")
    cluster = parser.add_mutually_exclusive_group()
    cluster.add_argument("--workers", type=int, metavar="N", help="run the Experiments' sweeps on a Dask "
                                                                   "LocalCluster of N workers started for the run")
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="run the Experiments' sweeps on the running Dask "
                                                                "cluster whose scheduler is at ADDRESS")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, (notebook, subfolder, _, _) in NOTEBOOKS.items():
            print(f"{name:18} {notebook:40} results/{subfolder}")
        return 0
    names = list(dict.fromkeys(args.only or NOTEBOOKS))
    unknown = [name for name in names if name not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook {', '.join(unknown)}; choose from {', '.join(NOTEBOOKS)}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1; got {args.jobs}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1; got {args.workers}")
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
    kind = "quick" if args.quick else "full"
    # the stored notebooks are updated only by a full run into the repository's results/
    in_place = results_dir == STORED_RESULTS and not args.quick

    if args.jobs > 1:
        # Kernels inherit this: several multi-threaded kernels on few cores would spin against each other.
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(variable, threads)
    previous = signal.signal(signal.SIGTERM, _interrupt) \
        if threading.current_thread() is threading.main_thread() else None
    jobs, outcomes, table, interrupted = [], [], None, False
    try:
        with _results_folder(results_dir, kind), _cluster(args.scheduler or args.workers if on_cluster else None) \
                as scheduler:
            jobs = _jobs(names, results_dir, args.quick, in_place, args.data_root, scheduler)
            outcomes, table, interrupted = _run(jobs, results_dir, args.jobs)
    except _Refused as error:
        parser.error(str(error))
    except KeyboardInterrupt:  # before any notebook started: no results were touched
        interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _report(outcomes, table, interrupted, jobs, results_dir)


@contextlib.contextmanager
def _cluster(scheduler):
    """The address of the Dask scheduler the Experiments notebooks get, open for the run: a LocalCluster
    of `scheduler` workers started now (a number), the running one at `scheduler` (a string, checked
    reachable first), or None: serial."""
    if scheduler is None:
        yield None
        return
    from rconv.common.errors import RConvError
    from rconv.studies.executors import executor_for
    opened = contextlib.ExitStack()
    # The cluster's processes inherit an ignored SIGINT: Ctrl-C then reaches run_all alone, which closes
    # the cluster in order, instead of every worker printing its own KeyboardInterrupt.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        client = opened.enter_context(executor_for(scheduler))
    except (RConvError, ImportError, OSError) as error:
        raise _Refused(str(error)) from error
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    with opened:
        print(f"Experiments on the Dask cluster at {client.scheduler.address} "
              f"({len(client.scheduler_info()['workers'])} workers)", flush=True)
        yield client.scheduler.address


def _report(outcomes, table, interrupted, jobs, results_dir):
    """Print the stored summary and every failure; returns the exit status."""
    print()
    if table is not None:
        columns = [column for column in ("notebook", "dtype", "images", "exact", "rank_deficient", "median_psnr",
                                          "median_seconds") if column in table.columns]
        print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nsummary: {_relative(results_dir / 'summary.csv')}")
    stages = {job.name: job.stage for job in jobs}
    failed = [outcome for outcome in outcomes if not outcome.ok]
    for outcome in failed:
        print(f"FAILED: {outcome.name} at {outcome.error}; its stored notebook and results are unchanged, and "
              f"its partial run is kept in {_relative(stages[outcome.name])} until the next run", file=sys.stderr)
    if interrupted:
        print("interrupted: every notebook that had not finished left its stored notebook and results as they "
              "were", file=sys.stderr)
        return INTERRUPTED
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
