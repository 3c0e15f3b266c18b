"""Krylov least squares (rconv.linalg.krylov) and the conv layers it solves when a factorisation would not fit
(rconv.attack.preconditioning, systems.choose_solver): agreement with direct solves, reasons when it stops
short, and the memory guard's refusals."""
import math

import pytest
import torch

import rconv.attack.preconditioning as preconditioning
import rconv.attack.systems as systems
import rconv_core as rc
from rconv.attack.equations import GradientSystem, LayerEquations, WeightSystem
from rconv.attack.preconditioning import conv_preconditioner, plan
from rconv.linalg.krylov import LowPrecision, gram_solver, lanczos_extremes, normal_cg, symmetric_schwarz

# Krylov and direct solutions of the same well-conditioned system agree to this, relative to the solution.
AGREEMENT = 1e-10
# A conv layer's (condition number 3e4) agree to this: CG on the normal equations stops near cond(K)^2 eps,
# where the factorisation's corrected semi-normal equations reach cond(K) eps.
LAYER_AGREEMENT = 1e-8


def tall_system(rows=120, columns=50, seed=0, cond=30.0):
    """A dense K with a chosen condition number, and a consistent right-hand side."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, columns, dtype=torch.float64, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(columns, columns, dtype=torch.float64, generator=generator))
    sigma = torch.logspace(0, -math.log10(cond), columns, dtype=torch.float64)
    matrix = left @ torch.diag(sigma) @ right.T
    truth = torch.randn(columns, 2, dtype=torch.float64, generator=generator)
    return matrix, truth, matrix @ truth


def jacobi(matrix):
    diagonal = (matrix * matrix).sum(0)[:, None]
    return lambda r: r / diagonal


def test_normal_cg_agrees_with_a_direct_solve():
    matrix, truth, rhs = tall_system()
    solved = normal_cg(lambda v: matrix @ v, lambda v: matrix.T @ v, rhs, jacobi(matrix), tolerance=1e-14,
                       max_iterations=500)
    direct = torch.linalg.lstsq(matrix, rhs).solution
    assert solved.converged and solved.reason == ""
    assert float((solved.x - direct).abs().max() / direct.abs().max()) <= AGREEMENT
    assert solved.residual <= 1e-12 and solved.optimality <= 1e-14


def test_normal_cg_says_why_it_stopped_short():
    matrix, _, rhs = tall_system(cond=1e6)
    solved = normal_cg(lambda v: matrix @ v, lambda v: matrix.T @ v, rhs, lambda r: r, tolerance=1e-14,
                       max_iterations=3)
    assert not solved.converged
    assert "did not converge in 3 steps" in solved.reason
    assert solved.optimality > 1e-14, "the residuals it reports are the ones it stopped at"
    late = normal_cg(lambda v: matrix @ v, lambda v: matrix.T @ v, rhs, lambda r: r, tolerance=1e-14,
                     max_iterations=500, time_limit=0.0)
    assert "time limit" in late.reason


def test_cg_solves_every_column_at_once_and_leaves_a_zero_column_at_zero():
    matrix, _, _ = tall_system(cond=100.0)
    gram = matrix.T @ matrix
    rhs = torch.randn(gram.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    rhs[:, 1] = 0.0
    solved = gram_solver(lambda v: gram @ v, lambda r: r, tolerance=1e-12, max_iterations=500)(rhs)
    direct = torch.linalg.solve(gram, rhs)
    assert torch.isfinite(solved).all() and bool((solved[:, 1] == 0).all())
    # a residual within 1e-12 of |b| leaves an error within cond(K^T K) = 1e4 times that
    assert float((solved - direct).abs().max() / direct.abs().max()) <= 1e-7


def counted(products, key, function):
    def apply(v):
        products[key] += 1
        return function(v)
    return apply


# normal_cg's float64 products outside CG: a residual check per round and column, and the final residuals.
_CHECKS = 20


@pytest.mark.parametrize("cond, solved_by", [(30.0, "float32"), (1e4, "float64")])
def test_float32_rounds_reach_the_float64_tolerance_or_hand_over_to_float64(cond, solved_by):
    """A well-conditioned system is solved by float32 products, each round checked in float64; one that float32
    cannot resolve (cond(K^T K) 1e8) hands over to float64 CG and reaches the same tolerance."""
    matrix, truth, rhs = tall_system(cond=cond)
    low = matrix.to(torch.float32)
    gram = low.T @ low
    products = {"float64": 0, "float32": 0}
    lower = LowPrecision(counted(products, "float32", lambda v: gram @ v), jacobi(low), torch.float32)
    solved = normal_cg(counted(products, "float64", lambda v: matrix @ v), lambda v: matrix.T @ v, rhs,
                       jacobi(matrix), tolerance=1e-14, max_iterations=5000, lower=lower)
    assert solved.converged and solved.optimality <= 1e-14
    direct = torch.linalg.lstsq(matrix, rhs).solution
    # CG on the normal equations stops near cond(K)^2 eps of the least-squares solution
    assert float((solved.x - direct).abs().max() / direct.abs().max()) <= (AGREEMENT if cond < 100 else 1e-6)
    assert solved.lower_iterations == products["float32"] <= solved.iterations
    if solved_by == "float32":
        assert products["float64"] <= _CHECKS < products["float32"], products
    else:
        assert products["float64"] > 10 * _CHECKS, products


def test_an_exact_local_solve_on_every_unknown_makes_cg_converge_at_once():
    matrix, _, rhs = tall_system()
    gram = matrix.T @ matrix
    everything = torch.arange(gram.shape[0])
    exact = symmetric_schwarz(lambda v: gram @ v, everything, lambda r: torch.linalg.solve(gram, r), lambda r: 0 * r)
    solved = normal_cg(lambda v: matrix @ v, lambda v: matrix.T @ v, rhs, exact, tolerance=1e-12, max_iterations=50)
    assert solved.converged and solved.iterations <= 2 * rhs.shape[1]


def conv_layer(channels=4, filters=6, side=34, kernel=3, stride=1, padding=0, seed=0):
    """A conv layer's equations with every pre-activation known (LeakyReLU), for a random input."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(filters, channels, kernel, kernel, dtype=torch.float64, generator=generator) / kernel
    x = torch.rand(channels, side, side, dtype=torch.float64, generator=generator)
    output = torch.nn.functional.conv2d(x[None], weight, stride=stride, padding=padding)[0]
    weights = WeightSystem(weight, (channels, side, side), (stride, stride), (padding, padding))
    output_grad = torch.randn(output.shape, dtype=torch.float64, generator=generator)
    weight_grad = torch.nn.grad.conv2d_weight(x[None], weight.shape, output_grad[None], stride=stride, padding=padding)
    gradients = GradientSystem(output_grad, weight_grad, (side, side), kernel, stride, padding)
    known = torch.ones(output.numel(), dtype=torch.bool)
    return LayerEquations(gradients, weights, known, output.reshape(-1)), x


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), pytest.param(2, 1, marks=pytest.mark.slow)])
def test_a_krylov_layer_agrees_with_the_direct_solve(monkeypatch, stride, padding):
    equations, truth = conv_layer(stride=stride, padding=padding, filters=6 if stride == 1 else 20)
    direct = systems.solve_layer(equations, "weights", torch.float64, label="layer")
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    krylov = systems.solve_layer(equations, "weights", torch.float64, label="layer")
    assert (direct.solver, krylov.solver) == ("direct", "krylov") and krylov.stopped == ""
    assert float((krylov.x - direct.x).abs().max() / direct.x.abs().max()) <= LAYER_AGREEMENT
    assert float((krylov.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT
    assert krylov.spectrum.rank == equations.unknowns and krylov.residual <= 1e-13
    assert direct.spectrum.cond / 10 <= krylov.spectrum.cond <= 10 * direct.spectrum.cond, "its order of magnitude"
    rhs = torch.randn(equations.output.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gradient_rhs = torch.zeros(equations.gradients.shape[0], equations.channels, 2, dtype=torch.float64)
    moved = krylov.resolve(gradient_rhs, rhs)
    # the error bound's resolves stop at a loose tolerance: they need a digit (systems._RESOLVE_ACCURACY)
    assert torch.allclose(moved, direct.resolve(gradient_rhs, rhs), rtol=0,
                          atol=systems._RESOLVE_ACCURACY * float(moved.abs().max()))


@pytest.mark.parametrize("kernel, padding, side, wide", [(3, 1, (20, 17), 3), (5, 2, (19, 22), 5), (5, 0, (16, 16), 7)])
def test_the_stride_one_frame_gram_is_the_sparse_products(kernel, padding, side, wide):
    weight = torch.randn(6, 4, kernel, kernel, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shape = (4, *side)
    frame = preconditioning._frame(shape, wide)
    columns = (torch.arange(4)[:, None] * frame.numel() + torch.nonzero(frame)[:, 0][None, :]).reshape(-1)
    outputs = math.prod(side[i] + 2 * padding - kernel + 1 for i in range(2))
    known = torch.ones(6 * outputs, dtype=torch.bool)
    product = preconditioning._product_frame_gram(weight, shape, (1, 1), (padding, padding), known, frame, columns)
    structured = preconditioning._stride_one_frame_gram(weight, shape, (padding, padding), frame)
    assert structured.shape == product.shape == (len(columns), len(columns))
    assert abs(structured - product).max() <= 1e-13 * abs(product).max() and structured.nnz == product.nnz


def test_the_preconditioner_is_kept_for_the_next_image_of_the_same_weights(monkeypatch):
    first, _ = conv_layer()
    second_x = torch.rand(first.weights.input_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    output = torch.nn.functional.conv2d(second_x[None], first.weights.weight)[0]
    second = first._replace(output=output.reshape(-1))  # another image through the same WeightSystem
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    built = []
    real = preconditioning._frame_solver
    monkeypatch.setattr(preconditioning, "_frame_solver", lambda *args: built.append(1) or real(*args))
    systems.solve_layer(first, "weights", torch.float64, label="layer")
    solved = systems.solve_layer(second, "weights", torch.float64, label="layer")
    assert len(built) == 1 and solved.stopped == ""
    assert float((solved.x - second_x.reshape(second_x.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT
    known = torch.rand(output.numel(), generator=torch.Generator().manual_seed(1)) > 0.1
    relu = second._replace(known=known, output=output.reshape(-1)[known])
    systems.solve_layer(relu, "weights", torch.float64, label="layer")
    assert len(built) == 2, "rows known only where a ReLU is on differ by image: not kept"


def test_a_partial_krylov_layer_is_solved_in_float32_rounds_to_the_float64_solution(monkeypatch):
    equations, truth = conv_layer(filters=8)
    known = torch.rand(equations.known.numel(), generator=torch.Generator().manual_seed(4)) > 0.3
    relu = equations._replace(known=known, output=equations.output[known])  # the units on of a ReLU layer
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    solved = systems.solve_layer(relu, "hybrid", torch.float64, label="conv layer 2")
    assert solved.solver == "krylov" and solved.stopped == ""
    assert float((solved.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT
    assert any("of them in float32" in note for note in solved.notes), solved.notes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lanczos_finds_the_extremes_of_a_small_gram_matrix(dtype):
    """50 unknowns, cond 30: the extreme Ritz values settle on the eigenvalues within a few dozen steps."""
    matrix, _, _ = tall_system(cond=30.0)
    gram = matrix.T @ matrix
    extremes = lanczos_extremes(lambda v: gram.to(dtype) @ v, 50, dtype=dtype)
    eigenvalues = torch.linalg.eigvalsh(gram)
    assert math.isclose(extremes.largest, float(eigenvalues[-1]), rel_tol=1e-2)
    assert math.isclose(extremes.smallest, float(eigenvalues[0]), rel_tol=1e-2)
    assert 30.0 * (1 - 1e-2) <= extremes.cond <= 30.0 * (1 + 1e-6)


def test_lanczos_never_overstates_the_condition_number_of_a_large_spectrum():
    """20,000 eigenvalues spread over cond^2 = 1e4, more than its steps can resolve one by one: the estimate
    settles below the truth and within a small factor of it."""
    spectrum = torch.logspace(0, -4, 20_000, dtype=torch.float64)
    extremes = lanczos_extremes(lambda v: spectrum[:, None] * v, spectrum.numel(), dtype=torch.float64)
    assert extremes.steps < spectrum.numel()
    assert 0.5 * 100.0 <= extremes.cond <= 100.0 * (1 + 1e-9)


def test_a_singular_partial_layer_s_condition_number_is_measured_again_in_float64():
    """float32 sees a null space as eigenvalues of its rounding (about 1e-7 of the largest); beyond what it
    resolves, the condition number comes from float64's inverse iteration, and says the system is singular."""
    matrix, _, _ = tall_system(cond=30.0)
    matrix[:, 0] = 0.0  # an unknown no equation reads
    gram = matrix.T @ matrix
    lower = LowPrecision(lambda v: gram.to(torch.float32) @ v, lambda r: r, torch.float32)
    assert lanczos_extremes(lower.gram_apply, 50, dtype=torch.float32).cond > systems._LOW_COND_LIMIT
    cond = systems._krylov_condition(50, gram, lambda v: gram @ v, lambda r: r, lower)
    assert cond > 1e6


def test_a_krylov_layer_that_runs_out_of_steps_says_so_and_is_not_certified(monkeypatch):
    equations, _ = conv_layer()
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    monkeypatch.setattr(systems, "KRYLOV_MAX_STEPS", 1)
    solved = systems.solve_layer(equations, "weights", torch.float64, label="conv layer 2")
    assert solved.stopped.startswith("conv layer 2: its Krylov solve CG did not converge in 1 steps")
    assert solved.stopped in solved.notes


@pytest.mark.parametrize("kernel, stride, solver", [(5, 1, "krylov"), (3, 1, "direct"), (5, 2, "direct")])
def test_a_large_stride_one_layer_is_solved_by_krylov_iterations(kernel, stride, solver):
    """A 128-px net's second layer (16 channels at 64 px): its 5x5 Gram (85M entries) would factorise in 57 s
    and 6.9 GB, against 21 s and 2.9 GB by CG; 3x3 (26M) factorises faster; stride 2 has no symbol to use."""
    chosen = systems.plan_solver((20, 16, kernel, kernel), (16, 64, 64), stride, kernel // 2)
    assert chosen.solver == solver
    assert ("preconditioned CG is faster" in chosen.reason) == (solver == "krylov")


def test_the_preconditioner_is_refused_before_it_is_built_when_it_would_not_fit():
    equations, _ = conv_layer()
    weights = equations.weights
    layout = plan(weights.weight.shape, weights.input_shape, weights.stride, weights.padding)
    assert layout.frame_width == weights.weight.shape[-1], "one kernel width"
    need = layout.bytes
    with pytest.raises(rc.RConvError, match=r"conv layer 2: the preconditioner of its Krylov solve .* would need"):
        conv_preconditioner(weights.weight, weights.input_shape, weights.stride, weights.padding, equations.known,
                            lambda v: v, memory_limit=need // 2, label="conv layer 2")


def test_a_layer_too_large_for_its_memory_limit_names_itself_and_what_it_needs(monkeypatch):
    equations, _ = conv_layer()
    with pytest.raises(rc.RConvError) as raised:
        systems.solve_layer(equations, "weights", torch.float64, memory_limit=1000, label="conv layer 2 (model[2])")
    message = str(raised.value)
    assert message.startswith("conv layer 2 (model[2]): ") and "would need" in message and "memory_limit" in message


def test_a_factorisation_pardiso_refuses_goes_to_the_krylov_solve(monkeypatch):
    from rconv.linalg.sparse import FillTooLarge
    equations, _ = conv_layer()

    def refuse(*args, **kwargs):
        raise FillTooLarge(10 ** 12)

    monkeypatch.setattr(WeightSystem, "normal_factor", refuse)
    solved = systems.solve_layer(equations, "weights", torch.float64, label="layer")
    assert solved.solver == "krylov" and solved.stopped == ""
    assert any("would need 931.3 GB" in note for note in solved.notes)


# What NumPy and torch's CPU allocator raise when an allocation fails (torch's is a RuntimeError).
FAILED_ALLOCATIONS = [MemoryError("Unable to allocate 11.7 GiB"),
                      RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 4194304 bytes. Error code 12")]


@pytest.mark.parametrize("failure", FAILED_ALLOCATIONS, ids=["numpy", "torch"])
def test_a_failed_allocation_becomes_an_rconv_error_naming_the_layer(monkeypatch, failure):
    equations, _ = conv_layer()

    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr(WeightSystem, "normal_factor", exhausted)
    with pytest.raises(rc.RConvError, match=r"^conv layer 2: an allocation failed while solving its 4,624 unknowns"):
        systems.solve_layer(equations, "weights", torch.float64, label="conv layer 2")


def test_a_runtime_error_that_is_not_an_allocation_is_not_hidden(monkeypatch):
    equations, _ = conv_layer()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(WeightSystem, "normal_factor", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        systems.solve_layer(equations, "weights", torch.float64, label="conv layer 2")


def relu_layer(channels=4, filters=14, side=34, kernel=3, seed=0):
    """conv_layer's equations with the weight constraints known only where a ReLU is on (about half)."""
    equations, x = conv_layer(channels=channels, filters=filters, side=side, kernel=kernel, seed=seed)
    known = equations.output > equations.output.mean()  # a bias of minus the mean: about half the units on
    return equations._replace(known=known, output=equations.output[known]), x


def test_the_joint_preconditioner_is_the_inverse_diagonal_of_both_kinds_of_constraints():
    equations, _ = relu_layer(side=12)
    weights, gradients = equations.weights, equations.gradients
    dense_weights = weights.dense()[equations.known]
    gradient_diagonal = (gradients.matrix ** 2).sum(0).repeat(equations.channels)
    diagonal = 0.3 ** 2 * (dense_weights ** 2).sum(0) + 2.0 ** 2 * gradient_diagonal
    apply = preconditioning.joint_preconditioner(weights.weight, weights.input_shape, weights.stride,
                                                 weights.padding, equations.known, gradients.output_grad, 0.3, 2.0)
    ones = torch.ones(equations.unknowns, 1, dtype=torch.float64)
    assert torch.allclose(apply(ones)[:, 0], 1.0 / diagonal, rtol=1e-12, atol=0)


def test_a_layer_whose_weight_constraints_alone_are_too_few_is_solved_by_cg_with_both_kinds(monkeypatch):
    """Every unit known, but a valid conv's 4,356 weight constraints are fewer than its 4,608 unknowns: their M^T M
    is singular, and so was the symbol's frame (CG stalled at NaN). Both kinds determine it, preconditioned together."""
    equations, truth = conv_layer(channels=8, filters=9, side=24)
    assert equations.weights.shape[0] < equations.unknowns <= equations.weights.shape[0] + 9 * 9 * 8
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    solved = systems.solve_layer(equations, "hybrid", torch.float64, label="layer")
    assert solved.solver == "krylov" and solved.stopped == ""
    assert float((solved.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT


def test_a_square_layer_is_solved_by_cg_with_both_kinds_under_the_joint_diagonal(monkeypatch):
    """Every unit known and as many weight constraints as unknowns (a padded 8-channel 3x3 conv): their M^T M is
    nearly singular, and CG under the weights' symbol took 2,103-2,966 steps; the joint diagonal's float32 rounds
    take about half."""
    equations, truth = conv_layer(channels=8, filters=8, side=24, padding=1)
    assert equations.weights.shape[0] == equations.unknowns
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    solved = systems.solve_layer(equations, "hybrid", torch.float64, label="layer")
    assert solved.solver == "krylov" and solved.stopped == ""
    assert any("of them in float32" in note for note in solved.notes), solved.notes
    assert float((solved.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT


def test_a_relu_layer_too_large_to_factorise_is_solved_with_both_kinds_of_constraints(monkeypatch):
    equations, truth = relu_layer()
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    krylov = systems.solve_layer(equations, "hybrid", torch.float64, label="layer")
    assert krylov.solver == "krylov" and krylov.stopped == ""
    assert float((krylov.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT


@pytest.mark.slow
def test_a_relu_network_whose_second_layer_takes_cg_comes_back_exact(monkeypatch):
    """Not a preset: its second layer (8 channels at 24 px, ReLU) is barely determined by the units that are on;
    solved by CG, it takes both kinds of constraints."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 1, 1), torch.nn.LeakyReLU(0.2),
                                torch.nn.Conv2d(8, 24, 3, 1, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(24 * 24 * 24, 10))
    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(5))
    grads = rc.client_gradients(model, image, 3, dtype=torch.float64)
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 0)
    result = rc.reconstruct(model, grads, (3, 24, 24))
    second = result.layers[1]
    assert (second.method, second.solver) == ("gradients+weights", "krylov")
    assert result.exact and float((result.image[0] - image).abs().max()) <= 1e-6


def test_a_relu_layer_s_krylov_plan_needs_only_its_vectors():
    """Rows known only where a unit is on: no frame to factorise, no symbol; the plan says so before any attack."""
    shapes = ((72, 32, 5, 5), (32, 64, 64), 1, 2)
    every_row, relu = systems.plan_solver(*shapes), systems.plan_solver(*shapes, partial=True)
    assert every_row.solver == relu.solver == "krylov"
    assert relu.memory == systems._KRYLOV_VECTORS * 32 * 64 * 64 * 8 < every_row.memory / 100


def test_gradient_constraints_whose_gram_blocks_are_too_large_are_left_to_a_deflation_or_cg_under_relu(monkeypatch):
    """Their dense residue-class blocks count like the weight Gram matrix. Under ReLU, units that are on as many as
    the unknowns are factorised and corrected by both kinds within their weakest directions; fewer, and both kinds
    go to CG. With every row known the gradient constraints are left out, as the weights alone determine the layer."""
    relu, truth = relu_layer()
    every, few_truth = conv_layer(filters=14)
    # units on 20 fewer than the unknowns: the gradient constraints (504 rows) must complete them
    few_known = every.output > every.output.sort(descending=True).values[every.unknowns - 20]
    few = every._replace(known=few_known, output=every.output[few_known])
    full, _ = conv_layer()
    assert systems.gram_entries_bound(relu.weights.input_shape, (3, 3)) < 10 ** 6 < systems._gradient_gram_entries(relu)
    assert int(few.known.sum()) < few.unknowns <= int(few.known.sum()) + few.gradients.shape[0] * few.channels
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 10 ** 6)
    deflated = systems.solve_layer(relu, "hybrid", torch.float64, label="layer")
    assert deflated.solver == "direct" and any("weakest directions" in note for note in deflated.notes)
    assert float((deflated.x - truth.reshape(truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT
    solved = systems.solve_layer(few, "hybrid", torch.float64, label="layer")
    assert solved.solver == "krylov" and solved.stopped == ""
    assert any("Gram blocks of its gradient constraints" in note and "both kinds solved by CG" in note
               for note in solved.notes)
    assert float((solved.x - few_truth.reshape(few_truth.shape[0], -1)).abs().max()) <= LAYER_AGREEMENT
    kept = systems.solve_layer(full, "hybrid", torch.float64, label="layer")
    assert kept.solver == "direct" and any("gradient constraints left out" in note for note in kept.notes)
