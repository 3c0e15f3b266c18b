"""rconv.attack.tangents: the attack's chain, linearised, against the attack itself run on slightly different
gradients (finite differences); and rconv.attack.bounds' pieces of the linearised bound (noise directions,
source levels)."""
import pytest
import torch

import rconv_core as rc
from rconv.attack.bounds import LINEARISED_PROBES, SourceLevels, noise_directions
from rconv.attack.network import Gradients, check_gradients, check_input_shape, parse_network
from rconv.attack.reconstruct import _options, _single_image
from rconv.attack.tangents import propagate

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
# The finite difference's step, relative to the gradients: far above float64 rounding, small enough
# for second-order terms (and no ReLU unit changes branch).
_STEP = 1e-7
# The bound needs its tangents to a few per cent. They agree to 1e-4 or better, but for the hybrid first layer
# behind tanh (1.2 %): its two deflation steps only approach the least-squares solution, whose derivative the
# tangent takes.
_AGREEMENT = 3e-2


class _UnitLevels:
    """Every source at level 1 and no rescaling, and no rounding on a refined layer's outputs, which are not
    gradients: the tangents are the chain's Jacobian applied to the sum of all the directions."""

    output_rounding = 0.0

    def own(self, energies, measured, above=None):
        return 1.0

    def assumed(self):
        return 1.0

    def explain(self, energies, measured):
        return 1.0


def _setting(model, image, label, first_layer):
    network = parse_network(model)
    grads = check_gradients(model, network, rc.client_gradients(model, image, label, dtype=torch.float64))
    sizes = check_input_shape(network, tuple(image.shape))
    options = _options(network, grads, dict(first_layer=first_layer, methods={}, relu_test="relative",
                                            relu_tol=None, project=False, image_range=(0.0, 1.0), device=None,
                                            memory_limit=None))
    return network, grads, sizes, options


@pytest.mark.parametrize("preset, activations, first_layer", [
    ("lenet_c10", None, "hybrid"),  # LeakyReLU and ReLU; the deflated hybrid first layer
    pytest.param("lenet_c10", None, "weights", marks=pytest.mark.slow),  # the paper's first layer: a sparse LU
    pytest.param("dlg_net", None, "hybrid", marks=pytest.mark.slow),  # sigmoid: the derivative moves with the output
    pytest.param("lenet_c10", ("tanh", "leaky_relu", "tanh", "relu"), "hybrid", marks=pytest.mark.slow),
])
def test_tangents_are_the_attack_s_derivative(preset, activations, first_layer, cifar_image):
    overrides = {} if activations is None else dict(activations=activations)
    model = rc.build_model(preset, 3, 10, **overrides)
    network, grads, sizes, options = _setting(model, cifar_image, 3, first_layer)
    chain = _single_image(network, grads, sizes, options, {}, check_batch=True)
    assert all(result.report.full_rank for result in chain.results)
    parameters = [network.linear.weight, network.linear.bias] + [step.conv.weight for step in network.steps]
    directions = noise_directions(parameters, grads)
    layers = propagate(network, grads, chain.top.features, [r.linearisation for r in chain.results], directions,
                       _UnitLevels())
    for probe in range(LINEARISED_PROBES):
        moved = [grads.of(p).double() + _STEP * directions(p)[..., probe] if directions(p) is not None
                 else grads.of(p).double() for p in grads.parameters]
        rerun = _single_image(network, Gradients(grads.parameters, moved), sizes, options, {}, check_batch=False)
        for number, (result, again, layer) in enumerate(zip(chain.results, rerun.results, layers), start=1):
            difference = (again.input - result.input).reshape(-1) / _STEP
            predicted = layer.moves[:, probe]
            gap = float(torch.linalg.norm(difference - predicted) / torch.linalg.norm(predicted))
            assert gap < _AGREEMENT, f"conv layer {number}, probe {probe}: tangent off the finite difference by {gap:.2g}"


def test_noise_directions_have_the_gradients_norm_and_are_reproducible():
    parameters = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
    grads = Gradients(parameters, [torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                   torch.arange(1.0, 6.0)])
    cache = {}
    first = noise_directions(parameters, grads, probes=3, cache=cache)
    again = noise_directions(parameters, grads, probes=3, cache=cache)
    fresh = noise_directions(parameters, grads, probes=3)
    for parameter in parameters:
        directions = first(parameter)
        assert directions.shape == (*parameter.shape, 3) and directions.dtype == torch.float64
        norms = directions.reshape(-1, 3).norm(dim=0)
        assert torch.allclose(norms, torch.linalg.norm(grads.of(parameter).double()).expand(3))
        assert torch.equal(directions, again(parameter)) and torch.equal(directions, fresh(parameter))
        assert not torch.allclose(directions[..., 0], directions[..., 1])  # independent probes
    assert first(torch.nn.Parameter(torch.zeros(2))) is None


def test_source_levels_put_the_unexplained_residual_down_to_the_source():
    levels = SourceLevels(torch.float32)
    # the directions leave mean energy 4 per unit level; the data 100 (EPS32^2 units): level 5 EPS32
    assert levels.own(torch.tensor([3.0, 5.0]), 100 * EPS32 ** 2) == pytest.approx(5 * EPS32)
    # what the noise above already leaves is not the source's
    assert levels.own(torch.tensor([4.0]), 100 * EPS32 ** 2, above=torch.tensor([64 * EPS32 ** 2])) == \
        pytest.approx(3 * EPS32)
    # never below one eps of the gradients' precision
    assert levels.own(torch.tensor([4.0]), 0.0) == EPS32
    # a source not measured gets the largest level so far
    assert levels.assumed() == pytest.approx(5 * EPS32)
    assert levels.levels == pytest.approx([5 * EPS32, 3 * EPS32, EPS32, 5 * EPS32])


def test_source_levels_rescale_the_noise_to_the_residual_measured():
    levels = SourceLevels(torch.float64)
    assert levels.explain(torch.tensor([1.0, 3.0]), 8.0) == pytest.approx(2.0)  # more residual: more noise
    assert levels.explain(torch.tensor([16.0]), 1.0) == pytest.approx(0.25)  # less: the levels above were high
    assert levels.explain(torch.tensor([0.0]), 1.0) == 1.0  # the noise leaves none: nothing to compare
    coarse = SourceLevels(torch.float32)  # the forward pass's rounding hides from residuals: never lowered
    assert coarse.explain(torch.tensor([1.0, 3.0]), 8.0) == pytest.approx(2.0)
    assert coarse.explain(torch.tensor([16.0]), 1.0) == 1.0


def test_a_residual_at_float64_rounding_never_scales_the_noise_up():
    """A layer whose equations absorb the noise leaves only rounding, far above the probes' residuals: it
    explains noise up to float64's rounding level, no more (it once scaled float64's noise by 1e14, float32's
    by 1e5); less residual still lowers float64's levels."""
    rounding = (1e-15) ** 2  # relative residual energy at float64 rounding
    probed = torch.tensor([1e-59], dtype=torch.float64)
    assert SourceLevels(torch.float64).explain(probed, rounding) == pytest.approx(1e3)  # from 1 eps to 1e3 eps
    assert SourceLevels(torch.float32).explain(probed, rounding) == 1.0  # float32's noise is above that already
    assert SourceLevels(torch.float64).explain(probed * 1e39, rounding) == pytest.approx(1e-5)
    assert SourceLevels(torch.float32).explain(probed * 1e39, 1e-16) == pytest.approx(1e2)


def test_source_levels_keep_a_weight_update_s_rounding_as_a_floor():
    levels = SourceLevels(torch.float32, floors=[0.0, 1e-3])
    assert levels.own(torch.tensor([1.0]), 0.0) == EPS32  # no floor of its own: the precision's
    assert levels.own(torch.tensor([1.0]), 0.0) == 1e-3  # the update's rounding
    assert levels.assumed() == 1e-3
