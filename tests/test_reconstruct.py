"""rconv.attack.reconstruct: exact recovery in float64 across activations, geometries, channels and sizes, float32
robustness, what project=True may claim, and one clear RConvError for each argument of the wrong kind."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import rconv_core as rc
from rconv.common.geometry import conv_output_size, covered_size
from rconv.cases.models import activation_module
from conftest import attack, max_error, uniform_init

EXACT = 1e-8
SLOW = pytest.mark.slow
# Sweeps keep one or two cases in the quick subset and run the rest in the full suite (pytest.mark.slow);
# LeakyReLU on real images is also what the quick presets attack.
FAST_PRESETS = {("lenet_c10", "cifar10"), ("lenet", "mnist")}


def conv_block(c_in, c_out, kernel, stride, padding, activation):
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding), activation_module(activation)]


def network(input_shape, blocks, classes=10, seed=0):
    """nn.Sequential of conv blocks (c_out, kernel, stride, padding, activation), Flatten, Linear."""
    channels, height, width = input_shape
    layers = []
    for c_out, kernel, stride, padding, activation in blocks:
        layers += conv_block(channels, c_out, kernel, stride, padding, activation)
        height, width = conv_output_size((height, width), kernel, stride, padding)
        channels = c_out
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * height * width, classes))
    return uniform_init(model, seed)


def covered(size, kernel, stride, padding):
    out = (size + 2 * padding - kernel) // stride + 1
    return stride * (out - 1) + kernel >= size + padding


@pytest.mark.parametrize("activation,source", [
    pytest.param(activation, source, id=f"{source}-{activation}",
                 marks=SLOW if (source == "random" and activation != "relu") or activation == "leaky_relu" else ())
    for source in ("random", "real") for activation in rc.ACTIVATIONS])
def test_every_activation_is_recovered_exactly(activation, source, samples):
    image = samples[0][1] if source == "real" else torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(7))
    if activation == "relu":
        # ReLU everywhere: 77 first-layer filters (as LeNet_All_ReLU) and 12 in the narrow layers
        model = rc.build_model("lenet_all_relu", 3, 10, channels=(77, 22, 12, 12))
        result = attack(model, image, label=3, first_layer="gradients")
    else:
        model = rc.build_model("lenet", 3, 10, activations=(activation,) * 4)
        result = attack(model, image, label=3)
    assert result.exact, result.report()
    assert max_error(result, image) <= EXACT


@pytest.mark.parametrize("kernel,stride,padding", [(k, s, p) for k in (3, 5, 7) for s in (1, 2)
                                                   for p in range(k // 2 + 1)])
def test_first_layer_geometry(kernel, stride, padding):
    """The image itself, behind one conv layer of any kernel, stride and padding."""
    size = 10
    image = torch.rand(3, size, size, generator=torch.Generator().manual_seed(kernel + 10 * stride + 100 * padding))
    filters = 3 * stride * stride + 3
    model = network((3, size, size), [(filters, kernel, stride, padding, "leaky_relu")])
    result = attack(model, image)
    if covered(size, kernel, stride, padding):
        assert result.exact, result.report()
        assert max_error(result, image) <= EXACT
    else:  # the last row and column of pixels meet no kernel position: honestly underdetermined
        assert not result.exact
        assert result.layers[0].rank < result.layers[0].unknowns


@pytest.mark.parametrize("kernel,stride,padding", [(k, s, p) for k in (3, 5, 7) for s in (1, 2)
                                                   for p in range(k // 2 + 1)])
def test_gradient_constraints_geometry(kernel, stride, padding):
    """A hidden layer recovered from gradient constraints, for any kernel, stride and padding. Where its last row
    and column meet no kernel position, nothing reads them: the layer solves for the rest, the layer below does
    without its outputs there, and the image is still exact."""
    size = 8
    image = torch.rand(1, size, size, generator=torch.Generator().manual_seed(kernel + 10 * stride + 100 * padding))
    reached = covered_size(size, kernel, stride, padding)
    needed = rc.min_filters(reached, kernel, stride, padding)
    filters = math.ceil(1.5 * needed) + 2
    model = network((1, size, size), [(4, 3, 1, 1, "tanh"), (filters, kernel, stride, padding, "leaky_relu")])
    result = attack(model, image, first_layer="weights")
    assert result.exact, result.report()
    assert result.layers[1].method == "gradients"
    assert max_error(result, image) <= EXACT
    assert result.layers[1].unknowns == 4 * reached[0] * reached[1]
    assert (reached == (size, size)) != any("no kernel position reaches" in note for note in result.notes)
    assert float(result.inputs[1][:, reached[0]:].abs().sum() + result.inputs[1][:, :, reached[1]:].abs().sum()) == 0


def test_mnist_native_28(packs):
    images, labels = rc.load_images("mnist", [0, 1], root=packs, size=None)
    assert images.shape == (2, 1, 28, 28)
    model = rc.build_model("lenet", 1, 10, input_size=28)
    for image, label in zip(images, labels):
        result = attack(model, image, label)
        assert result.exact and max_error(result, image) <= EXACT


@pytest.mark.slow
def test_input_64_one_channel(samples):
    image = torch.nn.functional.interpolate(samples[0][2:3], size=64, mode="bilinear").mean(1)[0:1]
    # stride-2 5x5 layers need 64 filters on 32x32 inputs and 16 on 16x16 ones (min_filters)
    model = network((1, 64, 64), [(8, 5, 2, 2, "leaky_relu"), (72, 5, 2, 2, "leaky_relu"),
                                  (24, 5, 2, 2, "relu")])
    result = attack(model, image, label=1)
    assert result.exact, result.report()
    assert max_error(result, image) <= EXACT


@pytest.mark.slow
def test_input_64_three_channels_from_gradients_alone(samples):
    image = torch.nn.functional.interpolate(samples[0][0:1], size=64, mode="bilinear").clamp(0, 1)[0]
    filters = rc.min_filters(64, 7, 2, 3) + 8  # the counting bound is 114 filters of 7x7, stride 2
    model = network((3, 64, 64), [(filters, 7, 2, 3, "leaky_relu"), (72, 5, 2, 2, "leaky_relu"),
                                  (24, 5, 2, 2, "relu")])
    result = attack(model, image, label=2, first_layer="gradients")
    assert result.layers[0].method == "gradients"
    assert result.exact, result.report()
    assert max_error(result, image) <= EXACT


@pytest.mark.parametrize("preset,dataset", [
    pytest.param(preset, dataset, marks=() if (preset, dataset) in FAST_PRESETS else SLOW)
    for preset, dataset in [("lenet", "cifar100"), ("lenet_c10", "cifar10"), ("lenet", "mnist"),
                            ("lenet_o", "cifar100"), ("o_cnn6", "cifar10"), ("lenet_4_relu", "cifar100"),
                            ("lenet_all_relu", "cifar100")]])
def test_presets_float64_exact(preset, dataset, packs):
    info = rc.dataset_info(dataset)
    images, labels = rc.load_images(dataset, [0, 1], root=packs)
    model = rc.build_model(preset, info["channels"], info["num_classes"])
    for image, label in zip(images, labels):
        result = attack(model, image, label)
        assert result.exact, result.report()
        assert max_error(result, image) <= EXACT


@pytest.mark.parametrize("first_layer", ["weights", pytest.param("hybrid", marks=SLOW)])  # hybrid: the default
def test_paper_first_layer_methods_agree_in_float64(first_layer, packs):
    images, labels = rc.load_images("cifar10", [3], root=packs)
    model = rc.build_model("lenet_c10", 3, 10)
    result = attack(model, images[0], labels[0], first_layer=first_layer)
    assert result.layers[0].method == first_layer
    assert result.exact and max_error(result, images[0]) <= EXACT


@pytest.mark.parametrize("preset,dataset", [pytest.param("lenet", "cifar100", marks=SLOW),
                                            pytest.param("lenet_c10", "cifar10", marks=SLOW), ("lenet", "mnist")])
def test_float32_gradients_testing_presets(preset, dataset, packs):
    info = rc.dataset_info(dataset)
    images, labels = rc.load_images(dataset, [0, 1, 2], root=packs)
    model = rc.build_model(preset, info["channels"], info["num_classes"])
    for image, label in zip(images, labels):
        result = attack(model, image, label, dtype=torch.float32)
        assert rc.image_metrics(image, result.image)["psnr"] >= 60


def test_float32_with_the_papers_first_layer_is_reported_not_exact(packs):
    """The weight-constraint system alone is too ill-conditioned for float32 data: say so."""
    images, labels = rc.load_images("cifar10", [0], root=packs)
    model = rc.build_model("lenet_c10", 3, 10)
    result = attack(model, images[0], labels[0], dtype=torch.float32, first_layer="weights")
    assert not result.exact
    assert result.layers[0].cond > 1e4 and result.layers[0].rank < result.layers[0].unknowns


def test_rank_deficient_layer_is_reported(samples):
    """A dead filter in a 3-filter ReLU layer leaves its gradient constraints rank-deficient."""
    model = rc.build_model("lenet_c10", 3, 10)
    with torch.no_grad():
        model[6].bias[1] = -1e3  # filter 2 of conv 4 never fires
    image, label = samples[0][0], samples[1][0]
    result = attack(model, image, label)
    last = result.layers[-1]
    assert last.rank < last.unknowns and not last.full_rank
    assert not result.exact


def test_too_few_filters_for_gradients_alone(samples):
    model = rc.build_model("lenet", 3, 10)
    result = attack(model, samples[0][0], first_layer="gradients")
    assert result.layers[0].rank <= 12 * 25 * 3 < result.layers[0].unknowns
    assert not result.exact


def test_report_and_features(samples):
    model = rc.build_model("lenet", 3, 10)
    image = samples[0][3]
    result = attack(model, image, label=4)
    table = result.report()
    assert list(table["layer"]) == [4, 3, 2, 1]
    assert {"method", "equations", "unknowns", "rank", "cond", "residual", "full_rank"} <= set(table.columns)
    assert result.features.shape == (model[-1].in_features,)
    assert [tuple(x.shape) for x in result.inputs] == [(3, 32, 32), (12, 16, 16), (16, 8, 8), (12, 8, 8)]
    assert result.image.dtype == torch.float64 and result.image.shape == (1, 3, 32, 32)
    assert result.seconds > 0


@pytest.mark.slow
def test_reconstruct_batch_shares_the_cache_and_agrees(samples):
    model = rc.build_model("lenet_c10", 3, 10)
    images, labels = samples
    grads = [rc.client_gradients(model, image, label, dtype=torch.float64) for image, label in zip(images, labels)]
    batch = rc.reconstruct_batch(model, grads, (3, 32, 32), first_layer="weights")
    for image, result, g in zip(images, batch, grads):
        single = rc.reconstruct(model, g, (3, 32, 32), first_layer="weights")
        assert max_error(result, image) <= EXACT
        torch.testing.assert_close(result.image, single.image, rtol=0, atol=1e-10)


def test_cache_follows_weight_changes(samples):
    """A cache keyed on the weights must not serve a factorisation of old weights."""
    model = rc.build_model("lenet_c10", 3, 10)
    image, label = samples[0][1], samples[1][1]
    cache = {}
    assert attack(model, image, label, first_layer="weights", cache=cache).exact
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    result = attack(model, image, label, first_layer="weights", cache=cache)
    assert result.exact and max_error(result, image) <= EXACT


def test_dict_gradients_on_the_cpu_and_no_silent_fallback_from_an_absent_gpu(samples, monkeypatch):
    model = rc.build_model("lenet", 3, 10)
    image = samples[0][0]
    grads = rc.client_gradients(model, image, 1, dtype=torch.float64)
    named = {name: g for (name, _), g in zip(model.named_parameters(), grads)}
    result = rc.reconstruct(model, named, (1, 3, 32, 32), device="cpu")
    assert max_error(result, image) <= EXACT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(rc.RConvError, match=r"device='cuda' asks for a GPU, but torch finds none on this machine; "
                                            r"use device='cpu'"):
        rc.reconstruct(model, named, (1, 3, 32, 32), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device(samples):
    model = rc.build_model("lenet", 3, 10)
    image = samples[0][0]
    grads = rc.client_gradients(model, image, 1, dtype=torch.float64)
    result = rc.reconstruct(model, grads, (3, 32, 32), device="cuda")
    assert max_error(result, image) <= EXACT


@pytest.mark.parametrize("first_layer", ["hybrid", "weights", "gradients"])
def test_a_first_layer_with_every_relu_off_is_reported_not_nan(first_layer):
    # Every first-layer unit is dead: its outputs and gradients are zero, so nothing constrains the image.
    model = uniform_init(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                                       nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(6 * 8 * 8, 3)), seed=3)
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    result = attack(model, image, label=1, first_layer=first_layer)
    assert torch.isfinite(result.image).all()
    assert result.layers[0].rank == 0 and not result.exact
    assert max_error(result, torch.zeros_like(image)) == 0.0  # the minimum-norm answer to no equations


# ---------------------------------------------------------------------------------------------------------
# reconstruct's arguments

def test_reconstruct_refuses_missing_gradients(lenet_c10):
    for grads in (None, torch.zeros(3), 5):
        with pytest.raises(rc.RConvError, match="grads must be a list of gradient tensors"):
            rc.reconstruct(lenet_c10, grads, (3, 32, 32))


@pytest.mark.parametrize("shape", ["332", (3, 32.0, 32), (3, "32", 32), (True, 32, 32), None])
def test_reconstruct_refuses_input_shapes_that_are_not_whole_numbers(lenet_c10, lenet_c10_grads, shape):
    with pytest.raises(rc.RConvError, match="input_shape must be"):
        rc.reconstruct(lenet_c10, lenet_c10_grads, shape)


@pytest.mark.parametrize("relu_tol", [math.nan, math.inf, -1e-3, "0.1"])
def test_reconstruct_refuses_relu_tol_that_is_no_floor(lenet_c10, lenet_c10_grads, relu_tol):
    with pytest.raises(rc.RConvError, match="relu_tol must be a finite number >= 0"):
        rc.reconstruct(lenet_c10, lenet_c10_grads, (3, 32, 32), relu_tol=relu_tol)


@pytest.mark.parametrize("image_range", [(1, 0), (0.5, 0.5), (0, math.nan), (0,), "01", None, (0, "1")])
def test_reconstruct_validates_image_range(lenet_c10, lenet_c10_grads, image_range):
    with pytest.raises(rc.RConvError, match="image_range must be two numbers"):
        rc.reconstruct(lenet_c10, lenet_c10_grads, (3, 32, 32), project=True, image_range=image_range)


def test_cuda_without_a_gpu_is_one_sentence(lenet_c10, lenet_c10_grads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, whatever this one has
    with pytest.raises(rc.RConvError) as error:
        rc.reconstruct(lenet_c10, lenet_c10_grads, (3, 32, 32), device="cuda")
    message = str(error.value)
    assert "GPU" in message and "device='cpu'" in message and "\n" not in message
    with pytest.raises(rc.RConvError, match="unknown device 'gpu'"):
        rc.reconstruct(lenet_c10, lenet_c10_grads, (3, 32, 32), device="gpu")


def test_batch_gradients(lenet):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model = copy.deepcopy(lenet).double()  # the shared fixture keeps its float32 weights
    loss = nn.functional.cross_entropy(model(images.double()), torch.tensor([1, 7]))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with pytest.raises(rc.RConvError, match="batch of more than one image"):
        rc.reconstruct(model, grads, (3, 32, 32), batch_size=1)
    with pytest.raises(rc.RConvError, match="a single label for a batch of 2 images"):
        rc.client_gradients(model, images, 1)


def test_zero_bias_gradient_is_not_a_linalg_error(lenet):
    grads = [torch.zeros_like(p) for p in lenet.parameters()]
    with pytest.raises(rc.RConvError, match="bias gradient is zero"):
        rc.reconstruct(lenet, grads, (3, 32, 32))


def test_an_unknown_first_layer_method_is_named(lenet, lenet_grads):
    with pytest.raises(rc.RConvError, match="first_layer must be one of weights, gradients, hybrid; got 'paper'"):
        rc.reconstruct(lenet, lenet_grads, (3, 32, 32), first_layer="paper")

# ---------------------------------------------------------------------------------------------------------
# project

def test_project_never_claims_exact_for_a_clipped_image(lenet_c10, lenet_c10_cache):
    normalised = (torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) - 0.5) * 4  # outside [0, 1]
    grads = rc.client_gradients(lenet_c10, normalised, 1, dtype=torch.float64)
    plain = rc.reconstruct(lenet_c10, grads, (3, 32, 32), cache=lenet_c10_cache)
    assert plain.exact and rc.image_metrics(normalised, plain.image)["max_abs_err"] < 1e-9
    clipped = rc.reconstruct(lenet_c10, grads, (3, 32, 32), project=True, cache=lenet_c10_cache)
    assert rc.image_metrics(normalised, clipped.image)["max_abs_err"] > 1.0
    assert not clipped.exact
    assert "conv layer 1" in clipped.reasons[0] and "clipped" in clipped.reasons[0]
    assert clipped.layers[0].clipped > 0.1


def test_project_keeps_the_verdict_for_an_image_in_range(lenet_c10, cifar_image, lenet_c10_cache):
    """Clipping the rounding noise of an image inside image_range costs no exact claim."""
    for dtype in (torch.float64, torch.float32):
        grads = rc.client_gradients(lenet_c10, cifar_image, 1, dtype=dtype)
        plain = rc.reconstruct(lenet_c10, grads, (3, 32, 32), cache=lenet_c10_cache)
        projected = rc.reconstruct(lenet_c10, grads, (3, 32, 32), project=True, cache=lenet_c10_cache)
        assert projected.exact == plain.exact, projected.reasons
    assert projected.layers[0].clipped < 1e-3


@pytest.mark.parametrize("head", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("dtype, within", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["float64", "float32"])
def test_a_network_without_conv_layers_gives_the_image_back_certified(head, dtype, within):
    """The first Linear layer's input is the image itself: exact from its own gradients, with a finite bound."""
    torch.manual_seed(3)
    image = torch.rand(3, 8, 8)
    layers = [nn.Flatten(), nn.Linear(3 * 8 * 8, 32 if head else 10)]
    layers += [nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)] if head else []
    model = nn.Sequential(*layers).eval()
    result = rc.reconstruct(model, rc.client_gradients(model, image, 4, dtype=dtype), (3, 8, 8))
    error = max_error(result, image)
    assert result.exact and result.layers == [] and error <= within
    assert error <= result.error_bound <= 1e3 * within


def test_a_batch_through_a_linear_layer_alone_comes_back_exact_with_its_labels():
    torch.manual_seed(4)
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([1, 4, 7])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    result = rc.reconstruct(model, rc.client_gradients(model, images, labels, dtype=torch.float64), (3, 8, 8))
    table = rc.match_batch(images, labels, result).table
    assert result.exact and bool(table.image_exact.all()) and float(table.max_abs_err.max()) <= 1e-10
