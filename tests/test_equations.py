"""rconv.attack.equations: a layer's equations, here the weight constraints' Gram matrix over the known rows."""
import numpy as np
import pytest
import torch


@pytest.mark.parametrize("input_shape, weight_shape, stride, padding", [
    ((24, 8, 8), (32, 24, 5, 5), 2, 2),  # lenet_batch's second layer's geometry, fewer filters, a smaller input
    ((5, 17, 15), (7, 5, 3, 4), (2, 3), (1, 2)),  # uneven everything
])
def test_the_patch_gram_is_the_sparse_product(input_shape, weight_shape, stride, padding):
    """M^T M over the known rows from the kernels' patches equals the sparse product it replaces."""
    from rconv.attack.equations import WeightSystem
    from rconv.common.geometry import pair
    generator = torch.Generator().manual_seed(3)
    system = WeightSystem(torch.randn(*weight_shape, generator=generator, dtype=torch.float64), input_shape,
                          pair(stride), pair(padding))
    for known in (torch.rand(system.shape[0], generator=generator) < 0.6, torch.ones(system.shape[0], dtype=torch.bool)):
        selected = system.sparse(known)
        expected = (selected.T @ selected).toarray()  # what _product_gram computes
        assert np.abs(system._patch_gram(known).toarray() - expected).max() <= 1e-12 * np.abs(expected).max()
