"""rconv.attack.constraints: the two constraint matrices against PyTorch's own convolution and its weight
gradient, the counting bound min_filters, and the shapes the builders refuse."""
import pytest
import torch
import torch.nn.functional as F

import rconv_core as rc
from rconv.common.geometry import conv_output_size, covered_size

GEOMETRIES = [(k, s, p) for k in (3, 5, 7) for s in (1, 2) for p in range(k // 2 + 1)]


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_grad_constraints_reproduce_the_weight_gradient(kernel, stride, padding):
    generator = torch.Generator().manual_seed(kernel * 100 + stride * 10 + padding)
    x = torch.rand(1, 3, 11, 9, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, generator=generator)
    out = F.conv2d(x, weight, stride=stride, padding=padding)
    output_grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    weight_grad = torch.nn.grad.conv2d_weight(x, weight.shape, output_grad, stride=stride, padding=padding)
    matrix = rc.grad_constraints(output_grad[0], (11, 9), kernel, stride, padding)
    assert matrix.shape == (4 * kernel * kernel, 11 * 9)
    for c in range(3):
        torch.testing.assert_close(matrix @ x[0, c].flatten(), weight_grad[:, c].flatten(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES)
def test_weight_constraints_reproduce_the_convolution(kernel, stride, padding):
    generator = torch.Generator().manual_seed(kernel * 100 + stride * 10 + padding)
    x = torch.rand(1, 2, 10, 12, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, 2, kernel, kernel, dtype=torch.float64, generator=generator)
    bias = torch.randn(5, dtype=torch.float64, generator=generator)
    out = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    matrix = rc.weight_constraints(weight, (10, 12), stride, padding)
    assert matrix.shape == (out[0].numel(), x[0].numel())
    rows = matrix @ x[0].flatten() + bias.repeat_interleave(out.shape[2] * out.shape[3])
    torch.testing.assert_close(rows, out[0].flatten(), rtol=1e-12, atol=1e-12)


def test_rectangular_kernels_and_strides():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 9, 13, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, 1, 3, 5, dtype=torch.float64, generator=generator)
    out = F.conv2d(x, weight, stride=(1, 2), padding=(1, 2))
    output_grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    weight_grad = torch.nn.grad.conv2d_weight(x, weight.shape, output_grad, stride=(1, 2), padding=(1, 2))
    matrix = rc.grad_constraints(output_grad[0], (9, 13), (3, 5), (1, 2), (1, 2))
    torch.testing.assert_close(matrix @ x[0, 0].flatten(), weight_grad[:, 0].flatten())
    torch.testing.assert_close(rc.weight_constraints(weight, (9, 13), (1, 2), (1, 2)) @ x.flatten(), out.flatten())


def test_constraint_builders_check_shapes():
    with pytest.raises(rc.RConvError, match=r"output_grad must have shape \(F, P, Q\)"):
        rc.grad_constraints(torch.zeros(4, 8), (8, 8), 3, padding=1)
    with pytest.raises(rc.RConvError, match="output_grad is 5x5, but a 3x3 kernel .* gives 8x8"):
        rc.grad_constraints(torch.zeros(2, 5, 5), (8, 8), 3, padding=1)
    with pytest.raises(rc.RConvError, match=r"weight must have shape \(F, C, kh, kw\)"):
        rc.weight_constraints(torch.zeros(2, 3, 3), (8, 8))
    with pytest.raises(rc.RConvError, match="does not fit"):
        rc.weight_constraints(torch.zeros(2, 1, 5, 5), (3, 3))


def test_min_filters_is_the_rank_threshold():
    """At the counting bound a generic output gradient gives full rank; one filter fewer cannot."""
    for size, kernel, stride, padding in [(16, 5, 2, 2), (12, 3, 1, 1), (16, 7, 2, 3)]:
        need = rc.min_filters(size, kernel, stride, padding)
        out = (size + 2 * padding - kernel) // stride + 1
        generator = torch.Generator().manual_seed(need)
        for filters, full in ((need, True), (need - 1, False)):
            grad = torch.randn(filters, out, out, dtype=torch.float64, generator=generator)
            rank = torch.linalg.matrix_rank(rc.grad_constraints(grad, (size, size), kernel, stride, padding))
            assert (int(rank) == size * size) == full


@pytest.mark.parametrize("size,kernel,stride,padding,filters", [(12, 3, 2, 1, 16), (12, 3, 1, 1, 4), (16, 5, 2, 2, 3),
                                                                  (10, 3, 2, 0, 40)])
def test_max_equations_is_the_gradient_constraints_rank_for_a_generic_output_gradient(size, kernel, stride, padding,
                                                                                       filters):
    """Counted per stride residue class, the bound is what a random output gradient reaches: a stride-2 3x3 layer's
    odd rows and columns meet one kernel offset each, so 16 filters give 116 equations for 144 pixels, not 144."""
    from rconv.attack.constraints import max_equations
    out = (size + 2 * padding - kernel) // stride + 1
    grad = torch.randn(filters, out, out, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    rank = int(torch.linalg.matrix_rank(rc.grad_constraints(grad, (size, size), kernel, stride, padding)))
    assert max_equations(1, (size, size), kernel, stride, padding, filters, 0) == rank
    assert max_equations(3, (size, size), kernel, stride, padding, filters, 7) == 3 * rank + 7
    if (size, kernel, stride, filters) == (12, 3, 2, 16):
        assert rank == 116


def test_counting_sees_the_residue_classes_a_stride_splits():
    """A plain net, not a preset: 9,216 gradient constraints for 9,216 unknowns on its stride-2 second layer, but
    its odd rows and columns meet too few of them; counting once called it recoverable, and the attack found rank
    6,439."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 64, 3, 2, 1), torch.nn.Sigmoid(), torch.nn.Conv2d(64, 16, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3), torch.nn.Sigmoid(), torch.nn.Flatten(), torch.nn.Linear(256, 10))
    report = rc.constraint_report(model, (1, 24, 24))
    assert report.max_equations[1] == 64 * 116 + 576 < report.unknowns[1] == 9216
    assert not report.attrs["recoverable"]
    assert "conv layer 2 has 9,216 unknowns and at most 8,000 equations" in report.attrs["verdict"]


@pytest.mark.parametrize("kernel,stride,padding", GEOMETRIES + [(1, 2, 0), (2, 3, 0)])
def test_the_covered_size_holds_every_pixel_a_kernel_reaches_and_keeps_the_output(kernel, stride, padding):
    """The weight matrix's columns that some row reads are the covered part's, exactly, and the conv of that part
    has the same output; where the unread pixels are not a bottom and right border (a kernel below its stride
    leaves gaps) there is no such part."""
    size = (11, 12)
    read = rc.weight_constraints(torch.ones(1, 1, kernel, kernel), size, stride, padding).abs().sum(0).view(size) > 0
    covered = covered_size(size, kernel, stride, padding)
    if covered is None:
        assert kernel < stride and not bool(read.all())
        return
    assert bool(read[:covered[0], :covered[1]].all()) and int(read.sum()) == covered[0] * covered[1]
    assert conv_output_size(covered, kernel, stride, padding) == conv_output_size(size, kernel, stride, padding)
