"""rconv.attack.steps: the attack's steps one at a time on a real model's gradients. fc_features and linear_step
read the Linear layer's input; conv_step, handed a layer's true output and output gradient, gives back its input
and the gradient reaching the layer below; verdict names what cannot be trusted."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import rconv.attack.steps as steps
import rconv_core as rc
from rconv.attack.activations import Noise
from rconv.attack.network import check_gradients, check_input_shape, parse_network
from rconv.attack.steps import LayerReport, Options, Signal, conv_step, fc_features, linear_step, rank_one, verdict
from rconv.attack.tolerances import Tolerances

LABEL = 3


def options(dtype=torch.float64, **changes):
    settings = dict(first_layer="hybrid", methods={}, relu_test="relative", project=False, image_range=(0.0, 1.0),
                    tolerances=Tolerances.for_dtype(dtype), device=torch.device("cpu"), memory_limit=None)
    return Options(**{**settings, **changes})


class Truth:
    """A float64 copy of a model run on one image: every layer's input and output, with its gradient."""

    def __init__(self, model, image, label):
        self.model = copy.deepcopy(model).double()
        self.network = parse_network(self.model)
        self.sizes = check_input_shape(self.network, image.shape)
        x = image.double()[None].requires_grad_()
        self.values = []  # the input of every module, then the logits
        for module in self.model:
            x.retain_grad()
            self.values.append(x)
            x = module(x)
        loss = F.cross_entropy(x, torch.tensor([label]))
        parameters = list(self.model.parameters())
        grads = torch.autograd.grad(loss, parameters + self.values, allow_unused=True)
        self.grads = check_gradients(self.model, self.network, list(grads[:len(parameters)]))
        self.value_grads = grads[len(parameters):]

    def at(self, module):
        """The input of a module of the model, and dL/d(that input), both without the batch dimension."""
        index = [id(m) for m in self.model].index(id(module))
        return self.values[index].detach()[0], self.value_grads[index][0]

    def signal(self, step):
        """What the layer above hands `step`: its activation's output and the gradient reaching it."""
        above = self.network.steps[step.number] if step.number < len(self.network.steps) else None
        activated, activated_grad = self.at(above.conv if above else self.network.linear)
        shape = self.sizes[step.number]
        return Signal(activated.reshape(shape), activated_grad.reshape(shape), Noise(gain=10.0, negative=0.0))


@pytest.fixture(scope="module")
def truth(lenet_c10, cifar_image):
    return Truth(lenet_c10, cifar_image, LABEL)


def test_fc_features_is_the_linear_layer_s_input(truth):
    linear = truth.network.linear
    features, misfit = fc_features(truth.grads.of(linear.weight), truth.grads.of(linear.bias))
    expected, _ = truth.at(linear)
    assert features.shape == expected.shape == (192,)
    assert float((features - expected).abs().max()) <= 1e-12 * float(expected.abs().max())
    assert misfit <= 1e-14 and rank_one(misfit, torch.float64)


def test_fc_features_refuses_a_zero_bias_gradient():
    with pytest.raises(rc.RConvError, match="the Linear layer's bias gradient is zero"):
        fc_features(torch.ones(10, 4, dtype=torch.float64), torch.zeros(10, dtype=torch.float64))


def test_linear_step_hands_the_last_conv_layer_its_output_and_gradient(truth):
    step = linear_step(truth.network, truth.grads, truth.sizes[-1], options(), check_batch=True)
    expected = truth.signal(truth.network.steps[-1])
    assert step.signal.activated.shape == (3, 8, 8) and step.notes == []
    torch.testing.assert_close(step.signal.activated, expected.activated, rtol=0, atol=1e-12)
    torch.testing.assert_close(step.signal.activated_grad, expected.activated_grad, rtol=0, atol=1e-15)


def test_linear_step_refuses_a_batch_s_gradients_as_one_image_s(truth, lenet_c10):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    grads = check_gradients(truth.model, truth.network, rc.client_gradients(lenet_c10, images, [1, 7],
                                                                            dtype=torch.float64))
    with pytest.raises(rc.RConvError, match="not rank one .* a batch of more than one image"):
        linear_step(truth.network, grads, truth.sizes[-1], options(), check_batch=True)
    step = linear_step(truth.network, grads, truth.sizes[-1], options(), check_batch=False)
    assert step.misfit > 1e-3 and not rank_one(step.misfit, torch.float64)


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_conv_step_recovers_the_layer_s_input_and_the_gradient_below(truth, number):
    step = truth.network.steps[number - 1]
    previous = truth.network.steps[number - 2].activation if number > 1 else None
    result = conv_step(step, truth.signal(step), truth.grads, truth.sizes[number - 1], options(), {}, previous)
    expected, expected_grad = truth.at(step.conv)
    assert result.input.shape == expected.shape == truth.sizes[number - 1]
    assert float((result.input - expected).abs().max()) <= 1e-9 * float(expected.abs().max())
    torch.testing.assert_close(result.signal.activated_grad, expected_grad, rtol=0,
                               atol=1e-12 * float(expected_grad.abs().max()))
    report = result.report
    assert report.layer == number and report.full_rank and report.unknowns == expected.numel()
    assert report.residual <= 1e-10 and report.bias_residual <= 1e-10 and report.clipped == 0.0
    assert verdict([report], options().tolerances) == []


def test_conv_step_of_the_first_layer_from_its_weights_alone(truth, cifar_image):
    step = truth.network.steps[0]
    result = conv_step(step, truth.signal(step), truth.grads, truth.sizes[0], options(first_layer="weights"), {},
                       None)
    assert result.report.method == "weights" and result.report.equations == 12 * 16 * 16
    assert float((result.input - cifar_image.double()).abs().max()) <= 1e-8


def test_conv_step_with_too_few_filters_for_gradients_alone_says_so(truth):
    step = truth.network.steps[0]  # 12 filters; the gradient constraints alone need 64
    result = conv_step(step, truth.signal(step), truth.grads, truth.sizes[0], options(first_layer="gradients"), {},
                       None)
    report = result.report
    assert report.method == "gradients" and report.rank == report.equations == 12 * 25 * 3 < report.unknowns == 3072
    [reason] = verdict([report], options().tolerances)
    assert reason.startswith("conv layer 1 (gradients): rank ") and "part of its input is undetermined" in reason


def test_a_solve_that_stopped_short_does_not_end_the_search_for_a_method(truth, monkeypatch):
    """Its size gives it full rank, but a Krylov solve that stopped short determines nothing: the next method is
    tried, and taken."""
    step = truth.network.steps[1]
    real, methods = steps.solve_layer, []

    def first_stops(equations, method, *args, **kwargs):
        methods.append(method)
        solved = real(equations, method, *args, **kwargs)
        return solved._replace(stopped="conv layer 2: its Krylov solve CG did not converge") if len(methods) == 1 \
            else solved

    monkeypatch.setattr(steps, "solve_layer", first_stops)
    result = conv_step(step, truth.signal(step), truth.grads, truth.sizes[1], options(), {}, step.activation)
    assert methods == ["gradients", "hybrid"]
    assert result.report.method == "gradients+weights" and result.report.stopped == "" and result.report.full_rank


def test_verdict_names_every_failed_check_last_layer_first():
    def report(layer, **changes):
        fields = dict(layer=layer, method="gradients", equations=10, unknowns=10, rank=10, cond=1.0, residual=0.0,
                      bias_residual=0.0, known_outputs=1.0)
        return LayerReport(**{**fields, **changes})

    tolerances = Tolerances.for_dtype(torch.float64)
    reports = [report(1, clipped=0.5), report(2), report(3, residual=1e-3, bias_residual=1e-2, cond=math.inf)]
    reasons = verdict(reports, tolerances)
    assert len(reasons) == 3
    assert reasons[0].startswith("conv layer 3 (gradients): relative residual 0.001 above the tolerance")
    assert "misses the bias gradient by 0.01" in reasons[1]
    assert reasons[2].startswith("conv layer 1 (gradients): project=True clipped")
    assert verdict([report(1, estimated=True, rank=4)], tolerances) == [
        "conv layer 1 (gradients): not determined, only a minimum-norm estimate (rank at most 4 of 10 unknowns)"]
