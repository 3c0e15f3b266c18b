"""rconv.analysis.plotting: every figure explains its colours and line styles in a legend, and its numbers match
the table it is drawn from."""
import inspect
import math

import matplotlib
import pandas as pd
import pytest
import torch

import rconv_core as rc
from conftest import federated_table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend)

# Figures of images only: no colour or line style carries a meaning there.
IMAGE_FIGURES = {"plot_reconstruction", "plot_grid", "plot_methods"}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def legend_texts(figure):
    """Every label in the figure's legends, per axes legend and figure legend."""
    legends = [axis.get_legend() for axis in figure.axes] + list(figure.legends)
    return [text.get_text() for legend in legends if legend is not None for text in legend.get_texts()]


def rows(**columns):
    return pd.DataFrame(columns)


def psnr_table():
    return rows(dtype=["float64"] * 3 + ["float32"] * 3, psnr=[300.0, 290.0, 310.0, 100.0, 45.0, 5.0],
                exact=[True, True, True, True, False, False])


def precision_table():
    settings = [(d, f, t) for d in ("float64", "float32") for f in ("weights", "hybrid") for t in ("absolute",
                                                                                                   "relative")]
    return pd.DataFrame([dict(dataset=dataset, dtype=d, first_layer=f, relu_test=t, psnr=psnr)
                         for dataset in ("mnist", "cifar10") for d, f, t in settings for psnr in (10.0, 110.0)])


def defences_table():
    return pd.DataFrame([dict(dataset=dataset, defence=defence, strength=strength, project=project, psnr=psnr,
                              ssim=0.5)
                         for dataset in ("cifar10", "cifar100") for project in (False, True)
                         for defence, strengths in (("gaussian", (1e-6, 1e-2)), ("topk", (1.0, 0.1)))
                         for strength, psnr in zip(strengths, (90.0, 5.0))])


def filters_table():
    """lenet's layer 1 behind LeakyReLU, lenet_all_relu's behind ReLU; layer 2 with a count far off the sweep."""
    table = []
    for model, activation, rgap in (("lenet", "leaky_relu", 48), ("lenet_all_relu", "relu", 308)):
        for position, counts, bound in ((1, (32, 64, 128), 64), (2, (8, 16, 24, 32), 16)):
            for filters in counts:
                table.append(dict(model=model, activation=activation if position == 1 else "relu",
                                  position=position, filters=filters, seed=50, index=0, full_rank=filters >= bound,
                                  min_filters=bound, rgap_filters=rgap if position == 2 else 12))
    return pd.DataFrame(table)


def success_table():
    exact = [True] * 997 + [False] * 3
    return rows(model=["lenet"] * 1000, dtype=["float32"] * 1000, exact=exact, rank_deficient=[False] * 1000,
                psnr=[100.0] * 997 + [-40.0] * 3)


def sizes_table():
    """A size sweep: recoverable networks at 32 and 64 px, the paper's LeNet at 64 px not recoverable."""
    table = []
    for model, size, recoverable, seconds in (("lenet", 32, True, 0.3), ("lenet_hr64", 64, True, 0.5),
                                              ("lenet", 64, False, 0.1)):
        for dtype in ("float64", "float32"):
            for index, start in ((0, "cold"), (1, "warm")):
                table.append(dict(model=model, size=size, dtype=dtype, index=index, start=start,
                                  seconds=seconds if start == "cold" else seconds / 10, peak_mb=1000.0 + size,
                                  exact=recoverable, recoverable=recoverable,
                                  verdict="recoverable" if recoverable else "not: exact at best down to conv layer 3's input; ..."))
    return pd.DataFrame(table)


def test_psnr_strip_plot_explains_its_dots_and_lines():
    figure = rc.plot_psnr(psnr_table())
    assert legend_texts(figure) == ["image, exact", "image, not exact", "median",
                                    f"{rc.BROKEN_PSNR:g} dB: below it the attack failed"]


def test_precision_figure_names_every_method_and_the_failure_line():
    texts = legend_texts(rc.plot_precision(precision_table()))
    assert {"weights, absolute ReLU test", "weights, relative ReLU test", "hybrid, absolute ReLU test",
            "hybrid, relative ReLU test"} <= set(texts)
    assert f"{rc.BROKEN_PSNR:g} dB: below it the attack failed" in texts


def test_defences_figure_names_datasets_projection_and_the_failure_line():
    texts = legend_texts(rc.plot_defences(defences_table()))
    assert {"cifar10", "cifar10, projected", "cifar100", "cifar100, projected"} <= set(texts)
    assert f"{rc.BROKEN_PSNR:g} dB: below it the attack failed" in texts


def test_filters_panels_each_name_their_own_layer_activation_and_weight_count():
    figure = rc.plot_filters(filters_table())
    first, second = figure.axes
    first_texts = [t.get_text() for t in first.get_legend().get_texts()]
    assert "lenet, layer 1 leaky_relu" in first_texts and "lenet_all_relu, layer 1 relu" in first_texts
    assert "lenet: weight-constraint count (12)" in first_texts
    assert "counting bound (64)" in first_texts
    second_texts = [t.get_text() for t in second.get_legend().get_texts()]
    assert "lenet, layer 2 relu" in second_texts
    assert "lenet: weight-constraint count (48)" in second_texts
    assert any(text.startswith("lenet_all_relu: weight-constraint count (308)") for text in second_texts)
    low, high = second.get_xlim()
    assert 48 <= high < 100, "a count of 308 must not stretch the axis over the curves at 8-32"


def test_success_figure_states_rates_at_the_precision_it_shows():
    figure = rc.plot_success(success_table())
    assert {"exact", "rank-deficient", "full rank, not exact"} <= set(legend_texts(figure))
    notes = [text.get_text() for text in figure.axes[0].texts]
    assert notes[0].startswith("99.7% exact"), notes


def test_sizes_figure_explains_precision_start_and_verdict():
    figure = rc.plot_sizes(sizes_table())
    time_axis, memory_axis, verdict_axis = figure.axes
    texts = [t.get_text() for t in time_axis.get_legend().get_texts()]
    assert texts == ["float64 gradients", "float32 gradients", "cold: first image, factorisations included",
                     "warm: a further image on the same model", "not recoverable by counting"]
    assert "not recoverable by counting" in [t.get_text() for t in memory_axis.get_legend().get_texts()]
    verdicts = [t.get_text() for t in verdict_axis.get_legend().get_texts()]
    assert {"counting: recoverable", "counting: not recoverable"} <= set(verdicts)
    cold64 = [line for line in time_axis.get_lines() if line.get_linestyle() == "-"][0]
    assert list(cold64.get_xdata()) == [32, 64] and list(cold64.get_ydata()) == [0.3, 0.5], \
        "the lines join only the networks the counting bound calls recoverable"
    counts = [t.get_text() for t in verdict_axis.texts]
    assert counts == ["2/2", "2/2", "2/2", "2/2", "0/2", "0/2"]
    with pytest.raises(rc.RConvError, match="size_sweep table"):
        rc.plot_sizes(rows(size=[32], seconds=[1.0]))


def batches_table():
    frame = rows(method=["rconv"] * 3 + ["dlg"] * 3, model=["lenet"] * 6, dtype=["float32"] * 6,
                 batch_size=[1, 2, 4] * 2, max_batch=[2] * 6, first_index=[0] * 6, label=[1] * 6,
                 recovered_label=[1] * 6, image_exact=[True, True, False] + [False] * 3,
                 psnr=[120.0, 110.0, 5.0, 20.0, 12.0, 4.0], seconds=[0.1, 0.2, 0.3, 1.0, 2.0, 3.0])
    return frame


def test_batches_figure_names_networks_attacks_and_the_counting_bound():
    figure = rc.plot_batches(batches_table())
    texts = legend_texts(figure)
    assert {"lenet, float32", "rconv", "dlg", "counting bound (max_batch)"} <= set(texts)
    exact_line = figure.axes[0].get_lines()[0]
    assert list(exact_line.get_ydata()) == [1.0, 1.0, 0.0]
    with pytest.raises(rc.RConvError, match="batch_sweep table"):
        rc.plot_batches(rows(batch_size=[1]))


def test_grid_shows_the_image_indices():
    images = torch.rand(3, 3, 8, 8)
    figure = rc.plot_grid(images, images, indices=[12, 40, 7])
    assert [axis.get_title() for axis in figure.axes[:3]] == ["#12", "#40", "#7"]
    with pytest.raises(rc.RConvError, match="one index per image"):
        rc.plot_grid(images, images, indices=[1, 2])


def test_the_figure_shows_each_scenario_with_a_legend(tmp_path):
    path = tmp_path / "metrics.csv"
    federated_table().to_csv(path, index=False)
    figure = rc.plot_federated(path, path=tmp_path / "federated.png")
    assert (tmp_path / "federated.png").stat().st_size > 0
    legends = [[text.get_text() for text in axis.get_legend().get_texts()] for axis in figure.axes]
    assert "1 local step (FedSGD)" in legends[0] and "2 local steps (FedAvg)" in legends[0]
    assert {"rconv", "inverting_gradients", "rconv: no image found"} <= set(legends[1])
    assert "R-CONV: certified exact" in legends[2]
    with pytest.raises(rc.RConvError, match="federated_round table"):
        rc.plot_federated(rows(lr=[0.1]))


def test_plot_real_networks_legend_and_refusal(tmp_path):
    table = pd.DataFrame(dict(network=["a", "a", "b"], dtype=["float64", "float32", "float64"],
                              outcome=["exact", "not exact", "refused"], psnr=[math.inf, 40.0, math.nan],
                              ig_psnr=[12.0, 13.0, math.nan]))
    figure = rc.plot_real_networks(table, path=tmp_path / "psnr.png")
    assert (tmp_path / "psnr.png").stat().st_size > 0
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["R-CONV, float64 gradients", "R-CONV, float32 gradients",
                      "Inverting Gradients, float64 gradients", "Inverting Gradients, float32 gradients"]
    assert "refused" in [text.get_text() for text in figure.axes[0].texts]
    with pytest.raises(rc.RConvError, match="attack_networks' attacks table"):
        rc.plot_real_networks(table.drop(columns="ig_psnr"))


def test_every_figure_function_is_checked_for_its_legend():
    """A new plot_ function must get a legend test above, or be an image-only figure."""
    tested = {"plot_psnr", "plot_precision", "plot_defences", "plot_filters", "plot_success", "plot_sizes",
              "plot_batches", "plot_federated", "plot_real_networks"}
    figures = {name for name in rc.__all__ if name.startswith("plot_")}
    assert figures == tested | IMAGE_FIGURES
    source = inspect.getsource(inspect.getmodule(test_every_figure_function_is_checked_for_its_legend))
    assert all(f"rc.{name}(" in source for name in tested)
