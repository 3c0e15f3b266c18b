"""The networks people train (rc.NETWORKS) as presets, attack_networks' tables and their figure."""
import math

import pytest
import torch

import rconv_core as rc


def test_network_presets_build_by_name_with_their_dataset():
    model = rc.build_model("Tutorial_CNN", 3, 10, seed=1)
    assert isinstance(model, rc.NETWORKS["tutorial_cnn"].build) and rc.PRESET_DATASETS["tutorial_cnn"] == "cifar10"
    assert torch.equal(model.conv1.weight, rc.build_model("tutorial_cnn", 3, 10, seed=1).conv1.weight)
    assert not rc.build_model("vgg_style").training  # BatchNorm with its running statistics
    with pytest.raises(rc.RConvError, match=r"'lenet5' is built as people train it; it takes no ConvNet settings"):
        rc.build_model("lenet5", 1, 10, channels=(4, 4))
    with pytest.raises(rc.RConvError, match=r"available presets: .*tutorial_cnn"):
        rc.build_model("resnet152")


@pytest.mark.slow
def test_attack_networks_measures_every_layer_and_names_a_refusal():
    attacks, layers = rc.attack_networks(["cnn6", "small_resnet"], [0], dtypes=["float64"], ig_iterations=0,
                                         progress=False)
    cnn6 = attacks[attacks.network == "cnn6"].iloc[0]
    assert cnn6.counting == "recoverable" and cnn6.outcome == "exact" and cnn6.psnr > 200 and math.isnan(cnn6.ig_psnr)
    rows = layers[layers.network == "cnn6"]
    assert rows.layer.tolist() == ["features"] + [f"conv {k} input" for k in range(6, 0, -1)]
    assert rows.exact.all() and rows.determined.all() and (rows.max_abs_err <= 1e-6).all()
    resnet = attacks[attacks.network == "small_resnet"].iloc[0]
    assert resnet.counting.startswith("refused: graph node add")
    assert resnet.outcome == "refused" and "graph node add" in resnet.reason and "residual" in resnet.reason
    figure = rc.plot_real_networks(attacks)
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert labels == ["R-CONV, float64 gradients", "Inverting Gradients, float64 gradients"]


def test_plot_real_networks_refuses_another_table():
    with pytest.raises(rc.RConvError, match="attack_networks' attacks table"):
        rc.plot_real_networks(rc.attack_networks([], [0], progress=False)[0])
