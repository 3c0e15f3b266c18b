"""benchmarks/bench.py runs and writes its table: the attacks' verdicts and quality as the library gives them
(its timings are read in results/benchmark.csv, not asserted)."""
import importlib.util
import subprocess
import sys

import pandas as pd
import pytest
import torch

import rconv_core as rc

from conftest import REPO


@pytest.mark.slow
def test_benchmark_writes_its_table(tmp_path, packs):
    out = tmp_path / "bench.csv"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", "Testing CIFAR10",
                           "--images", "2", "--repeats", "1", "--device", "cpu", "--data-root", str(packs),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out)
    assert list(table.dtype) == ["float64", "float32"] and list(table.first_layer) == ["weights", "hybrid"]
    assert {"total_seconds", "ms_per_image", "cold_start_seconds", "peak_mb", "device"} <= set(table.columns)
    # float64 from the weights: both exact; float32 (hybrid): exact only where its error bound is within
    # 1e-3, which lenet_c10's first images need not reach (61 of the first 100 do)
    assert list(table.exact)[0] == 2 and 0 <= list(table.exact)[1] <= 2 and (table.total_seconds > 0).all()
    assert "machine:" in done.stdout
    # the counts are the attacks' own verdicts on the same images, and the images are recovered either way
    case = rc.setup("cifar10", "lenet_c10", range(2), data_root=packs)
    verdicts = [rc.reconstruct(case.model, rc.client_gradients(case.model, image, int(label), dtype=torch.float32),
                               tuple(image.shape), first_layer="hybrid").exact
                for image, label in zip(case.images, case.labels)]
    assert list(table.exact)[1] == sum(verdicts)
    assert list(table.median_psnr)[0] >= 120 and list(table.median_psnr)[1] >= 60  # float64: max error <= 1e-6


@pytest.mark.slow
def test_benchmark_size_rows_give_the_side_and_a_further_image_s_time(tmp_path):
    out = tmp_path / "bench.csv"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", "Size 64 / lenet_hr64",
                           "--images", "2", "--repeats", "1", "--device", "cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out)
    assert list(table["size"]) == [64, 64] and list(table.model) == ["lenet_hr64"] * 2
    assert (table.exact == 2).all() and (table.warm_seconds > 0).all() and (table.cold_start_seconds > 0).all()
    assert table.speedup_vs_published.isna().all(), "the published code's time is for 32-px images only"


@pytest.mark.slow
def test_benchmark_worker_rows_time_success_rates_serially_and_on_1_and_2_workers(tmp_path, packs):
    pytest.importorskip("distributed", reason="the worker rows need dask.distributed")
    out = tmp_path / "bench.csv"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--only", "workers",
                           "--images", "1", "--repeats", "1", "--device", "cpu", "--data-root", str(packs),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(out)
    assert list(table.setting) == ["Success_rates / serial", "Success_rates / 1 worker", "Success_rates / 2 workers"]
    # 2 presets x 1 image x 2 seeds x 2 dtypes, and the same exact attacks whichever ran them
    assert (table.images == 8).all() and (table.exact == table.exact[0]).all() and table.exact[0] >= 4
    assert (table.total_seconds > 0).all()
    assert table.device.str.startswith("cpu").all() and table.cold_start_seconds.isna().all()
    assert "as fast as on 1 worker" in done.stdout


@pytest.mark.slow
def test_benchmark_attacks_a_network_that_is_not_a_preset(packs):
    # measure() in this process, float64 only: the row's code path without the subprocesses' float32 half
    spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.measure("Batch 8 / plain net", "float64", "weights", 8, 1, "cpu", str(packs))
    assert (row["model"], row["batch"], row["images"]) == ("plain_batch", 8, 8)
    assert row["exact"] == 8 and row["median_psnr"] >= 120  # one batch of 8, exact from float64
