"""rconv.split.vertices: features as vertices of a row space's nonnegative part, on small problems whose vertices
are known (lp_vertex, lp_vertex_excluding, refine)."""
import numpy as np
import pytest

from rconv.split.vertices import lp_vertex, lp_vertex_excluding, refine

# Two nonnegative vectors: {x = s a1 + t a2 >= 0, sum x = 1} is the segment between a1 / 4 and a2 / 6.
A1, A2 = np.array([1.0, 2.0, 0.0, 1.0]), np.array([0.0, 1.0, 3.0, 2.0])


def orthonormal_basis(*rows):
    basis, _ = np.linalg.qr(np.stack(rows, axis=1))
    return basis


@pytest.mark.parametrize("weights,vertex", [([0.0, 0.0, 1.0, 0.0], A1 / 4), ([1.0, 0.0, 0.0, 0.0], A2 / 6),
                                            ([0.0, 0.0, 0.0, 1.0], A1 / 4)])
def test_lp_vertex_lands_on_the_vertex_the_weights_prefer(weights, vertex):
    x = lp_vertex(orthonormal_basis(A1, A2), np.array(weights), slack=0.0)
    assert np.abs(x - vertex).max() <= 1e-12


def test_lp_vertex_of_an_infeasible_program_is_none():
    basis = orthonormal_basis(np.array([1.0, -1.0, 0.0]))  # no nonnegative vector sums to 1 in this line
    assert lp_vertex(basis, np.ones(3), slack=0.0) is None


def test_lp_vertex_excluding_a_found_feature_gives_the_other():
    basis = orthonormal_basis(A1, A2)
    found, other = basis.T @ A1, basis.T @ A2  # their coefficients in the basis
    direction = np.array([-found[1], found[0]])
    direction *= np.sign(direction @ other)  # orthogonal to the found feature, positive on the other
    x = lp_vertex_excluding(basis, np.ones(4), direction, slack=0.0)
    assert np.abs(x - A2 / 6).max() <= 1e-12


def features_and_basis(n=30, seed=0):
    """Two features behind ReLU (ten zeros each, at different places) and an orthonormal basis of their rows
    [a, 1], the bias entry last."""
    generator = np.random.default_rng(seed)
    features = generator.uniform(0.5, 2.0, size=(2, n))
    features[0, :10] = 0.0
    features[1, 10:20] = 0.0
    rows = np.hstack([features, np.ones((2, 1))])
    return features, rows, orthonormal_basis(*rows)


def test_refine_pins_a_noisy_feature_by_its_zero_set():
    features, rows, basis = features_and_basis()
    noisy = features[0] + 1e-9 * np.random.default_rng(1).standard_normal(30)
    active = np.arange(30)
    refined = refine(basis, active, noisy, tau=1e-6)
    assert sorted(refined.zeros.tolist()) == list(range(10))
    assert np.abs(refined.vector - rows[0] / np.linalg.norm(rows[0])).max() <= 1e-12
    assert refined.resid <= 1e-14 and refined.second > 1e-3 and refined.zero_noise <= 1e-14


def test_refine_gives_up_without_enough_zeros():
    features, _, basis = features_and_basis()
    few = features[0].copy()
    few[3:10] = 1.0  # three zeros cannot pin a vector of a 2-dimensional row space with room to measure noise
    assert refine(basis, np.arange(30), few, tau=1e-6) is None
    assert refine(basis, np.arange(30), None, tau=1e-6) is None
