"""The federated study: one row per client image and method from a round through Flower's wire format, its
summary, its figure and its finding."""
import math

import pytest

import rconv_core as rc
from conftest import federated_table
from rconv.studies.findings import federated as federated_finding

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


@pytest.mark.slow
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


def test_the_summary_counts_images_per_setting_and_method():
    summary = rc.federated_summary(federated_table())
    assert len(summary) == 7 and (summary.images == 2).all()
    first = summary.iloc[0]
    assert (first.scenario, first.share_exact, first.share_good, first.median_psnr) == ("fedsgd", 1.0, 1.0, 95.0)
    lost = summary[(summary.noise_multiplier == 1e-6) & (summary.method == "rconv")].iloc[0]
    assert lost.share_good == 0.0 and math.isnan(lost.median_psnr)


def test_the_finding_reads_the_summary(tmp_path):
    sentence = federated_finding(rc.federated_summary(federated_table()), tmp_path)
    assert sentence.startswith("FedSGD lr 0.1: 100% at >= 60 dB (100% exact), lr 0.001: 0% at >= 60 dB")
    assert "FedAvg (2+ local steps): at most 0% at >= 60 dB" in sentence
    assert "up to noise multiplier 0 (epsilon inf)" in sentence
    assert "inverting_gradients under DP-SGD 4-5 dB" in sentence
