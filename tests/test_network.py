"""rconv.attack.network: which models R-CONV can invert (parse_network), the gradients it accepts for them
(check_gradients) and the input shapes that fit them (check_input_shape), each refusal one RConvError naming the
layer, parameter or shape."""
import pytest
import torch
import torch.nn as nn

import rconv_core as rc
from rconv.attack import network as rc_network
from conftest import uniform_init


def small(*middle):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *middle, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    return uniform_init(model)


@pytest.mark.parametrize("layers,problem", [
    ((nn.ReLU(), nn.MaxPool2d(2, stride=1)), r"model\[2\] \(MaxPool2d, after conv layer 1\): only square pools with "
                                             r"stride equal to the window"),
    ((nn.AvgPool2d(2), nn.ReLU()), r"model\[2\] \(ReLU, after conv layer 1\) follows an average pool"),
    ((nn.ReLU(), nn.AdaptiveAvgPool2d((3, 3))), r"conv layer 1 \(model\[0\]\): its pool AdaptiveAvgPool2d\(3, 3\) "
                                                r"on a \(8, 8\) map is no square AvgPool"),
    ((nn.ReLU(), nn.MaxPool2d(2), nn.MaxPool2d(2)), r"model\[3\] \(MaxPool2d, after conv layer 1\) must follow a "
                                                    r"conv layer's activation"),
])
def test_pools_it_cannot_invert(layers, problem):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *layers, nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    grads = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match=problem):
        rc.reconstruct(model, grads, (1, 8, 8))


def test_a_max_pool_before_the_activation_commutes_with_it():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    step = rc_network.parse_network(model).steps[0]
    assert step.activation == "tanh" and isinstance(step.pool, nn.MaxPool2d)


@pytest.mark.parametrize("layer,problem", [(nn.Dropout(0.1), "Dropout in training mode")])
def test_layers_in_training_mode(layer, problem):
    model = small(layer, nn.ReLU())
    with pytest.raises(rc.RConvError, match=rf"model\[1\] \({type(layer).__name__}, after conv layer 1\): {problem}"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))


def test_batchnorm_after_the_activation_cannot_be_folded():
    model = small(nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.raises(rc.RConvError, match=r"model\[2\] \(BatchNorm2d, after conv layer 1\) must directly follow "
                                         r"a Conv2d layer \(before its activation\)"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))


def test_a_bias_free_linear_layer_must_be_the_last():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 8, bias=False),
                          nn.ReLU(), nn.Linear(8, 3))
    grads = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match=r"the Linear layer model\[3\] has no bias and is followed by model\[4\] "
                                         r"\(ReLU, after conv layer 1\)"):
        rc.reconstruct(model, grads, (1, 8, 8))


def test_layers_after_the_linear_layer_and_two_activations():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 3), nn.Softmax(dim=1))
    with pytest.raises(rc.RConvError, match=r"model\[3\] \(Softmax, after conv layer 1\) cannot be inverted"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))
    model = small(nn.ReLU(), nn.Tanh())
    with pytest.raises(rc.RConvError, match=r"model\[2\] \(Tanh, after conv layer 1\) must directly follow a Conv2d"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))


def test_a_forward_torch_fx_cannot_trace():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.flatten(1)) if x.sum() > 0 else self.fc(-x.flatten(1))

    with pytest.raises(rc.RConvError, match="torch.fx cannot trace Net"):
        rc.reconstruct(Net(), [torch.zeros(2, 4), torch.zeros(2)], (1, 2, 2))


def test_unsupported_conv_options():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): only groups=1"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (2, 8, 8))


def test_gradient_shapes(lenet, lenet_grads):
    bad = list(lenet_grads)
    bad[2] = bad[2][:, :, :3]
    with pytest.raises(rc.RConvError, match=r"gradient of 2.weight has shape \(16, 12, 3, 5\); the parameter has "
                                         r"shape \(16, 12, 5, 5\)"):
        rc.reconstruct(lenet, bad, (3, 32, 32))
    with pytest.raises(rc.RConvError, match="expected 10 gradient tensors"):
        rc.reconstruct(lenet, lenet_grads[:-1], (3, 32, 32))
    nan = list(lenet_grads)
    nan[0] = nan[0].clone()
    nan[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(rc.RConvError, match="NaN or infinite"):
        rc.reconstruct(lenet, nan, (3, 32, 32))


def test_gradients_by_name_must_match_the_model(lenet, lenet_grads):
    named = dict(zip([name for name, _ in lenet.named_parameters()], lenet_grads))
    assert rc.reconstruct(lenet, named, (3, 32, 32)).exact
    del named["0.bias"]
    named["head.weight"] = lenet_grads[0]
    with pytest.raises(rc.RConvError, match=r"missing \['0.bias'\], unexpected \['head.weight'\]"):
        rc.reconstruct(lenet, named, (3, 32, 32))


def test_input_shapes(lenet, lenet_grads):
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\) expects 3 input channels; input_shape \(1, 32, 32\)"):
        rc.reconstruct(lenet, lenet_grads, (1, 32, 32))
    with pytest.raises(rc.RConvError, match=r"input_shape \(3, 28, 28\) gives 588 features at the Linear layer, "
                                         r"which expects 768"):
        rc.reconstruct(lenet, lenet_grads, (3, 28, 28))
    with pytest.raises(rc.RConvError, match="input_shape must be"):
        rc.reconstruct(lenet, lenet_grads, (32, 32))


def test_mixed_gradient_dtypes_are_named_not_called_a_batch(lenet_c10, lenet_c10_grads):
    mixed = list(lenet_c10_grads)
    mixed[-1] = mixed[-1].float()
    with pytest.raises(rc.RConvError) as error:
        rc.reconstruct(lenet_c10, mixed, (3, 32, 32))
    message = str(error.value)
    assert "mix dtypes" in message and "9.bias is float32" in message and "batch" not in message


def test_a_leaky_relu_without_a_positive_slope_cannot_be_inverted():
    negative = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(-0.1), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(rc.RConvError, match="negative_slope must be positive"):
        rc.reconstruct(negative, [torch.zeros_like(p) for p in negative.parameters()], (1, 4, 4))
