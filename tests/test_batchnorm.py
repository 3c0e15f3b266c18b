"""Train-mode BatchNorm2d after a conv layer (rconv.attack.train_norm): one image recovered through it, with its own
mean and deviation, first layer or not, with or without a conv bias; a batch through it refused, the batch's
statistics coupling its images; what it cannot invert refused by an RConvError naming the layer."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rconv_core as rc
from rconv.attack.network import parse_network
from rconv.attack.steps import TRAIN_NORM_METHOD

SHAPE = (3, 16, 16)
FILTERS, CLASSES, LABEL = 16, 10, 3
EXACT = 1e-6  # float64 gradients: the image to this max abs error, as `exact` promises
FLOAT32_PSNR = 60.0  # float32 gradients: the image at least this many dB (pixels in [0, 1])
# The certificate: the recovered sigma^2 is var + eps of the recovered conv output, the mean its mean, and
# BatchNorm's own gradients fit dL/dy and xhat, to the gradients' rounding amplified by the solve (float32:
# 1.4e-6 measured on the 5x5 first layer, within the 3.5e-4 the attack itself allows).
CERTIFICATE = {torch.float64: 1e-9, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def one_thread():
    """Dense SVDs on a machine shared with other jobs: one torch thread runs them several times faster than two
    competing for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_of(kernel=3, bias=True, second_norm=False, first_norm=True, seed=0):
    """conv(3->16) + [BatchNorm2d] + LeakyReLU + conv(16->16) + ReLU (or BatchNorm2d + LeakyReLU) + Linear, in
    train mode. A BatchNorm on the first layer needs padding on every border (see
    test_a_constant_shift_is_invisible_without_padding); with a second one, a stride-2 first layer of padding 2
    keeps the second layer's input to 16 x 9 x 9, small enough to be solved densely in a few seconds."""
    torch.manual_seed(seed)
    stride, padding = (2, 2) if second_norm else (1, kernel // 2)
    side = (SHAPE[1] + 2 * padding - kernel) // stride + 1
    layers = [nn.Conv2d(3, FILTERS, kernel, stride=stride, padding=padding, bias=bias)]
    layers += [nn.BatchNorm2d(FILTERS)] if first_norm else []
    layers += [nn.LeakyReLU(0.2), nn.Conv2d(FILTERS, FILTERS, 3, padding=1, bias=bias)]
    layers += [nn.BatchNorm2d(FILTERS), nn.LeakyReLU(0.2)] if second_norm else [nn.ReLU()]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(FILTERS * side * side, CLASSES))
    with torch.no_grad():  # affine parameters far from the identity
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.train()


def image(batch=1, seed=1):
    return torch.rand(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def client_gradients(model, images, dtype):
    """The cross-entropy gradients of `images` (train mode: BatchNorm normalises by their own statistics)."""
    model = model.to(dtype)
    labels = torch.arange(LABEL, LABEL + len(images)) % CLASSES
    loss = F.cross_entropy(model(images.to(dtype)), labels)
    grads = [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]
    return model.double(), grads


def attack(model, dtype, **options):
    truth = image()
    model, grads = client_gradients(model, truth, dtype)
    return rc.reconstruct(model, grads, SHAPE, **options), truth


def psnr(result, truth):
    return 10 * math.log10(1.0 / float(((result.image[0] - truth[0]) ** 2).mean()))


def assert_recovered(result, truth, dtype):
    """float64 gradients: the image exact and claimed so; float32: at least FLOAT32_PSNR."""
    if dtype == torch.float64:
        assert float((result.image[0] - truth[0]).abs().max()) <= EXACT and result.exact, result.reasons
    else:
        assert psnr(result, truth) >= FLOAT32_PSNR


def check_norm_layers(result, layers, dtype=torch.float64):
    for number in layers:
        report = result.layers[number - 1]
        assert report.method == TRAIN_NORM_METHOD and report.full_rank
        assert report.bias_residual < CERTIFICATE[dtype]  # dL/dgamma, dL/dbeta and sigma^2 = var + eps


@pytest.mark.slow
def test_first_layer_float64_is_exact():
    result, truth = attack(model_of(), torch.float64)
    assert float((result.image[0] - truth[0]).abs().max()) <= EXACT
    assert result.exact and result.error_bound <= EXACT, result.reasons
    check_norm_layers(result, [1])
    assert any("scale set by eps" in note for note in result.notes)
    assert any("conv bias cancels" in note for note in result.notes)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [3, 5])
def test_first_layer_float32(kernel):
    result, truth = attack(model_of(kernel), torch.float32)
    assert psnr(result, truth) >= FLOAT32_PSNR
    if result.exact:
        check_norm_layers(result, [1], torch.float32)
    # exact or not, the bound never claims less than the error
    assert float((result.image[0] - truth[0]).abs().max()) <= result.error_bound


@pytest.mark.slow
def test_first_layer_float64_kernel_5():
    result, truth = attack(model_of(5), torch.float64)
    assert float((result.image[0] - truth[0]).abs().max()) <= EXACT and result.exact, result.reasons


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_conv_without_bias(dtype):
    """No bias changes nothing: a conv bias cancels in BatchNorm, so the scale comes from eps either way."""
    result, truth = attack(model_of(bias=False), dtype)
    assert_recovered(result, truth, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batchnorm_on_the_second_layer_too(dtype):
    """The second layer's input is the first's LeakyReLU output; the first is reached through dL/dX."""
    result, truth = attack(model_of(second_norm=True), dtype)
    assert_recovered(result, truth, dtype)
    if dtype == torch.float64:
        check_norm_layers(result, [1, 2])


@pytest.mark.slow
def test_two_layers_with_beta_zero_in_float32_are_not_claimed():
    """With beta = 0 nothing recentres the data the second layer hands down, whose scale eps set to a few digits
    only in float32: the image is off (24 dB here), and the result says so."""
    model = model_of(second_norm=True)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.BatchNorm2d):
                module.bias.zero_()
    result, truth = attack(model, torch.float32)
    assert not result.exact and result.reasons
    assert float((result.image[0] - truth[0]).abs().max()) <= result.error_bound


@pytest.mark.slow
def test_batchnorm_on_the_second_layer_only():
    result, truth = attack(model_of(second_norm=True, first_norm=False), torch.float64)
    assert float((result.image[0] - truth[0]).abs().max()) <= EXACT and result.exact, result.reasons
    assert result.layers[0].method != TRAIN_NORM_METHOD
    check_norm_layers(result, [2])


def test_a_batch_is_refused():
    model, grads = client_gradients(model_of(), image(batch=2), torch.float64)
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): its train-mode BatchNorm normalises by "
                                            r"the batch's statistics, which couple the images"):
        rc.reconstruct(model, grads, SHAPE)
    with pytest.raises(rc.RConvError, match=r"couple the images"):
        rc.reconstruct(model, grads, SHAPE, batch_size=2)


@pytest.mark.slow
def test_a_batch_read_as_one_image_is_not_exact():
    model, grads = client_gradients(model_of(), image(batch=2), torch.float64)
    result = rc.reconstruct(model, grads, SHAPE, batch_size=1, check_batch=False)
    assert not result.exact and result.reasons


def test_a_constant_shift_is_invisible_without_padding():
    """BatchNorm removes each filter's mean, and an unpadded conv maps a constant per input channel to a constant
    per filter: the shift is lost, one dimension per input channel, and the result says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, FILTERS, 3), nn.BatchNorm2d(FILTERS), nn.LeakyReLU(0.2), nn.Flatten(),
                          nn.Linear(FILTERS * 14 * 14, CLASSES)).train()
    result, _ = attack(model, torch.float64)
    assert not result.exact
    assert result.layers[0].rank == result.layers[0].unknowns - SHAPE[0]
    assert any("undetermined" in reason for reason in result.reasons)
    assert any(f"{SHAPE[0]} directions of its input" in note for note in result.notes)
    # counting says so before any gradient: it once called this layer determined by its gradients
    report = rc.constraint_report(model, SHAPE)
    assert not report.attrs["recoverable"]
    assert report.determined_by[0].startswith("none: its train-mode BatchNorm cannot see a constant")
    assert f"({SHAPE[0]} directions)" in report.attrs["verdict"]
    padded = nn.Sequential(nn.Conv2d(3, FILTERS, 3, padding=1), nn.BatchNorm2d(FILTERS), nn.LeakyReLU(0.2),
                           nn.Flatten(), nn.Linear(FILTERS * 16 * 16, CLASSES)).train()
    assert rc.constraint_report(padded, SHAPE).attrs["recoverable"]


def test_pixels_no_kernel_position_reaches_are_undetermined_and_left_finite():
    """A stride-2 unpadded conv never reads the last row and column: their empty columns are more null directions
    beside the scale, and the solve keeps to the others (the SVD once returned one of them, and infinite pixels)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, FILTERS, 3, stride=2), nn.BatchNorm2d(FILTERS), nn.LeakyReLU(0.2),
                          nn.Flatten(), nn.Linear(FILTERS * 7 * 7, CLASSES)).train()
    result, truth = attack(model, torch.float64)
    assert not result.exact and any("undetermined" in reason for reason in result.reasons)
    assert bool(torch.isfinite(result.image).all())
    assert float(result.image[0, :, -1, :].abs().max()) == float(result.image[0, :, :, -1].abs().max()) == 0.0


def test_what_it_cannot_invert_is_refused():
    hidden = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 16 * 16, CLASSES)).train()
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): its relu hides \d+ of its train-mode "
                                            r"BatchNorm's outputs"):
        attack(hidden, torch.float64)
    erased = model_of()
    with torch.no_grad():
        erased[1].weight[2] = 0.0
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): its train-mode BatchNorm has gamma = 0 "
                                            r"\(or non-finite\) at filter\(s\) \[2\]"):
        parse_network(erased)


def test_parsed_beside_its_conv_layer():
    network = parse_network(model_of(second_norm=True))
    first, second = network.steps
    assert first.norm is not None and second.norm is not None and first.folded is None
    assert first.conv is first.module and first.output_module is first.norm.module
    assert first.norm.eps == pytest.approx(1e-5)
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                              nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 16 * 16, 3)).eval()
    assert parse_network(untracked).steps[0].norm is not None  # batch statistics in eval mode too


def test_eval_mode_is_still_folded():
    model = model_of().eval()
    step = parse_network(model).steps[0]
    assert step.norm is None and step.folded is not None
