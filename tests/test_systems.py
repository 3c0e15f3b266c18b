"""rconv.attack.systems: solving a layer's equations, here the hybrid stack completed in the gradient
constraints' null space."""
import pytest
import torch

EXACT_ERROR = 1e-6


def completion_case(known_fraction, seed=0):
    """A layer of 4 x 16 x 16 inputs whose 4 filters of 3 x 3 give 36 gradient constraints per channel
    (220 of 256 pixels left undetermined in each), and a share of its weight constraints known."""
    from rconv.attack.equations import GradientSystem, LayerEquations, weight_system
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 4, 16, 16, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64)
    output_grad = torch.randn(4, 16, 16, generator=generator, dtype=torch.float64)
    weight_grad = torch.nn.grad.conv2d_weight(x, weight.shape, output_grad[None], stride=1, padding=1)
    known = torch.rand(4 * 16 * 16, generator=generator) < known_fraction
    output = torch.nn.functional.conv2d(x, weight, padding=1).reshape(-1)[known]
    equations = LayerEquations(GradientSystem(output_grad, weight_grad, (16, 16), 3, 1, 1),
                               weight_system(weight, None, (1, 1), (1, 1), (4, 16, 16), None), known, output)
    return x[0], equations


@pytest.mark.parametrize("known_fraction", [0.95, 0.5])
def test_completion_in_the_gradient_null_space_has_the_stacked_system_s_rank(known_fraction):
    """rank [I (x) A; B] = rank A * C + rank (B N): the completion's rank is the hybrid system's, and with
    enough weight rows its input is the layer's."""
    from rconv.attack.systems import complete_gradients
    x, equations = completion_case(known_fraction)
    solved = complete_gradients(equations, torch.float64)
    stacked = torch.cat([torch.block_diag(*[equations.gradients.matrix] * 4), equations.weights.dense()[equations.known]])
    assert solved.spectrum.rank == int(torch.linalg.matrix_rank(stacked))
    if known_fraction == 0.5:  # about 512 weight rows cannot fill 4 * 220 = 880 directions
        assert solved.spectrum.rank < equations.unknowns
    else:
        assert solved.spectrum.rank == equations.unknowns
        assert float((solved.x.reshape(x.shape) - x).abs().max()) <= EXACT_ERROR
        assert solved.residual <= 1e-12


def test_the_fallback_completes_a_dense_sized_layer_before_any_joint_solve():
    """1,024 unknowns would fit a dense joint solve of every unknown; the fallback completes the gradient
    constraints' null space instead (ten times cheaper on LeNet_O's float32 second layers), as exactly."""
    from rconv.attack.systems import DENSE_MAX_UNKNOWNS, solve_layer
    x, equations = completion_case(0.95)
    assert equations.unknowns <= DENSE_MAX_UNKNOWNS
    solved = solve_layer(equations, "hybrid", torch.float64, fallback=True)
    assert any("directions undetermined" in note for note in solved.notes)
    assert solved.spectrum.rank == equations.unknowns
    assert float((solved.x.reshape(x.shape) - x).abs().max()) <= EXACT_ERROR
