"""client_gradients on a mini-batch: the mean-reduced cross-entropy gradients, one label per image,
while a single image's gradients stay what they were, bit for bit."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rconv_core as rc


@pytest.fixture(scope="module")
def lenet():
    return rc.build_model("lenet_c10", 3, 10)


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def reference(model, images, labels, dtype):
    """The gradients as a client computes them by hand: the model in `dtype`, mean cross-entropy."""
    client = copy.deepcopy(model).to(dtype)
    loss = F.cross_entropy(client(images.to(dtype)), torch.as_tensor(labels).reshape(-1))
    return torch.autograd.grad(loss, list(client.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_batch_gives_the_mean_loss_gradients(lenet, images, dtype):
    labels = torch.tensor([3, 0, 3, 9])
    grads = rc.client_gradients(lenet, images, labels, dtype=dtype)
    for got, expected in zip(grads, reference(lenet, images, labels, dtype)):
        assert got.dtype == dtype
        assert torch.equal(got, expected)
    # the mean loss's gradient is the mean of the images' gradients
    singles = [rc.client_gradients(lenet, image, int(label), dtype=torch.float64) for image, label in zip(images, labels)]
    if dtype == torch.float64:
        for k, got in enumerate(grads):
            mean = torch.stack([single[k] for single in singles]).mean(0)
            assert torch.allclose(got, mean, rtol=1e-10, atol=1e-14)


def test_one_image_is_unchanged_bit_for_bit(lenet, images):
    for shape in ((3, 32, 32), (1, 3, 32, 32)):
        image = images[0].reshape(shape)
        for label in (7, torch.tensor(7), torch.tensor([7]), np.int64(7)):
            grads = rc.client_gradients(lenet, image, label, dtype=torch.float64)
            for got, expected in zip(grads, reference(lenet, images[:1], [7], torch.float64)):
                assert torch.equal(got, expected)


def test_labels_may_be_a_list_or_numpy(lenet, images):
    expected = rc.client_gradients(lenet, images[:2], torch.tensor([1, 2]), dtype=torch.float64)
    for labels in ([1, 2], (1, 2), np.array([1, 2])):
        got = rc.client_gradients(lenet, images[:2], labels, dtype=torch.float64)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("labels,problem", [
    (1, r"got a single label for a batch of 4 images; pass one image with one label, or labels of shape \(4,\)"),
    (torch.tensor(1), "got a single label for a batch of 4 images"),
    ([1, 2, 3], "a batch of 4 images needs 4 labels, one per image; got 3"),
    (torch.tensor([[1, 2], [3, 4]]), r"labels must be whole numbers \(class indices\) of shape \(4,\); got a tensor "
                                     r"of torch.int64 with shape \(2, 2\)"),
    (torch.tensor([1.0, 2.0, 3.0, 4.0]), "labels must be whole numbers"),
    ([1, 2, 2.5, 3], "label must be a whole number"),
    ([1, 2, True, 3], "label must be a whole number"),
    ([0, 1, 10, 2], r"label 10 \(image 2\) is out of range for a model with 10 classes \(0..9\)"),
    ([0, -1, 1, 2], r"label -1 \(image 1\) is out of range"),
    (None, "labels must be a sequence of 4 whole numbers"),
])
def test_a_batch_refuses_bad_labels(lenet, images, labels, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.client_gradients(lenet, images, labels)


def test_a_batch_refuses_images_the_model_cannot_take(lenet, images):
    with pytest.raises(rc.RConvError, match="the model was built for 32x32 images; the image is 28x28"):
        rc.client_gradients(lenet, torch.rand(2, 3, 28, 28), [1, 2])
    with pytest.raises(rc.RConvError, match="first conv layer takes 3 channels; the image has 1"):
        rc.client_gradients(lenet, torch.rand(2, 1, 32, 32), [1, 2])
    with pytest.raises(rc.RConvError, match=r"one image of shape \(C, H, W\) or a batch \(N, C, H, W\); "
                                            r"got shape \(0, 3, 32, 32\)"):
        rc.client_gradients(lenet, images[:0], [])
    with pytest.raises(rc.RConvError, match=r"got shape \(1, 2, 3, 32, 32\)"):
        rc.client_gradients(lenet, images[None, :2], [1, 2])
    with pytest.raises(rc.RConvError, match="the image must be a real floating-point tensor"):
        rc.client_gradients(lenet, (images * 255).to(torch.uint8), [1, 2, 3, 4])
