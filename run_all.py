"""Execute every notebook of the suite with papermill and regenerate results/.

    python run_all.py                          # all notebooks; stored notebooks and results/ are updated
    python run_all.py --only Test_on_CIFAR10   # one notebook (repeat --only for more)
    python run_all.py --quick --results-dir DIR   # a few images each; stored notebooks stay untouched
    python run_all.py --list

A stored notebook is replaced only when its run succeeded. With --results-dir, CSVs, figures
and the executed notebooks all go under DIR. The exit status is non-zero when a notebook
failed, and the message names the notebook and the cell.
"""

import argparse
import ast
import concurrent.futures
import os
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent

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
                               QUICK_IMAGES),
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
}
EXPERIMENTS = ("Precision", "Defences", "Filters", "Success_rates", "Baselines")


def _clean(path):
    """Drop what changes on every run (timings, execution counts, the machine's paths) so a rerun gives a
    small diff, and bake papermill's injected parameters into the parameters cell."""
    import nbformat
    notebook = nbformat.read(path, as_version=4)
    _bake_parameters(notebook)
    parameters = notebook.metadata.get("papermill", {}).get("parameters")
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)
    if parameters is not None:
        notebook.metadata["papermill"] = {"parameters": parameters}
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
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
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


def _execute(name, notebook, output, parameters):
    """Run one notebook (in a worker process); returns a result record instead of raising."""
    partial = output.with_name(f".{output.stem}.running.ipynb")
    start = time.perf_counter()
    try:
        import papermill
        output.parent.mkdir(parents=True, exist_ok=True)
        papermill.execute_notebook(str(ROOT / notebook), str(partial), parameters=parameters, kernel_name="python3",
                                   cwd=str(ROOT), progress_bar=False, log_output=False)
        _clean(partial)
        os.replace(partial, output)
    except Exception as error:  # a failing cell, a dead kernel, an unreadable notebook, a full disk, ...
        where = (f"cell {error.cell_index} ({error.ename}: {str(error.evalue)[:300]})"
                 if hasattr(error, "cell_index") else f"{type(error).__name__}: {str(error)[:300]}")
        return dict(notebook=name, ok=False, seconds=time.perf_counter() - start, error=where, partial=str(partial))
    return dict(notebook=name, ok=True, seconds=time.perf_counter() - start, error="")


def _relative(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def summarize_results(results_dir, names, in_place=True):
    """summary.csv (one row per notebook and precision) and README.md under results_dir.

    in_place: results_dir is the repository's results/ and its README links to the stored notebooks;
    else to the executed copies under results_dir/notebooks (a --results-dir run).
    """
    import pandas as pd
    import rconv_core as rc
    rows = []
    for name in names:
        notebook, subfolder, _, _ = NOTEBOOKS[name]
        csv = results_dir / subfolder / "metrics.csv"
        if name in EXPERIMENTS or not csv.exists():
            continue
        table = pd.read_csv(csv)
        summary = rc.summarize(table, by=("dataset", "model", "first_layer", "dtype"))
        summary.insert(0, "notebook", name)
        rows.append(summary)
    summary = pd.concat(rows, ignore_index=True) if rows else None
    if summary is not None:
        summary.to_csv(results_dir / "summary.csv", index=False)
    _write_readme(results_dir, summary, in_place)
    return summary


def _notebook_link(notebook, in_place):
    """A notebook as the README under the results folder links to it."""
    return f"../{notebook}" if in_place else f"notebooks/{notebook}"


def _write_readme(results_dir, summary, in_place):
    import pandas as pd
    lines = ["# Results", "",
             "Regenerated by `run_all.py` from the notebooks; do not edit by hand. PSNR in dB with data range 1; "
             "`exact` counts images whose every layer was full rank with small residuals. Seconds are per image "
             "on the machine that ran it (the first image also pays the per-model factorisation).", "",
             "| notebook | dataset | model | first layer | images | exact float64 | exact float32 "
             "| median PSNR float64 | median PSNR float32 | median s/image | figures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, group in summary.groupby("notebook", sort=False) if summary is not None else ():
        by_dtype = {row.dtype: row for row in group.itertuples()}
        first = group.iloc[0]
        notebook, subfolder, _, _ = NOTEBOOKS[name]
        figures = sorted((results_dir / subfolder).glob("*.png"))
        links = ", ".join(f"[{figure.stem}]({subfolder}/{figure.name})" for figure in figures)

        def cell(dtype, field, fmt="{}"):
            row = by_dtype.get(dtype)
            return fmt.format(getattr(row, field)) if row is not None else "-"

        seconds = group.median_seconds.median()
        link = _notebook_link(notebook, in_place)
        lines.append(f"| [{name}]({link}) | {first.dataset} | {first.model} | {first.first_layer} "
                     f"| {int(group.images.max())} | {cell('float64', 'exact')} | {cell('float32', 'exact')} "
                     f"| {cell('float64', 'median_psnr', '{:.1f}')} | {cell('float32', 'median_psnr', '{:.1f}')} "
                     f"| {seconds:.3f} | {links} |")
    lines += ["", "## Experiments", "", "| notebook | rows | finding | summary | figures |", "| --- | --- | --- | --- | --- |"]
    for name in EXPERIMENTS:
        notebook, subfolder, _, _ = NOTEBOOKS[name]
        folder = results_dir / subfolder
        if not (folder / "metrics.csv").exists():
            continue
        rows = len(pd.read_csv(folder / "metrics.csv"))
        figures = ", ".join(f"[{f.stem}]({subfolder}/{f.name})" for f in sorted(folder.glob("*.png")))
        lines.append(f"| [{name}]({_notebook_link(notebook, in_place)}) | {rows} | {_finding(name, folder)} | "
                     f"[summary.csv]({subfolder}/summary.csv) | {figures} |")
    (results_dir / "README.md").write_text("\n".join(lines) + "\n")


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
        if name == "Success_rates":
            parts = [f"{row.model} {row.dtype} {row.exact:.1%}" for row in summary.itertuples()]  # as the figure
            return "exact: " + ", ".join(parts)
    except (OSError, KeyError, ValueError, AttributeError):
        return "see the notebook"
    return ""


def main(argv=None):
    """The command line; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few images per notebook, for tests")
    parser.add_argument("--only", action="append", metavar="NAME", help="a notebook's name; repeatable")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA, then data/)")
    parser.add_argument("--results-dir", help="where CSVs, figures and the executed notebooks go "
                                              "(default: results/, with the stored notebooks updated in place)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel processes")
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

    if args.quick and args.results_dir is None:
        parser.error("--quick runs a few images only; give --results-dir so that the stored notebooks and "
                     "results/ stay untouched")
    in_place = args.results_dir is None
    results_dir = (ROOT / "results") if in_place else Path(args.results_dir).resolve()
    jobs = []
    for name in names:
        notebook, subfolder, parameters, quick = NOTEBOOKS[name]
        parameters = dict(parameters, results_dir=_relative(results_dir / subfolder))
        if args.quick:
            parameters.update(quick)
        if args.data_root:
            # relative to the repository, where the kernels run: stored notebooks keep no machine's paths
            parameters["data_root"] = os.path.relpath(Path(args.data_root).resolve(), ROOT)
        output = ROOT / notebook if in_place else results_dir / "notebooks" / notebook
        jobs.append((name, notebook, output, parameters))

    if args.jobs > 1:
        # Kernels inherit this: several multi-threaded kernels on few cores would spin against each other.
        threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(variable, threads)
    from tqdm import tqdm
    records = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_execute, *job) for job in jobs]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="notebooks",
                           unit="notebook"):
            record = future.result()
            records.append(record)
            tqdm.write(f"{'ok    ' if record['ok'] else 'FAILED'} {record['notebook']} ({record['seconds']:.0f} s)")

    # every notebook with results in results_dir, in the table's order, not only those run now
    summary = summarize_results(results_dir, list(NOTEBOOKS), in_place=in_place)
    print()
    if summary is not None:
        columns = [column for column in ("notebook", "dtype", "images", "exact", "rank_deficient", "median_psnr",
                                          "median_seconds") if column in summary.columns]
        print(summary[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nsummary: {_relative(results_dir / 'summary.csv')}")
    failed = [r for r in records if not r["ok"]]
    for record in failed:
        print(f"FAILED: {record['notebook']} at {record['error']}; partial run in {_relative(record['partial'])}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
