"""rconv.attack.bounds: the error bound behind `exact` (noise_level, perturbed, keep_rank, probe_bound, bound_reasons),
piece by piece; tests/test_error_bound.py checks the bound reconstruct() reports over defended attacks."""
import math

import pytest
import torch

import rconv_core as rc
from rconv.attack.bounds import (BOUND_MARGIN, ErrorBound, Measured, bound_reasons, keep_rank, noise_level, perturbed,
                                 probe_bound, probe_level, unbounded)
from rconv.attack.network import Gradients
from rconv.attack.tolerances import Tolerances
from conftest import max_error

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def test_noise_level_is_the_largest_finite_misfit():
    assert noise_level([3e-9, 1e-7, math.nan, math.inf], torch.float64) == 1e-7
    assert noise_level([0.2, 1e-3], torch.float32) == 0.2


def test_noise_level_never_falls_below_the_gradients_rounding():
    assert noise_level([], torch.float32) == EPS32  # one eps of the client's arithmetic
    assert noise_level([0.0, 1e-20], torch.float64) == 10 * EPS64  # the attack's own float64 rounding
    assert noise_level([1e-9], torch.float32) == EPS32


def test_probe_level_stands_out_from_rounding_and_moves_every_residual():
    assert probe_level(1e-15, []) == 1e3 * EPS64
    assert probe_level(1e-6, [1e-9, math.inf]) == 1e-6
    assert probe_level(1e-9, [1e-5, 1e-12]) == pytest.approx(1e-6)


def test_perturbed_adds_noise_of_the_requested_relative_size_reproducibly():
    parameters = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5))]
    grads = Gradients(parameters, [torch.randn(4, 3, generator=torch.Generator().manual_seed(0)),
                                   torch.arange(1.0, 6.0)])
    noisy = perturbed(parameters, grads, 1e-4)
    again = perturbed(parameters, grads, 1e-4)
    for parameter in parameters:
        clean = grads.of(parameter).double()
        assert noisy.of(parameter).dtype == torch.float64
        assert float(torch.linalg.norm(noisy.of(parameter) - clean) / torch.linalg.norm(clean)) == \
            pytest.approx(1e-4, rel=1e-9)
        assert torch.equal(noisy.of(parameter), again.of(parameter))


def test_keep_rank_keeps_a_batch_s_linear_gradient_at_its_rank():
    generator = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(20, 6)
    weight_grad = torch.randn(6, 2, dtype=torch.float64, generator=generator) @ \
        torch.randn(2, 20, dtype=torch.float64, generator=generator)
    bias_grad = weight_grad[:, :2].sum(1)  # rank two together with the weight gradient
    parameters = [linear.weight, linear.bias]
    clean = Gradients(parameters, [weight_grad, bias_grad])
    noisy = perturbed(parameters, clean, 1e-6)

    def third_singular_value(grads):
        stacked = torch.cat([grads.of(linear.weight), grads.of(linear.bias)[:, None]], dim=1)
        sigma = torch.linalg.svdvals(stacked)
        return float(sigma[2] / sigma[0])

    assert third_singular_value(noisy) > 1e-7, "untouched, the noise raises the rank"
    assert third_singular_value(keep_rank(clean, noisy, linear, 2)) < 1e-11  # second order in the noise only


def measured(values, residual=0.0, cond=1.0):
    return Measured(torch.tensor(values, dtype=torch.float64), residual, cond)


def test_probe_bound_scales_the_probe_s_change_to_the_gradients_noise():
    clean = [measured([1.0, -2.0]), measured([0.5, 0.25])]
    probed = [measured([1.0 + 3e-8, -2.0]), measured([0.5, 0.25 - 1e-9])]
    bound = probe_bound(clean, probed, level=1e-9, probed_level=1e-8)
    rounding = [10 * EPS64 * 2.0, 10 * EPS64 * 0.5]  # ten times cond * eps of each layer's largest value
    assert bound.noise == 1e-9
    assert bound.layers == pytest.approx((BOUND_MARGIN * 0.1 * 3e-8 + rounding[0], BOUND_MARGIN * 0.1 * 1e-9 +
                                          rounding[1]), rel=1e-6)
    assert bound.image == bound.layers[0]
    doubled = probe_bound(clean, probed, level=2e-9, probed_level=1e-8)
    assert doubled.image - rounding[0] == pytest.approx(2 * (bound.image - rounding[0]), rel=1e-6)


def test_probe_bound_raises_the_noise_to_explain_a_residual_the_misfits_did_not_show():
    # a layer's residual of 1e-6 where the probe's 1e-8 of noise alone leaves 1e-8: it needs 100 times the noise
    clean = [measured([1.0], residual=1e-6)]
    probed = [measured([1.0 + 1e-7], residual=math.sqrt(1e-12 + 1e-16))]
    bound = probe_bound(clean, probed, level=1e-10, probed_level=1e-8)
    assert bound.noise == pytest.approx(1e-6, rel=1e-6)
    assert bound.image == pytest.approx(BOUND_MARGIN * 100 * 1e-7, rel=1e-5)
    unexplained = probe_bound(clean, [measured([1.0 + 1e-7], residual=1e-6)], level=1e-10, probed_level=1e-8)
    assert math.isinf(unexplained.noise) and math.isinf(unexplained.image)


def test_bound_reasons_says_why_a_bound_is_too_large():
    float32 = Tolerances.for_dtype(torch.float32)
    [reason] = bound_reasons(ErrorBound(0.02, (0.02, 0.5, math.inf), 3e-6), float32)
    assert reason == ("error bound: the image may be off by up to 0.02 (max abs), above the 0.001 that exact allows "
                      "for float32 gradients; the gradients' noise (3e-06 relative) is amplified most by conv layer 2 "
                      "and below")
    assert bound_reasons(ErrorBound(1e-4, (1e-4, 1e-5), 1e-7), float32) == []
    assert bound_reasons(unbounded(2), float32) == [], "no bound measured: other reasons say why"
    assert bound_reasons(ErrorBound(2e-6, (2e-6,), 1e-12), Tolerances.for_dtype(torch.float64))[0].startswith(
        "error bound: the image may be off by up to 2e-06 (max abs), above the 1e-06 that exact allows for float64")


def test_an_unmeasured_bound_says_so_instead_of_quoting_infinity():
    [reason] = bound_reasons(unbounded(3, 1e-6), Tolerances.for_dtype(torch.float32))
    assert reason.startswith("error bound: infinite, as how far the gradients' noise moves the image could not be "
                             "measured") and "inf (max abs)" not in reason


def test_a_float32_attack_s_bound_is_finite_and_holds(lenet_c10, cifar_image, lenet_c10_cache):
    grads = rc.client_gradients(lenet_c10, cifar_image, 3, dtype=torch.float32)
    result = rc.reconstruct(lenet_c10, grads, cifar_image.shape, cache=lenet_c10_cache)
    assert math.isfinite(result.error_bound) and result.noise >= EPS32
    assert max_error(result, cifar_image) <= result.error_bound
    assert result.exact == (result.error_bound <= 1e-3)
    assert all(math.isfinite(layer.error_bound) for layer in result.layers)
