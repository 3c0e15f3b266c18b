"""rconv.cases.client.defend: defences on the shared gradients, what they leave of the attack (the absolute ReLU
test, the regularised solve), and the strengths it refuses."""
import math

import pytest
import torch

import rconv_core as rc
from conftest import max_error


@pytest.fixture(scope="module")
def setting(samples):
    model = rc.build_model("lenet", 3, 10)
    image, label = samples[0][1], samples[1][1]
    return model, image, rc.client_gradients(model, image, label, dtype=torch.float64)


def test_gaussian_noise_has_the_requested_relative_norm(setting):
    _, _, grads = setting
    noisy = rc.defend(grads, "gaussian", 1e-2, seed=3)
    for g, n in zip(grads, noisy):
        ratio = float(torch.linalg.norm(n - g) / torch.linalg.norm(g))
        assert 0.5e-2 < ratio < 2e-2 and n.dtype == g.dtype
    assert torch.equal(noisy[0], rc.defend(grads, "gaussian", 1e-2, seed=3)[0])


def test_topk_and_quantize(setting):
    _, _, grads = setting
    sparse = rc.defend(grads, "topk", 0.1)
    for g, s in zip(grads, sparse):
        kept = int((s != 0).sum())
        assert kept == max(1, round(0.1 * g.numel())) or kept < max(1, round(0.1 * g.numel()))
        assert float(s.abs().max()) == float(g.abs().max())
    coarse = rc.defend(grads, "quantize", 4)
    for g, q in zip(grads, coarse):
        levels = torch.unique(torch.round(q / q.abs().max() * 7))
        assert len(levels) <= 15
        assert float((q - g).abs().max()) <= float(g.abs().max()) / 14 + 1e-12
    assert rc.defend(grads, "none", 0) == list(grads)


def test_defence_errors(setting):
    _, _, grads = setting
    with pytest.raises(rc.RConvError, match="unknown defence 'dp'"):
        rc.defend(grads, "dp", 1)
    with pytest.raises(rc.RConvError, match="topk keeps a fraction"):
        rc.defend(grads, "topk", 1.5)
    with pytest.raises(rc.RConvError, match="whole number of bits"):
        rc.defend(grads, "quantize", 2.5)


def test_a_strong_defence_is_reported_not_exact(setting):
    model, image, grads = setting
    result = rc.reconstruct(model, rc.defend(grads, "gaussian", 1e-2), image.shape, check_batch=False)
    assert not result.exact
    assert rc.image_metrics(image, result.image)["psnr"] < 60


def test_projected_solve_degrades_more_gracefully(setting):
    model, image, grads = setting
    noisy = rc.defend(grads, "gaussian", 1e-3, seed=1)
    plain = rc.reconstruct(model, noisy, image.shape, check_batch=False)
    projected = rc.reconstruct(model, noisy, image.shape, check_batch=False, project=True)
    assert float(projected.image.min()) >= 0 and float(projected.image.max()) <= 1
    assert rc.image_metrics(image, projected.image)["psnr"] > rc.image_metrics(image, plain.image)["psnr"]
    exact = rc.reconstruct(model, grads, image.shape, project=True)
    assert exact.exact and max_error(exact, image) < 1e-8


@pytest.mark.slow
def test_absolute_relu_test_is_the_published_behaviour(setting, packs):
    model, image, grads = setting
    assert max_error(rc.reconstruct(model, grads, image.shape, relu_test="absolute"), image) < 1e-8
    images, labels = rc.load_images("cifar10", [0], root=packs)
    c10 = rc.build_model("lenet_c10", 3, 10)
    grads32 = rc.client_gradients(c10, images[0], labels[0], dtype=torch.float32)
    paper = rc.reconstruct(c10, grads32, images.shape[1:], first_layer="weights", relu_test="absolute")
    assert not paper.exact and rc.image_metrics(images[0], paper.image)["psnr"] < 40
    with pytest.raises(rc.RConvError, match="relu_test must be"):
        rc.reconstruct(model, grads, image.shape, relu_test="rounded")


def test_defences_keep_named_gradients_and_refuse_one_bit(setting):
    model, _, grads = setting
    named = dict(zip([name for name, _ in model.named_parameters()], grads))
    noisy = rc.defend(named, "gaussian", 1e-3, seed=3)
    assert list(noisy) == list(named)
    assert torch.equal(noisy["0.weight"], rc.defend(grads, "gaussian", 1e-3, seed=3)[0])
    with pytest.raises(rc.RConvError, match="bits >= 2"):
        rc.defend(grads, "quantize", 1)
    two_bits = rc.defend(grads, "quantize", 2)
    assert all(len(torch.unique(q)) <= 3 for q in two_bits)


@pytest.mark.parametrize("defence,strength", [("quantize", math.nan), ("quantize", "8"), ("gaussian", "0.1"),
                                              ("gaussian", math.inf), ("topk", None), ("topk", True)])
def test_defend_refuses_strengths_that_are_no_number(lenet_c10_grads, defence, strength):
    with pytest.raises(rc.RConvError, match=f"the strength of {defence} must be a finite number"):
        rc.defend(lenet_c10_grads, defence, strength)
