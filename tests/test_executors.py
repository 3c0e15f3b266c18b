"""rconv.studies.executors: the experiment loops on executors (a Dask LocalCluster and a process pool give the
serial rows, failures keep their inputs and the rows that succeeded), Dask optional, and run_all's --workers."""
import ast
import concurrent.futures
import contextlib
import io
import subprocess
import sys
import tomllib

import nbformat
import pandas as pd
import papermill
import pytest

import rconv.studies.experiments
import rconv.studies.executors
import rconv_core as rc
import run_all
from conftest import REPO
from runner.notebooks import bake_parameters

# What differs between two runs of the same sweep: how long each attack took.
TIMING = ["seconds"]


def small_grid(packs, executor):
    """Two seeds, two precisions, three images: four tasks."""
    return rc.attack_grid("cifar100", "lenet_o", range(3), dtypes=["float64", "float32"], seeds=[50, 51],
                          data_root=packs, progress=False, executor=executor)


def worker_cache_misses():
    """How many models this process's worker cache has built (run on the workers)."""
    return rconv.studies.executors._worker_cache.cache_info().misses


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed", reason=rc.distributed_missing())
    with rc.executor_for(2) as client:
        yield client


@pytest.fixture(scope="module")
def serial_grid(packs):
    return small_grid(packs, None)


@pytest.mark.slow
def test_a_local_cluster_gives_the_serial_rows(cluster, serial_grid, packs):
    table = small_grid(packs, cluster)
    assert len(table) == 2 * 2 * 3
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), serial_grid.drop(columns=TIMING))
    assert sum(cluster.run(worker_cache_misses).values()) >= 2, "the tasks ran on the cluster's workers"


@pytest.mark.slow
def test_filter_sweep_and_baselines_on_a_local_cluster_give_the_serial_rows(cluster, packs):
    sweep = dict(dataset="cifar100", model_name="lenet", position=3, counts=[2, 4], indices=[0, 1], seeds=[50, 51],
                 data_root=packs, progress=False)
    pd.testing.assert_frame_equal(rc.filter_sweep(**sweep, executor=cluster), rc.filter_sweep(**sweep))
    compared = dict(methods=[], dtype="float64", data_root=packs, progress=False)
    table, shown = rc.compare_baselines("cifar10", "lenet", [0, 1, 2], executor=cluster, **compared)
    serial, serial_shown = rc.compare_baselines("cifar10", "lenet", [0, 1, 2], **compared)
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), serial.drop(columns=TIMING))
    assert list(table["index"]) == [0, 1, 2] and table.exact.all()
    assert set(shown) == {"original", "rconv"}
    for method in shown:
        assert all((a == b).all() for a, b in zip(shown[method], serial_shown[method], strict=True))


@pytest.mark.slow
def test_a_process_pool_gives_the_serial_rows(serial_grid, packs):
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        table = small_grid(packs, pool)
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), serial_grid.drop(columns=TIMING))


@pytest.fixture
def seed_51_breaks(monkeypatch):
    """A setup that fails (not with RConvError) for seed 51 alone, as a bug or a lost worker would."""
    real = rconv.studies.experiments.setup

    def broken_for_51(dataset, model, indices, seed, **options):
        if seed == 51:
            raise ZeroDivisionError("a fault of seed 51")
        return real(dataset, model, indices, seed, **options)

    monkeypatch.setattr(rconv.studies.experiments, "setup", broken_for_51)


@pytest.mark.parametrize("threads", [None, 2], ids=["serial", "thread_pool"])
def test_a_failing_task_is_reported_with_its_inputs_and_the_other_rows_survive(seed_51_breaks, threads):
    grid = dict(dtypes=["float64"], seeds=[50, 51, 52], progress=False)
    with concurrent.futures.ThreadPoolExecutor(threads) if threads else contextlib.nullcontext() as executor:
        with pytest.raises(rc.SweepFailed) as raised:
            rc.attack_grid("samples", "lenet", [0, 1], executor=executor, **grid)
    failed = raised.value
    [failure] = failed.failures
    assert (failure.task.seed, failure.task.indices, failure.task.dtype) == (51, (0, 1), "float64")
    assert failure.error == "ZeroDivisionError: a fault of seed 51"
    assert "broken_for_51" in failure.traceback
    message = str(failed)
    assert "1 of 3 tasks of samples lenet failed" in message and "seed=51" in message and "a fault of seed 51" \
        in message and ".table" in message
    assert list(failed.table.seed) == [50, 50, 52, 52] and list(failed.table["index"]) == [0, 1, 0, 1]
    assert failed.table.exact.all()


def test_an_rconv_error_in_a_task_is_raised_as_it_is(packs):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with pytest.raises(rc.RConvError, match="holds only 100 images; index 150 is out of range"):
            rc.attack_grid("cifar10", "lenet_c10", [0, 150], seeds=[50, 51], data_root=packs, progress=False,
                           executor=pool)


def test_an_executor_must_be_one():
    with pytest.raises(rc.RConvError, match="executor must be None .* or a dask.distributed Client; got str"):
        rc.attack_grid("samples", "lenet", [0], executor="tcp://host:8786", progress=False)


@pytest.mark.parametrize("scheduler", [0, -2, True, 2.5, "", ["tcp://host:8786"]])
def test_executor_for_refuses_what_names_no_scheduler(scheduler):
    with pytest.raises(rc.RConvError, match="scheduler must be None"):
        with rc.executor_for(scheduler):
            pass


def test_executor_for_none_is_serial_and_needs_no_dask(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with rc.executor_for(None) as executor:
        assert executor is None


@pytest.mark.slow
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "not-an-address"])
def test_executor_for_says_when_no_scheduler_answers(address):
    dask = pytest.importorskip("dask", reason=rc.distributed_missing())
    pytest.importorskip("distributed", reason=rc.distributed_missing())
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(rc.RConvError, match=f"could not reach the Dask scheduler at '{address}'"):
            with rc.executor_for(address):
                pass


@pytest.fixture
def no_dask(monkeypatch):
    """An environment where `import distributed` fails, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "distributed", None)


def test_without_dask_a_cluster_says_how_to_install_it(no_dask):
    message = rc.distributed_missing()
    assert "pip install -r requirements-distributed.txt" in message and "\n" not in message
    with pytest.raises(ImportError) as raised:
        with rc.executor_for(2):
            pass
    assert str(raised.value) == message


def test_without_dask_run_all_refuses_workers_before_writing_anything(no_dask, tmp_path, capsys):
    results = tmp_path / "results"
    with pytest.raises(SystemExit) as exited:
        run_all.main(["--quick", "--workers", "2", "--only", "Success_rates", "--results-dir", str(results)])
    assert exited.value.code == 2
    assert "pip install -r requirements-distributed.txt" in capsys.readouterr().err
    assert not results.exists()


def test_run_all_refuses_workers_and_scheduler_together_and_no_workers(capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--workers", "2", "--scheduler", "tcp://host:8786"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_all.main(["--workers", "0"])
    assert "--workers must be at least 1; got 0" in capsys.readouterr().err


def test_the_install_hint_names_the_pinned_version():
    pin = next(line for line in (REPO / "requirements-distributed.txt").read_text().splitlines()
               if line.startswith("dask"))
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["distributed"] == [pin] and rconv.studies.executors.DISTRIBUTED_PIN == pin


@pytest.mark.parametrize("name", run_all.ON_CLUSTER)
def test_experiments_notebooks_run_where_their_scheduler_parameter_says(name):
    path = REPO / run_all.NOTEBOOKS[name]["path"]
    assert ast.literal_eval(papermill.inspect_notebook(str(path))["scheduler"]["default"]) is None
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert "with rc.executor_for(scheduler) as executor:" in code
    assert code.count("executor=executor") >= 1


def test_a_cluster_address_is_never_baked_into_a_stored_notebook():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("n_images = 100\nscheduler = None  # where\n", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('# Parameters\nn_images = 3\nscheduler = "tcp://127.0.0.1:40000"\n',
                                  metadata={"tags": ["injected-parameters"]})])
    bake_parameters(notebook)
    assert [c.source for c in notebook.cells] == ["n_images = 3\nscheduler = None  # where\n"]


@pytest.mark.slow
@pytest.mark.notebooks
def test_run_all_runs_success_rates_on_two_workers_with_the_serial_rows(tmp_path, packs):
    pytest.importorskip("distributed", reason=rc.distributed_missing())
    done = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--quick", "--workers", "2", "--only",
                           "Success_rates", "--results-dir", str(tmp_path), "--data-root", str(packs)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Experiments on the Dask cluster at tcp://" in done.stdout and "(2 workers)" in done.stdout
    entry = run_all.NOTEBOOKS["Success_rates"]
    path, quick = entry["path"], entry["quick"]
    table = pd.read_csv(tmp_path / entry["results"] / "metrics.csv", keep_default_na=False)
    # the same sweep here, serially: the notebook's defaults with run_all's quick values
    defaults = {key: ast.literal_eval(value["default"])
                for key, value in papermill.inspect_notebook(str(REPO / path)).items()}
    setting = dict(defaults, **quick)
    serial = pd.concat([rc.attack_grid(rc.PRESET_DATASETS[model], model,
                                       range(setting["heavy_images"] if model == "lenet_all_relu"
                                             else setting["n_images"]),
                                       dtypes=setting["dtypes"], first_layers=[setting["first_layer"]],
                                       seeds=range(50, 50 + setting["n_seeds"]), data_root=packs, progress=False)
                        for model in setting["presets"]], ignore_index=True)
    serial = pd.read_csv(io.StringIO(serial.to_csv(index=False)), keep_default_na=False)  # as stored
    pd.testing.assert_frame_equal(table.drop(columns=TIMING), serial.drop(columns=TIMING))
    executed = nbformat.read(tmp_path / "notebooks" / path, as_version=4)
    parameters = next(c for c in executed.cells if "parameters" in c.metadata.get("tags", [])).source
    assert "scheduler = None" in parameters and "tcp://127.0.0.1" not in nbformat.writes(executed)
