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
import concurrent.futures
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Every notebook with the parameters run_all gives it: notebook -> (path, results subfolder, parameters).
NOTEBOOKS = {
    "LeNet": ("Various_settings/LeNet.ipynb", "various_settings/LeNet",
              dict(dataset="cifar100", model="lenet", image_index=25, n_images=100)),
    "LeNet_O": ("Various_settings/LeNet_O.ipynb", "various_settings/LeNet_O",
                dict(dataset="cifar100", model="lenet_o", image_index=25, n_images=100)),
    "O_CNN6": ("Various_settings/O_CNN6.ipynb", "various_settings/O_CNN6",
               dict(dataset="cifar10", model="o_cnn6", image_index=25, n_images=100)),
    "LeNet_4_ReLU": ("Various_settings/LeNet_4_ReLU.ipynb", "various_settings/LeNet_4_ReLU",
                     dict(dataset="cifar100", model="lenet_4_relu", image_index=25, n_images=100)),
    "LeNet_All_ReLU": ("Various_settings/LeNet_All_ReLU.ipynb", "various_settings/LeNet_All_ReLU",
                       dict(dataset="cifar100", model="lenet_all_relu", image_index=25, n_images=100)),
    "Test_on_MNIST": ("Testing/Test_on_MNIST.ipynb", "testing/mnist",
                      dict(dataset="mnist", model="lenet", n_images=100)),
    "Test_on_CIFAR10": ("Testing/Test_on_CIFAR10.ipynb", "testing/cifar10",
                        dict(dataset="cifar10", model="lenet_c10", n_images=100)),
    "Test_on_CIFAR100": ("Testing/Test_on_CIFAR100.ipynb", "testing/cifar100",
                         dict(dataset="cifar100", model="lenet", n_images=100)),
}
# --quick: what changes so that every notebook runs in seconds.
QUICK = dict(n_images=3)


def _clean(path):
    """Drop what changes on every run (timings, execution counts) so a rerun gives a small diff."""
    import nbformat
    notebook = nbformat.read(path, as_version=4)
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
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = None
    nbformat.write(notebook, path)


def _execute(name, notebook, output, parameters):
    """Run one notebook (in a worker process); returns a result record instead of raising."""
    import papermill
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.running.ipynb")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(ROOT / notebook), str(partial), parameters=parameters, kernel_name="python3",
                                   cwd=str(ROOT), progress_bar=False, log_output=False)
    except papermill.PapermillExecutionError as error:
        return dict(notebook=name, ok=False, seconds=time.perf_counter() - start,
                    error=f"cell {error.cell_index} ({error.ename}: {str(error.evalue)[:300]})", partial=str(partial))
    except Exception as error:  # the kernel died, the notebook is unreadable, ...
        return dict(notebook=name, ok=False, seconds=time.perf_counter() - start,
                    error=f"{type(error).__name__}: {str(error)[:300]}", partial=str(partial))
    _clean(partial)
    os.replace(partial, output)
    return dict(notebook=name, ok=True, seconds=time.perf_counter() - start, error="")


def _relative(path):
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def summarize_results(results_dir, names):
    """summary.csv (one row per notebook and precision) and README.md under results_dir."""
    import pandas as pd
    import rconv_core as rc
    rows = []
    for name in names:
        notebook, subfolder, _ = NOTEBOOKS[name]
        csv = results_dir / subfolder / "metrics.csv"
        if not csv.exists():
            continue
        table = pd.read_csv(csv)
        summary = rc.summarize(table, by=("dataset", "model", "first_layer", "dtype"))
        summary.insert(0, "notebook", name)
        rows.append(summary)
    if not rows:
        return None
    summary = pd.concat(rows, ignore_index=True)
    summary.to_csv(results_dir / "summary.csv", index=False)
    _write_readme(results_dir, summary)
    return summary


def _write_readme(results_dir, summary):
    lines = ["# Results", "",
             "Regenerated by `run_all.py` from the notebooks; do not edit by hand. PSNR in dB with data range 1; "
             "`exact` counts images whose every layer was full rank with small residuals. Seconds are per image "
             "on the machine that ran it (the first image also pays the per-model factorisation).", "",
             "| notebook | dataset | model | first layer | images | exact float64 | exact float32 "
             "| median PSNR float64 | median PSNR float32 | median s/image | figures |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, group in summary.groupby("notebook", sort=False):
        by_dtype = {row.dtype: row for row in group.itertuples()}
        first = group.iloc[0]
        notebook, subfolder, _ = NOTEBOOKS[name]
        figures = sorted((results_dir / subfolder).glob("*.png"))
        links = ", ".join(f"[{figure.stem}]({subfolder}/{figure.name})" for figure in figures)

        def cell(dtype, field, fmt="{}"):
            row = by_dtype.get(dtype)
            return fmt.format(getattr(row, field)) if row is not None else "-"

        seconds = group.median_seconds.median()
        lines.append(f"| [{name}](../{notebook}) | {first.dataset} | {first.model} | {first.first_layer} "
                     f"| {int(group.images.max())} | {cell('float64', 'exact')} | {cell('float32', 'exact')} "
                     f"| {cell('float64', 'median_psnr', '{:.1f}')} | {cell('float32', 'median_psnr', '{:.1f}')} "
                     f"| {seconds:.3f} | {links} |")
    (results_dir / "README.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a few images per notebook ({QUICK})")
    parser.add_argument("--only", action="append", metavar="NAME", help="a notebook's name; repeatable")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA, then data/)")
    parser.add_argument("--results-dir", help="where CSVs, figures and the executed notebooks go "
                                              "(default: results/, with the stored notebooks updated in place)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel processes")
    parser.add_argument("--list", action="store_true", help="list the notebooks and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name, (notebook, subfolder, parameters) in NOTEBOOKS.items():
            print(f"{name:18} {notebook:40} results/{subfolder}")
        return 0
    names = args.only or list(NOTEBOOKS)
    unknown = [name for name in names if name not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook {', '.join(unknown)}; choose from {', '.join(NOTEBOOKS)}")

    in_place = args.results_dir is None
    results_dir = (ROOT / "results") if in_place else Path(args.results_dir).resolve()
    jobs = []
    for name in names:
        notebook, subfolder, parameters = NOTEBOOKS[name]
        parameters = dict(parameters, results_dir=_relative(results_dir / subfolder))
        if args.quick:
            parameters.update(QUICK)
        if args.data_root:
            parameters["data_root"] = str(Path(args.data_root).resolve())
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
    summary = summarize_results(results_dir, list(NOTEBOOKS))
    print()
    if summary is not None:
        columns = ["notebook", "dtype", "images", "exact", "rank_deficient", "median_psnr", "median_seconds"]
        print(summary[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"\nsummary: {_relative(results_dir / 'summary.csv')}")
    failed = [r for r in records if not r["ok"]]
    for record in failed:
        print(f"FAILED: {record['notebook']} at {record['error']}; partial run in {_relative(record['partial'])}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
