"""Bad input gets a ValueError that names the problem, never a LinAlgError or a silent wrong image."""
import pandas as pd
import pytest
import torch
import torch.nn as nn

import rconv_core as rc
from conftest import uniform_init


@pytest.fixture(scope="module")
def lenet():
    return rc.build_model("lenet", 3, 10)


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def grads(lenet, image):
    return rc.client_gradients(lenet, image, 2, dtype=torch.float64)


def small(*middle):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *middle, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    return uniform_init(model)


@pytest.mark.parametrize("layer,name", [(nn.MaxPool2d(1), "MaxPool2d"), (nn.BatchNorm2d(4), "BatchNorm2d"),
                                        (nn.Dropout(0.1), "Dropout"), (nn.AvgPool2d(1), "AvgPool2d")])
def test_layers_it_cannot_invert(layer, name):
    model = small(nn.ReLU(), layer)
    grads = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match=rf"model\[2\] \({name}, after conv layer 1\) cannot be inverted"):
        rc.reconstruct(model, grads, (1, 8, 8))


def test_linear_without_bias():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3, bias=False))
    grads = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match=r"the Linear layer model\[3\] has no bias"):
        rc.reconstruct(model, grads, (1, 8, 8))


def test_layers_after_the_linear_layer_and_two_activations():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 3), nn.Softmax(dim=1))
    with pytest.raises(rc.RConvError, match=r"model\[3\] \(Softmax, after conv layer 1\)"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))
    model = small(nn.ReLU(), nn.Tanh())
    with pytest.raises(rc.RConvError, match=r"model\[2\] \(Tanh, after conv layer 1\) must directly follow a Conv2d"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8))


def test_not_a_sequential():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(rc.RConvError, match="nn.Sequential"):
        rc.reconstruct(Net(), [], (1, 2, 2))


def test_unsupported_conv_options():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(256, 3))
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): only groups=1"):
        rc.reconstruct(model, [torch.zeros_like(p) for p in model.parameters()], (2, 8, 8))


def test_batch_gradients(lenet):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model = lenet.double()
    loss = nn.functional.cross_entropy(model(images.double()), torch.tensor([1, 7]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with pytest.raises(rc.RConvError, match="batch of more than one image"):
        rc.reconstruct(model, grads, (3, 32, 32), batch_size=1)
    with pytest.raises(rc.RConvError, match="a single label for a batch of 2 images"):
        rc.client_gradients(model, images, 1)


def test_gradient_shapes(lenet, grads):
    bad = list(grads)
    bad[2] = bad[2][:, :, :3]
    with pytest.raises(rc.RConvError, match=r"gradient of 2.weight has shape \(16, 12, 3, 5\); the parameter has "
                                         r"shape \(16, 12, 5, 5\)"):
        rc.reconstruct(lenet, bad, (3, 32, 32))
    with pytest.raises(rc.RConvError, match="expected 10 gradient tensors"):
        rc.reconstruct(lenet, grads[:-1], (3, 32, 32))
    nan = list(grads)
    nan[0] = nan[0].clone()
    nan[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(rc.RConvError, match="NaN or infinite"):
        rc.reconstruct(lenet, nan, (3, 32, 32))


def test_input_shapes(lenet, grads):
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\) expects 3 input channels; input_shape \(1, 32, 32\)"):
        rc.reconstruct(lenet, grads, (1, 32, 32))
    with pytest.raises(rc.RConvError, match=r"input_shape \(3, 28, 28\) gives 588 features at the Linear layer, "
                                         r"which expects 768"):
        rc.reconstruct(lenet, grads, (3, 28, 28))
    with pytest.raises(rc.RConvError, match="input_shape must be"):
        rc.reconstruct(lenet, grads, (32, 32))


def test_zero_bias_gradient_is_not_a_linalg_error(lenet):
    grads = [torch.zeros_like(p) for p in lenet.parameters()]
    with pytest.raises(rc.RConvError, match="bias gradient is zero"):
        rc.reconstruct(lenet, grads, (3, 32, 32))


def test_options(lenet, grads):
    with pytest.raises(rc.RConvError, match="first_layer must be one of weights, gradients, hybrid; got 'paper'"):
        rc.reconstruct(lenet, grads, (3, 32, 32), first_layer="paper")
    with pytest.raises(rc.RConvError, match="unknown model 'resnet'; available presets: lenet, lenet_c10"):
        rc.build_model("resnet")
    with pytest.raises(rc.RConvError, match="unknown activation 'gelu'"):
        rc.build_model("lenet", activations=("gelu",) * 4)
    with pytest.raises(rc.RConvError, match="need one entry per conv layer"):
        rc.ConvNet((4, 4), (1,), ("relu", "relu"), 3, 10)
    with pytest.raises(rc.RConvError, match="unknown dtype 'float8'"):
        rc.as_dtype("float8")
    with pytest.raises(rc.RConvError, match="shape"):
        rc.image_metrics(torch.zeros(3, 8, 8), torch.zeros(1, 8, 8))
    negative = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(-0.1), nn.Flatten(), nn.Linear(32, 2))
    with pytest.raises(rc.RConvError, match="negative_slope must be positive"):
        rc.reconstruct(negative, [torch.zeros_like(p) for p in negative.parameters()], (1, 4, 4))


def test_gradients_by_name_must_match_the_model(lenet, grads):
    named = dict(zip([name for name, _ in lenet.named_parameters()], grads))
    assert rc.reconstruct(lenet, named, (3, 32, 32)).exact
    del named["0.bias"]
    named["head.weight"] = grads[0]
    with pytest.raises(rc.RConvError, match=r"missing \['0.bias'\], unexpected \['head.weight'\]"):
        rc.reconstruct(lenet, named, (3, 32, 32))


def test_constraint_builders_check_shapes():
    with pytest.raises(rc.RConvError, match=r"output_grad must have shape \(F, P, Q\)"):
        rc.grad_constraints(torch.zeros(4, 8), (8, 8), 3, padding=1)
    with pytest.raises(rc.RConvError, match="output_grad is 5x5, but a 3x3 kernel .* gives 8x8"):
        rc.grad_constraints(torch.zeros(2, 5, 5), (8, 8), 3, padding=1)
    with pytest.raises(rc.RConvError, match=r"weight must have shape \(F, C, kh, kw\)"):
        rc.weight_constraints(torch.zeros(2, 3, 3), (8, 8))
    with pytest.raises(rc.RConvError, match="does not fit"):
        rc.weight_constraints(torch.zeros(2, 1, 5, 5), (3, 3))


def test_gradient_dtype_by_name(lenet, image):
    by_name = rc.client_gradients(lenet, image, 2, dtype="float64")
    assert by_name[0].dtype == torch.float64
    assert torch.equal(by_name[0], rc.client_gradients(lenet, image, 2, dtype=torch.float64)[0])
    with pytest.raises(rc.RConvError, match="unknown dtype 'double64'"):
        rc.client_gradients(lenet, image, 2, dtype="double64")
    with pytest.raises(rc.RConvError, match="build_model always returns float32"):
        rc.build_model("lenet", dtype=torch.float64)


def test_experiment_loops_refuse_bad_settings_before_any_work():
    with pytest.raises(rc.RConvError, match="first_layers must be a non-empty list drawn from weights, gradients, "
                                         r"hybrid; got \['hybird'\]"):
        rc.attack_grid("samples", "lenet", [0], first_layers=["hybird"])
    with pytest.raises(rc.RConvError, match="relu_tests must be"):
        rc.attack_grid("samples", "lenet", [0], relu_tests=["relativ"])
    with pytest.raises(rc.RConvError, match="defences must be"):
        rc.attack_grid("samples", "lenet", [0], defences=[("dp", 1)])
    with pytest.raises(rc.RConvError, match="topk keeps a fraction"):
        rc.attack_grid("samples", "lenet", [0], defences=[("topk", 2)])
    with pytest.raises(rc.RConvError, match="no image indices given"):
        rc.attack_grid("samples", "lenet", [])
    with pytest.raises(rc.RConvError, match="missing \\['defence', 'strength'\\]"):
        rc.breaking_points(pd.DataFrame(dict(psnr=[1.0])))
    with pytest.raises(rc.RConvError, match="as many reconstructions as originals"):
        rc.plot_grid([torch.zeros(1, 4, 4)] * 2, [torch.zeros(1, 4, 4)])
