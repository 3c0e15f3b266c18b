"""rconv.attack.activations: an activation's derivative and pre-activation read off its output, against torch's
autograd, and ReLU's branches settled by the bias gradient."""
import pytest
import torch

from rconv.attack.activations import Noise, activation_grad, branches, preactivation
from rconv.attack.network import ConvStep
from rconv.attack.tolerances import Tolerances

SLOPE = 0.2
FUNCTIONS = {"relu": torch.relu, "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, SLOPE),
             "sigmoid": torch.sigmoid, "tanh": torch.tanh, "identity": lambda z: z}
FLOAT64 = Tolerances.for_dtype(torch.float64)


def step(activation):
    return ConvStep(1, "model[0]", conv=None, activation=activation, slope=SLOPE if activation == "leaky_relu" else 0.0)


def preactivations(seed=0, shape=(3, 5, 5)):
    """Pre-activations of both signs, none within 1e-3 of zero (where ReLU's derivative jumps)."""
    z = 3 * torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.where(z.abs() < 1e-3, torch.full_like(z, 0.5), z)


@pytest.mark.parametrize("activation", FUNCTIONS)
def test_the_derivative_read_off_the_output_is_autograd_s(activation):
    z = preactivations().requires_grad_()
    output = FUNCTIONS[activation](z)
    expected, = torch.autograd.grad(output.sum(), z)
    got = activation_grad(activation, SLOPE, output.detach(), relu_threshold=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_relu_s_threshold_counts_small_outputs_as_off():
    activated = torch.tensor([0.0, 1e-9, 1e-3, 2.0], dtype=torch.float64)
    assert activation_grad("relu", 0.0, activated, relu_threshold=1e-6).tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "tanh", "identity"])
def test_an_invertible_activation_gives_back_its_preactivation(activation):
    z = preactivations(1).clamp(-8, 8)  # sigmoid and tanh well away from saturation in float64
    output = FUNCTIONS[activation](z)
    derivative = activation_grad(activation, SLOPE, output, relu_threshold=0.0)
    recovered, known = preactivation(step(activation), output, derivative, FLOAT64.saturation)
    assert bool(known.all())
    torch.testing.assert_close(recovered, z, rtol=1e-9, atol=1e-12)


def test_relu_reveals_only_its_active_preactivations():
    z = preactivations(2)
    output = torch.relu(z)
    recovered, known = preactivation(step("relu"), output, activation_grad("relu", 0.0, output, 0.0), 1e-12)
    assert torch.equal(known, z > 0)
    assert torch.equal(recovered[known], z[known])


@pytest.mark.parametrize("activation,saturated", [("sigmoid", [1e-20, 1 - 1e-17]), ("tanh", [-1 + 1e-17, 1.0])])
def test_saturated_outputs_hide_their_preactivation(activation, saturated):
    output = torch.tensor(saturated + [0.3], dtype=torch.float64)
    _, known = preactivation(step(activation), output, torch.ones_like(output), FLOAT64.saturation)
    assert known.tolist() == [False, False, True]


def relu_layer_with_a_noisy_dead_unit():
    """A ReLU layer's recovered output where one dead unit (pre-activation < 0) reads 1e-12 from rounding."""
    generator = torch.Generator().manual_seed(3)
    z = preactivations(3, (2, 4, 4))
    activated = torch.relu(z)
    dead = tuple(int(i) for i in torch.nonzero(z[0] < 0)[0])
    activated[(0, *dead)] = 1e-12
    activated_grad = torch.randn(z.shape, dtype=torch.float64, generator=generator)
    truth = (z > 0).to(torch.float64)
    bias_grad = (activated_grad * truth).sum((1, 2))  # dL/db[f] = sum of dL/dO[f] over the active units
    return activated, activated_grad, bias_grad, truth


def test_the_bias_gradient_settles_a_unit_rounding_put_on_the_wrong_side():
    activated, activated_grad, bias_grad, truth = relu_layer_with_a_noisy_dead_unit()
    noise = Noise(gain=1e4, negative=0.0)  # the solve above may have moved outputs by 1e4 eps
    unaided = branches(step("relu"), activated, activated_grad, None, FLOAT64, noise, "relative")
    assert int((unaided.derivative != truth).sum()) == 1, "the 1e-12 output alone reads as active"
    settled = branches(step("relu"), activated, activated_grad, bias_grad, FLOAT64, noise, "relative")
    assert torch.equal(settled.derivative, truth) and settled.band >= 1e-12


def test_the_bias_gradient_settles_the_unit_at_the_threshold_not_the_dead_units_in_their_noise():
    """float32: the dead units of a filter read +-1e-7 (rounding), and one live unit just below the ReLU test's
    threshold reads as off. Among the units nearest zero (all dead) some combination of flips would fit the
    filter's one bias misfit; the unit nearest the threshold, flipped alone, explains it."""
    float32 = Tolerances.for_dtype(torch.float32)
    generator = torch.Generator().manual_seed(5)
    z = preactivations(5, (1, 8, 8))
    activated = torch.relu(z)
    dead = z <= 0
    activated[dead] = 1e-7 * (2 * torch.rand(int(dead.sum()), dtype=torch.float64, generator=generator) - 1)
    live = tuple(int(i) for i in torch.nonzero(~dead)[0])
    threshold = float(float32.relu) * float(activated.abs().max())
    activated[live] = z[live] = 0.9 * threshold  # live, but under the test's threshold
    activated_grad = torch.randn(z.shape, dtype=torch.float64, generator=generator)
    truth = (z > 0).to(torch.float64)
    bias_grad = (activated_grad * truth).sum((1, 2))
    noise = Noise(gain=100.0, negative=1e-7)
    assert int(dead.sum()) > 10  # more dead units near zero than the repair tries
    unaided = branches(step("relu"), activated, activated_grad, None, float32, noise, "relative")
    assert int((unaided.derivative != truth).sum()) == 1 and unaided.derivative[live] == 0
    settled = branches(step("relu"), activated, activated_grad, bias_grad, float32, noise, "relative")
    assert torch.equal(settled.derivative, truth)


def test_the_published_test_rounds_to_seven_decimals():
    activated = torch.tensor([[[4e-8, 6e-8, -1e-3, 0.5]]], dtype=torch.float64)
    read = branches(step("relu"), activated, torch.ones_like(activated), None, FLOAT64, Noise(1.0, 0.0), "absolute")
    assert read.derivative.flatten().tolist() == [0.0, 1.0, 0.0, 1.0] and read.band == 0.0


def test_among_single_flips_that_fit_the_bias_gradient_the_best_fitting_one_is_taken():
    """float32 gradients shared as such: dead units read exactly 0, and a live unit far below the ReLU test's
    threshold reads as off. Its bias misfit is small enough that flipping a dead unit on would also fit within
    the tolerance; the flip that explains the misfit best (the live unit's, to rounding) is the one taken."""
    float32 = Tolerances.for_dtype(torch.float32)
    z = preactivations(7, (1, 8, 8))
    activated = torch.relu(z)
    live = tuple(int(i) for i in torch.nonzero(z > 0)[0])
    threshold = float(float32.relu) * float(activated.abs().max())
    activated[live] = z[live] = 0.01 * threshold
    truth = (z > 0).to(torch.float64)
    activated_grad = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    activated_grad[live] = 1.0
    bias_grad = (activated_grad * truth).sum((1, 2))
    tolerance = float(float32.residual) * float(bias_grad.abs().max())
    dead = z <= 0
    signs = torch.where(torch.arange(int(dead.sum())) % 2 == 0, 1.0, -1.0).to(torch.float64)
    activated_grad[dead] = 1.0 + 0.5 * tolerance * signs  # each dead unit's flip fits within the tolerance too
    noise = Noise(gain=100.0, negative=0.0)
    settled = branches(step("relu"), activated, activated_grad, bias_grad, float32, noise, "relative")
    assert torch.equal(settled.derivative, truth)
