"""rconv.attack.refined: a layer's gradient-constraint solve refined by its weight constraints within the gradients'
weakest directions."""
import torch

import rconv_core as rc
from rconv.attack.equations import GradientSystem, LayerEquations, weight_system
from rconv.attack.refined import WEAK_DIRECTIONS, refinement
from rconv.linalg.solvers import Eigen

from conftest import attack, max_error


def _layer_error(result, truth, number):
    return float((result.inputs[number - 1] - truth[number - 1].double().reshape(result.inputs[number - 1].shape))
                 .abs().max())


def test_float32_hidden_layers_come_back_closer_refined_than_from_gradients_alone(samples):
    # a plain 32-px net (not a preset) whose second layer is solved from its gradient constraints
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 5, 2, 2), torch.nn.LeakyReLU(0.2),
                                torch.nn.Conv2d(12, 16, 5, 2, 2), torch.nn.LeakyReLU(0.2),
                                torch.nn.Conv2d(16, 12, 3, 1, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(12 * 8 * 8, 10))
    image = samples[0][2]
    truth, _ = rc.layer_inputs(model, image)
    refined = attack(model, image, label=4, dtype=torch.float32)
    alone = attack(model, image, label=4, dtype=torch.float32, methods={2: "gradients", 3: "gradients"})
    assert [layer.method for layer in refined.layers][-2:] == ["gradients", "gradients"]
    assert refined.exact and max_error(refined, image) <= refined.error_bound
    for number in (2, 3):
        assert _layer_error(refined, truth, number) < _layer_error(alone, truth, number)
        assert _layer_error(refined, truth, number) <= refined.layers[number - 1].error_bound
    assert max_error(refined, image) < max_error(alone, image)


def _layer_two(model, image, label):
    """LayerEquations of the lenet preset's second layer from exact float64 data, and its true input."""
    truth, _ = rc.layer_inputs(model, image)
    outputs = rc.output_gradients(model, image, label)
    conv, grads = model[2], rc.client_gradients(model, image, label, dtype=torch.float64)
    x = truth[1].double().reshape(conv.in_channels, *truth[1].shape[-2:])
    output = torch.nn.functional.conv2d(x[None], conv.weight.double(), stride=conv.stride, padding=conv.padding)[0]
    known = torch.ones(output.numel(), dtype=torch.bool)
    equations = LayerEquations(
        GradientSystem(outputs[1].double().reshape(output.shape), grads[2].double(), x.shape[1:], conv.kernel_size,
                       conv.stride, conv.padding),
        weight_system(conv.weight.double(), None, conv.stride, conv.padding, x.shape, None), known,
        output.reshape(-1))
    return equations, x


def test_a_refinement_keeps_exact_data_exact_and_needs_a_known_output(cifar_image):
    model = rc.build_model("lenet", 3, 10)
    equations, x = _layer_two(model, cifar_image, 3)
    matrix = equations.gradients.matrix
    values, vectors = torch.linalg.eigh(matrix.T @ matrix)
    derivative = torch.ones(equations.weights.output_shape, dtype=torch.float64)  # no activation: a = O
    activated = equations.output.reshape(equations.weights.output_shape)
    found = refinement(equations, Eigen(values, vectors), activated, derivative)
    assert found.basis.shape[1] == WEAK_DIRECTIONS
    channels, pixels = equations.channels, equations.pixels
    # started off the truth along the weakest directions, it comes back to it
    start = x.reshape(channels, pixels, 1) + 1e-3 * vectors[:, :1].T.reshape(1, pixels, 1)
    corrected = found.correct(equations, start, equations.gradients.rhs[:, :, None], equations.output[:, None])
    assert float((corrected[:, :, 0] - x.reshape(channels, pixels)).abs().max()) < 1e-9
    unknown = equations._replace(known=torch.zeros_like(equations.known), output=equations.output[:0])
    assert refinement(unknown, Eigen(values, vectors), activated, derivative) is None
