"""rconv.cases.models: ConvNet and build_model's presets, and one RConvError naming each size, seed, preset or
activation no network can have."""
import pytest
import torch

import rconv_core as rc


@pytest.mark.parametrize("change,problem", [
    (dict(strides=(1, 0)), "conv layer 2: stride must be a whole number >= 1; got 0"),
    (dict(channels=(4, 0)), r"conv layer 2: channels \(filters\) must be a whole number >= 1; got 0"),
    (dict(channels=(-2, 4)), r"conv layer 1: channels \(filters\) must be a whole number >= 1; got -2"),
    (dict(kernel_size=0), "kernel_size must be a whole number >= 1; got 0"),
    (dict(num_classes=0), "num_classes must be a whole number >= 1; got 0"),
    (dict(in_channels=0), "in_channels must be a whole number >= 1; got 0"),
    (dict(padding=-1), "padding must be a whole number >= 0; got -1"),
    (dict(strides=(1, 1.5)), "conv layer 2: stride must be a whole number"),
])
def test_convnet_refuses_sizes_no_layer_can_have(change, problem):
    settings = dict(channels=(4, 4), strides=(1, 1), activations=("relu", "relu"), in_channels=3, num_classes=10)
    with pytest.raises(rc.RConvError, match=problem):
        rc.ConvNet(**{**settings, **change})


@pytest.mark.parametrize("seed", [2 ** 70, 1.5, "50", None])
def test_build_model_refuses_seeds_torch_cannot_take(seed):
    with pytest.raises(rc.RConvError, match="seed must be a whole number"):
        rc.build_model("lenet", seed=seed)


def test_convnet_takes_a_kernel_and_padding_per_layer():
    model = rc.ConvNet(channels=(64, 8), strides=(4, 1), activations=("leaky_relu", "relu"), in_channels=3,
                       num_classes=10, kernel_size=(5, 3), padding=(3, 1), input_size=64)
    first, second = model[0], model[2]
    assert (first.kernel_size, first.padding, first.stride) == ((5, 5), (3, 3), (4, 4))
    assert (second.kernel_size, second.padding) == ((3, 3), (1, 1))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    assert model.config["padding"] == (3, 1) and model.config["kernel_size"] == (5, 3)
    with pytest.raises(rc.RConvError, match="kernel_size needs one entry per conv layer"):
        rc.ConvNet(channels=(4, 4), strides=(1, 1), activations=("relu",) * 2, in_channels=3, num_classes=2,
                   kernel_size=(3, 3, 3))
    with pytest.raises(rc.RConvError, match="padding needs one entry per conv layer"):
        rc.ConvNet(channels=(4, 4), strides=(1, 1), activations=("relu",) * 2, in_channels=3, num_classes=2,
                   padding=(1,))


def test_unknown_presets_activations_and_layer_counts_are_named():
    with pytest.raises(rc.RConvError, match="unknown model 'resnet'; available presets: lenet, lenet_c10"):
        rc.build_model("resnet")
    with pytest.raises(rc.RConvError, match="unknown activation 'gelu'"):
        rc.build_model("lenet", activations=("gelu",) * 4)
    with pytest.raises(rc.RConvError, match="need one entry per conv layer"):
        rc.ConvNet((4, 4), (1,), ("relu", "relu"), 3, 10)
