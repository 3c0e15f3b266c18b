"""reconstruct through pooled conv layers: exact where the pool's pattern is known (no activation before an
average pool), honestly not certified where the search for it fails, refused for a batch.

Small networks that are not among the presets, seeded PyTorch init, random images in [0, 1].
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rconv_core as rc

EXACT_64 = 1e-6  # the brief's bar for float64: max abs error


def _gradients(model, image, label, dtype):
    return rc.client_gradients(model, image, label, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_average_pool_without_activation_is_inverted_exactly(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.AvgPool2d(2), nn.Conv2d(24, 12, 3, padding=1),
                          nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(12 * 4 * 4, 5))
    image = torch.rand(3, 8, 8)
    result = rc.reconstruct(model, _gradients(model, image, 2, dtype), image.shape)
    assert result.layers[0].method == "gradients+weights+pattern"
    assert result.exact, result.reasons
    error = float((result.image[0] - image.double()).abs().max())
    assert error <= result.error_bound
    if dtype == torch.float64:
        assert error <= EXACT_64


class _Tutorial(nn.Module):
    """PyTorch's CIFAR10 tutorial net, scaled to 16 px: conv-ReLU-MaxPool twice, then an MLP head."""

    def __init__(self, filters=16):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, filters, 3)
        self.fc1, self.fc2 = nn.Linear(filters * 2 * 2, 20), nn.Linear(20, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def test_a_pool_whose_pattern_is_not_found_is_reported_not_exact():
    torch.manual_seed(0)
    model, image = _Tutorial(), torch.rand(3, 14, 14)
    result = rc.reconstruct(model, _gradients(model, image, 1, torch.float64), image.shape)
    _, features = rc.layer_inputs(model, image)
    assert not result.exact and result.error_bound == float("inf")
    assert (result.features - features.flatten()).abs().max() <= EXACT_64  # the head's input is exact all the same
    assert any(reason.startswith("conv layer 1 (gradients+weights+pattern): not certified") for reason in
               result.reasons)
    assert [report.method for report in result.layers] == ["gradients+weights+pattern"] * 2


def test_below_a_pooled_layer_that_is_not_determined_no_pattern_is_searched():
    torch.manual_seed(0)
    model, image = _Tutorial(filters=2), torch.rand(3, 14, 14)  # conv layer 2: 216 unknowns, 124 equations
    result = rc.reconstruct(model, _gradients(model, image, 1, torch.float64), image.shape)
    assert not result.exact and result.layers[0].stopped == "the layer above it was not determined"
    assert "conv layer 1 (model.conv1): its pool's pattern not searched: the layer above it was not determined" in \
        result.notes


def test_a_batch_through_a_pool_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    images = torch.rand(2, 3, 8, 8)
    grads = rc.client_gradients(model, images, [0, 3], dtype=torch.float64)
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): its activation is pooled"):
        rc.reconstruct(model, grads, (3, 8, 8))


def test_below_an_undetermined_pooled_layer_the_image_is_estimated_from_the_exact_data_above():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 4))
    image = torch.rand(3, 8, 8)
    result = rc.reconstruct(model, _gradients(model, image, 1, torch.float64), image.shape)
    assert not result.exact and "tanh before an average pool" in result.layers[0].stopped
    assert any(note.startswith("below the last determined layer the image is an estimate") for note in result.notes)
    assert rc.image_metrics(image, result.image[0])["psnr"] >= 40  # the solve alone leaves zeros: about 5 dB
    assert 0.0 <= float(result.image.min()) and float(result.image.max()) <= 1.0


def test_a_pooled_layer_counting_cannot_determine_is_not_searched():
    """Global average pooling leaves 16 pooled values and 16*9 gradient constraints per channel for 3*16*16
    unknowns: no pattern can determine them, so the search (half a minute at 32 px) is skipped, saying why."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 5))
    image = torch.rand(3, 16, 16)
    result = rc.reconstruct(model, _gradients(model, image, 2, torch.float64), image.shape)
    assert not result.exact
    assert "it has 768 unknowns and at most 448 equations under any pattern" in result.reasons[0]
    assert any("pattern not searched" in note for note in result.notes)
