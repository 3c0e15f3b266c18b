"""The federated study: one row per client image and method from a round through Flower's wire format, its
summary, its figure and its finding."""
import math

import matplotlib
import pandas as pd
import pytest

import rconv_core as rc
from rconv.studies.findings import federated as federated_finding

matplotlib.use("Agg")


@pytest.mark.slow
def test_a_round_attacks_every_clients_update(packs):
    pytest.importorskip("flwr", reason="needs the optional flwr package: make federated")
    pytest.importorskip("opacus", reason="needs the optional opacus package: make federated")
    settings = rc.fedsgd_fedavg([0.1], [1]) + rc.dp_sgd([0.0], max_grad_norm=0.2)
    table = rc.federated_round("cifar10", "lenet_c10", settings, clients=2, client_images=1, data_root=packs,
                               progress=False)
    assert len(table) == 4 and list(table["index"]) == [0, 1, 0, 1]
    assert list(table.scenario) == ["fedsgd", "fedsgd", "dp_sgd", "dp_sgd"]
    assert (table.method == "rconv").all() and (table.epsilon == math.inf).all()
    # one image per client, one step: FedSGD leaves every image within float32's precision
    fedsgd = table[table.scenario == "fedsgd"]
    assert (fedsgd.psnr >= rc.GOOD_PSNR).all() and (fedsgd.label == fedsgd.recovered_label).all()
    # clipping shrinks the step, and float32 weights keep fewer of its digits: never a false claim of exact
    assert (table.max_abs_err[table.image_exact] <= 1e-3).all()
    assert (table.reason[~table.image_exact].str.len() > 0).all()
    summary = rc.federated_summary(table)
    assert list(summary.scenario) == ["fedsgd", "dp_sgd"] and (summary.images == 2).all()
    assert summary.share_good.iloc[0] == 1.0


def test_a_diverged_client_is_a_row_with_its_reason(packs):
    """Five steps at a learning rate of 10 overflow the float32 weights: rows that say so, never a crash."""
    pytest.importorskip("flwr", reason="needs the optional flwr package: make federated")
    table = rc.federated_round("cifar10", "lenet_c10", rc.fedsgd_fedavg([1e30], [2]), clients=1, client_images=2,
                               data_root=packs, progress=False)
    assert len(table) == 2 and table.psnr.isna().all() and not table.image_exact.any()
    assert table.reason.str.contains("NaN or infinite").all()


def test_a_round_needs_local_training_settings():
    with pytest.raises(rc.RConvError, match="a list of LocalTraining settings"):
        rc.federated_round("cifar10", "lenet_c10", [{"lr": 0.1}])
    with pytest.raises(rc.RConvError, match="clients must be a whole number"):
        rc.federated_round("cifar10", "lenet_c10", rc.fedsgd_fedavg([0.1], [1]), clients=0)


def study_table():
    """A federated study's metrics as federated_round writes them: two plain settings, two private ones."""
    rows = []
    for scenario, lr, steps, noise, epsilon, method, psnr, exact in [
            ("fedsgd", 0.1, 1, 0.0, math.inf, "rconv", 95.0, True), ("fedsgd", 0.001, 1, 0.0, math.inf, "rconv", 40.0, False),
            ("fedavg", 0.1, 2, 0.0, math.inf, "rconv", 3.0, False),
            ("dp_sgd", 0.1, 1, 0.0, math.inf, "rconv", 75.0, False),
            ("dp_sgd", 0.1, 1, 0.0, math.inf, "inverting_gradients", 5.0, False),
            ("dp_sgd", 0.1, 1, 1e-6, 5.5e11, "rconv", math.nan, False),
            ("dp_sgd", 0.1, 1, 1e-6, 5.5e11, "inverting_gradients", 4.0, False)]:
        for member in range(2):
            rows.append(dict(scenario=scenario, lr=lr, local_steps=steps, noise_multiplier=noise,
                             max_grad_norm=0.2 if scenario == "dp_sgd" else math.nan, epsilon=epsilon, method=method,
                             psnr=psnr, image_exact=exact, seconds=1.0, member=member))
    return pd.DataFrame(rows)


def test_the_summary_counts_images_per_setting_and_method():
    summary = rc.federated_summary(study_table())
    assert len(summary) == 7 and (summary.images == 2).all()
    first = summary.iloc[0]
    assert (first.scenario, first.share_exact, first.share_good, first.median_psnr) == ("fedsgd", 1.0, 1.0, 95.0)
    lost = summary[(summary.noise_multiplier == 1e-6) & (summary.method == "rconv")].iloc[0]
    assert lost.share_good == 0.0 and math.isnan(lost.median_psnr)


def test_the_figure_shows_each_scenario_with_a_legend(tmp_path):
    path = tmp_path / "metrics.csv"
    study_table().to_csv(path, index=False)
    figure = rc.plot_federated(path, path=tmp_path / "federated.png")
    assert (tmp_path / "federated.png").stat().st_size > 0
    legends = [[text.get_text() for text in axis.get_legend().get_texts()] for axis in figure.axes]
    assert "1 local step (FedSGD)" in legends[0] and "2 local steps (FedAvg)" in legends[0]
    assert {"rconv", "inverting_gradients", "rconv: no image found"} <= set(legends[1])
    assert "R-CONV: certified exact" in legends[2]


def test_the_finding_reads_the_summary(tmp_path):
    sentence = federated_finding(rc.federated_summary(study_table()), tmp_path)
    assert sentence.startswith("FedSGD lr 0.1: 100% at >= 60 dB (100% exact), lr 0.001: 0% at >= 60 dB")
    assert "FedAvg (2+ local steps): at most 0% at >= 60 dB" in sentence
    assert "up to noise multiplier 0 (epsilon inf)" in sentence
    assert "inverting_gradients under DP-SGD 4-5 dB" in sentence
