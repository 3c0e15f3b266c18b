"""rconv.analysis.reports: image metrics and the constraint report."""
import math
import pytest
import torch

import rconv_core as rc


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


def test_image_metrics_refuses_images_of_different_shapes():
    with pytest.raises(rc.RConvError, match="shape"):
        rc.image_metrics(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8))
