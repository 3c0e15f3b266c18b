"""rconv.analysis.reports: image metrics and the constraint report."""
import math
import pytest
import torch

import rconv_core as rc
from conftest import unpadded_stride_two


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


def _pooled_net(activation, pool, filters=(6, 16)):
    """A network outside the presets: two conv layers, each with an activation and a pool, and an MLP head."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, filters[0], 5), activation(), pool(2), torch.nn.Conv2d(filters[0], filters[1], 5),
        activation(), pool(2), torch.nn.Flatten(), torch.nn.Linear(filters[1] * 25, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 10))


def test_constraint_report_counts_pools_and_says_how_deep_the_attack_can_be_exact():
    tutorial = rc.constraint_report(_pooled_net(torch.nn.ReLU, torch.nn.MaxPool2d), (3, 32, 32))
    assert list(tutorial.pool) == ["max 2x2", "max 2x2"] and list(tutorial.weight_constraints) == [6 * 14 * 14, 400]
    assert list(tutorial.determined_by) == ["none: too few equations", "gradients, given the pool's pattern"]
    assert not tutorial.attrs["recoverable"]
    assert tutorial.attrs["verdict"] == ("not: exact at best down to conv layer 2's input; conv layer 1 has 3,072 "
                                         "unknowns and at most 1,626 equations")
    smooth = rc.constraint_report(_pooled_net(torch.nn.Tanh, torch.nn.AvgPool2d), (3, 32, 32))
    assert smooth.attrs["verdict"] == ("not: exact at best down to the Linear layer's input; conv layer 2: tanh "
                                       "before an average pool gives no linear equations")
    wide = rc.constraint_report(_pooled_net(torch.nn.LeakyReLU, torch.nn.AvgPool2d, (64, 64)), (3, 32, 32))
    assert wide.attrs["recoverable"] and wide.attrs["verdict"] == "recoverable, given the pools' patterns"
    assert list(wide.needs_pattern) == [True, True]
    assert list(wide.weight_solver) == ["pattern search", "none: beyond the pattern search"]  # 12,544 unknowns
    linear = rc.constraint_report(_pooled_net(torch.nn.Identity, torch.nn.AvgPool2d, (64, 64)), (3, 32, 32))
    assert linear.attrs["verdict"] == "recoverable" and not linear.needs_pattern.any()


def test_image_metrics_refuses_images_of_different_shapes():
    with pytest.raises(rc.RConvError, match="shape"):
        rc.image_metrics(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8))


def test_constraint_report_of_a_network_without_conv_layers_has_no_row_and_is_recoverable():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    table = rc.constraint_report(model, (3, 8, 8))
    assert len(table) == 0 and {"layer", "determined_by", "max_batch"} <= set(table.columns)
    assert table.attrs["recoverable"] and table.attrs["verdict"] == "recoverable" and table.attrs["max_batch"] == 9


@pytest.mark.parametrize("layers", [
    [torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)],
    [torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
     torch.nn.Linear(16 * 4 * 4, 10)],
    [torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10, bias=False)]], ids=["head", "pool", "bias-free"])
def test_constraint_report_s_max_batch_is_one_where_reconstruct_attacks_one_image(layers):
    assert rc.constraint_report(torch.nn.Sequential(*layers), (3, 8, 8)).attrs["max_batch"] == 1


def test_a_hidden_layer_s_unread_border_is_no_unknown_and_the_layer_below_loses_its_outputs_there():
    report = rc.constraint_report(unpadded_stride_two(), (3, 16, 16))
    first, second = report.iloc[0], report.iloc[1]
    assert (second.unread_pixels, second.uncovered_pixels, second.unknowns) == (12 * 31, 0, 12 * 15 * 15)
    assert second.input == "12x16x16" and second.determined_by == "gradients"
    assert first.unread_pixels == 0 and first.weight_constraints == 12 * 15 * 15
    assert report.attrs["recoverable"]
    image_border = rc.constraint_report(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, 2, 0), torch.nn.ReLU(),
                                                            torch.nn.Flatten(), torch.nn.Linear(64 * 49, 10)),
                                        (3, 16, 16)).iloc[0]
    assert image_border.uncovered_pixels == 3 * 31 and image_border.unread_pixels == 0  # the image's own: lost
    assert image_border.determined_by == "none: pixels no kernel position reaches"


def test_input_that_reaches_only_outputs_nothing_reads_counts_as_uncovered_as_the_attack_finds_it():
    """An unpadded stride-2 second layer leaves its input's last row and column unread, so the first layer's
    outputs there are unknown, and the image's last two rows and columns reach no other: counting and the attack's
    rank agree on the 564 values lost."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(16, 20, 5, 2),
                                torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(20 * 10 * 10, 10))
    report = rc.constraint_report(model, (3, 48, 48))
    assert list(report.uncovered_pixels) == [3 * (48 * 48 - 46 * 46), 0] and list(report.unread_pixels) == [0, 16 * 47]
    assert report.iloc[0].determined_by == "none: pixels no kernel position reaches" and not report.attrs["recoverable"]
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(3))
    result = rc.reconstruct(model, rc.client_gradients(model, image, torch.tensor(2), dtype="float64"), (3, 48, 48))
    assert not result.exact and result.layers[0].unknowns - result.layers[0].rank == 3 * (48 * 48 - 46 * 46)
