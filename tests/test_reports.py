"""Metrics, the constraint report, figures and the command line."""
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import rconv_core as rc
from conftest import REPO


def test_psnr_uses_data_range_one():
    original = torch.full((3, 16, 16), 0.5)
    metrics = rc.image_metrics(original, original + 0.1)
    assert metrics["mse"] == pytest.approx(0.01)
    assert metrics["psnr"] == pytest.approx(20.0)  # 10 log10(1 / 0.01); MAX=255 would claim 68.1 dB
    assert metrics["max_abs_err"] == pytest.approx(0.1)
    assert rc.image_metrics(original, original)["psnr"] == math.inf
    assert rc.image_metrics(original, original)["ssim"] == pytest.approx(1.0)
    noisy = original + 0.3 * torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert rc.image_metrics(original, noisy)["ssim"] < 0.5


def test_constraint_report_counts():
    report = rc.constraint_report(rc.build_model("lenet", 3, 10), (3, 32, 32))
    first = report.iloc[0]
    assert (first.unknowns, first.gradient_constraints, first.weight_constraints) == (3072, 900, 3072)
    assert first.min_filters == 64 and not first.gradients_suffice and first.weights_suffice
    assert list(report.min_filters) == [64, 16, 3, 3]
    all_relu = rc.constraint_report(rc.build_model("lenet_all_relu", 3, 10), (3, 32, 32)).iloc[0]
    assert all_relu.gradients_suffice and all_relu.gradient_constraints == 77 * 25 * 3
    uncovered = rc.constraint_report(rc.ConvNet((4,), (2,), ("tanh",), 1, 3, kernel_size=5, padding=0), (1, 32, 32))
    assert uncovered.iloc[0].uncovered_pixels == 63 and not uncovered.iloc[0].gradients_suffice


def test_min_filters_is_the_rank_threshold():
    """At the counting bound a generic output gradient gives full rank; one filter fewer cannot."""
    for size, kernel, stride, padding in [(16, 5, 2, 2), (12, 3, 1, 1), (16, 7, 2, 3)]:
        need = rc.min_filters(size, kernel, stride, padding)
        out = (size + 2 * padding - kernel) // stride + 1
        generator = torch.Generator().manual_seed(need)
        for filters, full in ((need, True), (need - 1, False)):
            grad = torch.randn(filters, out, out, dtype=torch.float64, generator=generator)
            rank = torch.linalg.matrix_rank(rc.grad_constraints(grad, (size, size), kernel, stride, padding))
            assert (int(rank) == size * size) == full


def test_attack_images_table_and_figures(tmp_path, samples):
    table, reconstructions = rc.attack_images("samples", "lenet", [0, 1], dtypes=("float64", "float32"),
                                              progress=False)
    assert len(table) == 4 and set(reconstructions) == {"float64", "float32"}
    assert {"dataset", "model", "dtype", "first_layer", "index", "label", "mse", "psnr", "ssim",
            "max_abs_err", "exact", "seconds"} <= set(table.columns)
    assert (table.psnr > 60).all() and table[table.dtype == "float64"].exact.all()
    # a float32 image is exact only if its error bound certifies 1e-3; otherwise the bound is the reason
    doubtful = table[~table.exact]
    assert doubtful.reason.str.startswith("error bound").all() and (doubtful.max_abs_err <= doubtful.error_bound).all()
    summary = rc.summarize(table)
    assert list(summary.images) == [2, 2] and sorted(summary.exact) == sorted([2, int(table.exact.sum()) - 2])
    csv = tmp_path / "metrics.csv"
    table.to_csv(csv, index=False)
    rc.plot_psnr(csv, path=tmp_path / "psnr.png")
    rc.plot_grid(samples[0][:2], [r.image for r in reconstructions["float32"]], path=tmp_path / "grid.png")
    rc.plot_reconstruction(samples[0][0], reconstructions["float64"][0].image, path=tmp_path / "one.png")
    for name in ("psnr.png", "grid.png", "one.png"):
        assert (tmp_path / name).stat().st_size > 5000


def run_cli(*args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "rconv_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_command_line_offline(tmp_path, packs):
    done = run_cli("-d", "CIFAR10", "-i", "0", "--dtype", "float64", "--data-root", str(packs), "--out",
                   str(tmp_path / "r.png"), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "PSNR" in done.stdout and "exact: True" in done.stdout
    assert (tmp_path / "r.png").exists()
    relu = run_cli("-d", "samples", "-i", "2", "-a", "Tanh", "--dtype", "float64", "--out",
                   str(tmp_path / "t.png"), cwd=REPO)
    assert relu.returncode == 0, relu.stderr
    assert "leaky_relu-leaky_relu-tanh-tanh" in relu.stdout


def test_command_line_errors(tmp_path):
    done = run_cli("-d", "ImageNet", cwd=tmp_path)
    assert done.returncode == 2 and "unknown dataset 'ImageNet'" in done.stderr


def test_the_public_api_is_what_all_lists():
    assert sorted(set(rc.__all__)) == sorted(rc.__all__)
    missing = [name for name in rc.__all__ if not hasattr(rc, name)]
    assert not missing
    undocumented = [name for name in rc.__all__ if callable(getattr(rc, name)) and not getattr(rc, name).__doc__]
    assert not undocumented
