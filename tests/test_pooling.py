"""invert_pooled_layer: a conv layer's input through its activation and a pooling layer.

Synthetic layers, not the suite's presets: seeded default PyTorch init, a random image in [0, 1],
float64, and the gradients of a Linear layer + cross-entropy on the pooled output by autograd.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rconv.attack.pooling import invert_pooled_layer, pool_spec
from rconv.common.errors import RConvError

EXACT = 1e-6  # the brief's bar for exact recovery: max |X - X_true|
SLOPE = 0.01  # PyTorch's default LeakyReLU slope
CASES = [("leaky_relu", "avg"), ("relu", "avg"), ("relu", "max"), ("leaky_relu", "max")]


def _activate(name, inner):
    return {"relu": torch.relu, "leaky_relu": lambda t: F.leaky_relu(t, SLOPE), "tanh": torch.tanh,
            "sigmoid": torch.sigmoid}[name](inner)


def make_layer(seed, activation, kind, channels=3, size=16, filters=32, kernel=5, classes=10):
    """conv -> activation -> pool(2) -> Linear -> cross-entropy; what the attacker sees, and the truth."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, filters, kernel).double()
    x = torch.rand(channels, size, size, dtype=torch.float64)
    inner = conv(x[None])
    pooled = (F.avg_pool2d if kind == "avg" else F.max_pool2d)(_activate(activation, inner), 2)
    pooled.retain_grad()
    linear = nn.Linear(pooled.numel(), classes).double()
    F.cross_entropy(linear(pooled.flatten(1)), torch.tensor([seed % classes])).backward()
    seen = dict(weight_grad=conv.weight.grad.clone(), bias_grad=conv.bias.grad.clone(),
                pooled=pooled[0].detach(), pooled_grad=pooled.grad[0].clone(), input_size=tuple(x.shape))
    return conv, x, inner[0].detach(), seen


def true_pattern(activation, kind, inner, pooled):
    """The pattern the module documents, computed here from the true pre-activation."""
    low = 0.0 if activation == "relu" else SLOPE
    if kind == "avg":
        return torch.where(inner > 0, torch.ones_like(inner), torch.full_like(inner, low))
    _, flat = F.max_pool2d(inner[None], 2, return_indices=True)
    width = inner.shape[2]
    rows, cols = flat[0] // width, flat[0] % width
    a = torch.arange(pooled.shape[1])[None, :, None]
    b = torch.arange(pooled.shape[2])[None, None, :]
    offset = (rows - 2 * a) * 2 + (cols - 2 * b)
    return torch.where(pooled > 0, offset, -1) if activation == "relu" else offset


@pytest.mark.parametrize("activation,kind", CASES)
def test_the_true_pattern_gives_x_exactly(activation, kind):
    conv, x, inner, seen = make_layer(0, activation, kind)
    start = true_pattern(activation, kind, inner, seen["pooled"])
    result = invert_pooled_layer(conv, activation, (kind, 2), slope=SLOPE, start=start, **seen)
    assert result.exact, result.reason
    # one solve per phase (AvgPool has two): the true pattern is a fixed point of each
    assert result.iterations == (2 if kind == "avg" else 1)
    assert (result.x - x).abs().max() <= EXACT
    assert result.residual <= 1e-9 and torch.equal(result.pattern, start)


@pytest.mark.slow
def test_a_nearby_pattern_is_corrected():
    """AvgPool after LeakyReLU from the pattern of X + noise (~160 of 4,608 units wrong): the
    weight-led phase pulls it to the true pattern (measured: 23 solves)."""
    conv, x, inner, seen = make_layer(0, "leaky_relu", "avg")
    torch.manual_seed(1)
    near = conv((x + 0.05 * torch.randn_like(x))[None])[0].detach()
    start = true_pattern("leaky_relu", "avg", near, seen["pooled"])
    assert (start != true_pattern("leaky_relu", "avg", inner, seen["pooled"])).sum() > 100
    result = invert_pooled_layer(conv, "leaky_relu", ("avg", 2), slope=SLOPE, start=start, **seen)
    assert result.exact, result.reason
    assert (result.x - x).abs().max() <= EXACT


@pytest.mark.slow
@pytest.mark.parametrize("activation,kind", CASES)
def test_the_default_start_never_claims_a_wrong_x(activation, kind):
    """From P alone (no pattern given) the alternation may not converge on a noise image; then it
    must say so. Whatever it claims exact must be exact."""
    conv, x, _, seen = make_layer(1, activation, kind)
    result = invert_pooled_layer(conv, activation, nn.AvgPool2d(2) if kind == "avg" else nn.MaxPool2d(2),
                                 slope=SLOPE, max_iterations=8, **seen)
    if result.exact:
        assert (result.x - x).abs().max() <= EXACT
    else:
        assert result.reason and result.x.shape == x.shape


@pytest.mark.slow
@pytest.mark.parametrize("activation,seed", [("relu", 3), ("leaky_relu", 0)])
def test_maxpool_patterns_are_found_from_a_cold_start(activation, seed):
    """A 64-filter 3x3 layer on 16 channels of 10 px, no pattern given: the gradients' read of the argmaxes finds
    the true one (measured: 13-33 solves on four seeds each), where the outputs' alone never did in 30 s."""
    conv, x, inner, seen = make_layer(seed, activation, "max", channels=16, size=10, filters=64, kernel=3)
    result = invert_pooled_layer(conv, activation, nn.MaxPool2d(2), slope=SLOPE, **seen)
    assert result.exact, result.reason
    assert (result.x - x).abs().max() <= EXACT
    assert torch.equal(result.pattern, true_pattern(activation, "max", inner, seen["pooled"]))


def test_relu_s_zeros_are_read_through_rounding():
    # a P solved by the layer above carries the ReLU's exact zeros as rounding of either sign: read as on, a window
    # would pass a gradient the client's did not
    conv, x, inner, seen = make_layer(0, "relu", "max")
    start = true_pattern("relu", "max", inner, seen["pooled"])
    pooled = seen["pooled"]
    signs = torch.randint(0, 2, pooled.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    seen["pooled"] = torch.where(pooled == 0, 2e-17 * signs, pooled)
    result = invert_pooled_layer(conv, "relu", ("max", 2), start=start, **seen)
    assert result.exact, result.reason
    assert (result.x - x).abs().max() <= EXACT


def test_too_few_filters_are_reported_not_exact():
    conv, x, inner, seen = make_layer(0, "leaky_relu", "avg", filters=2, kernel=3)
    start = true_pattern("leaky_relu", "avg", inner, seen["pooled"])
    result = invert_pooled_layer(conv, "leaky_relu", ("avg", 2), slope=SLOPE, start=start, **seen)
    assert not result.exact
    assert "do not determine X" in result.reason


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_maxpool_after_a_smooth_activation_is_linear_too(activation):
    conv, x, inner, seen = make_layer(0, activation, "max", filters=16)
    start = true_pattern(activation, "max", inner, seen["pooled"])
    result = invert_pooled_layer(conv, activation, ("max", 2), start=start, **seen)
    assert result.exact, result.reason
    assert (result.x - x).abs().max() <= EXACT


def test_avgpool_after_a_smooth_activation_is_refused():
    conv, _, _, seen = make_layer(0, "tanh", "avg", filters=4, kernel=3, size=8)
    with pytest.raises(RConvError, match="not inverted"):
        invert_pooled_layer(conv, "tanh", ("avg", 2), **seen)


def test_pool_spec_reads_modules_and_refuses_the_rest():
    assert pool_spec(nn.MaxPool2d(2)) == ("max", 2)
    assert pool_spec(nn.AvgPool2d(3)) == ("avg", 3)
    assert pool_spec(nn.AdaptiveAvgPool2d(4), (12, 12)) == ("avg", 3)
    with pytest.raises(RConvError):
        pool_spec(nn.AdaptiveAvgPool2d(5), (12, 12))
    with pytest.raises(RConvError):
        pool_spec(nn.MaxPool2d(3, stride=2))
    with pytest.raises(RConvError):
        pool_spec(("median", 2))


def test_shapes_are_checked():
    conv, _, _, seen = make_layer(0, "relu", "max", filters=4, kernel=3, size=8)
    seen["input_size"] = (3, 10, 10)
    with pytest.raises(RConvError, match="gives"):
        invert_pooled_layer(conv, "relu", ("max", 2), **seen)


def test_a_layer_no_pattern_can_determine_is_not_claimed():
    """Two filters for 192 unknowns: every pattern's equations leave directions free (their solves go through the
    ridge). The search stops short with a finite estimate, and measures no spectrum for a layer it did not
    determine."""
    conv, _, _, seen = make_layer(0, "relu", "max", filters=2, kernel=3, size=8)
    result = invert_pooled_layer(conv, "relu", ("max", 2), **seen)
    assert not result.exact and result.reason
    assert bool(torch.isfinite(result.x).all())
    assert result.rank == 0 and result.condition == float("inf")
