"""rconv.cases.client: client_gradients on one image or a mini-batch (the mean-reduced cross-entropy gradients,
one label per image; a single image's bit for bit as a client computes them), and its refusals of bad arguments."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rconv_core as rc


@pytest.fixture(scope="module")
def images():
    """Four random CIFAR-sized images (seed 11)."""
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))


def reference(model, images, labels, dtype):
    """The gradients as a client computes them by hand: the model in `dtype`, mean cross-entropy."""
    client = copy.deepcopy(model).to(dtype)
    loss = F.cross_entropy(client(images.to(dtype)), torch.as_tensor(labels).reshape(-1))
    return torch.autograd.grad(loss, list(client.parameters()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_batch_gives_the_mean_loss_gradients(lenet_c10, images, dtype):
    labels = torch.tensor([3, 0, 3, 9])
    grads = rc.client_gradients(lenet_c10, images, labels, dtype=dtype)
    for got, expected in zip(grads, reference(lenet_c10, images, labels, dtype)):
        assert got.dtype == dtype
        assert torch.equal(got, expected)
    # the mean loss's gradient is the mean of the images' gradients
    singles = [rc.client_gradients(lenet_c10, image, int(label), dtype=torch.float64) for image, label in zip(images, labels)]
    if dtype == torch.float64:
        for k, got in enumerate(grads):
            mean = torch.stack([single[k] for single in singles]).mean(0)
            assert torch.allclose(got, mean, rtol=1e-10, atol=1e-14)


def test_one_image_is_unchanged_bit_for_bit(lenet_c10, images):
    for shape in ((3, 32, 32), (1, 3, 32, 32)):
        image = images[0].reshape(shape)
        for label in (7, torch.tensor(7), torch.tensor([7]), np.int64(7)):
            grads = rc.client_gradients(lenet_c10, image, label, dtype=torch.float64)
            for got, expected in zip(grads, reference(lenet_c10, images[:1], [7], torch.float64)):
                assert torch.equal(got, expected)


def test_labels_may_be_a_list_or_numpy(lenet_c10, images):
    expected = rc.client_gradients(lenet_c10, images[:2], torch.tensor([1, 2]), dtype=torch.float64)
    for labels in ([1, 2], (1, 2), np.array([1, 2])):
        got = rc.client_gradients(lenet_c10, images[:2], labels, dtype=torch.float64)
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
def test_a_batch_refuses_bad_labels(lenet_c10, images, labels, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.client_gradients(lenet_c10, images, labels)


def test_a_batch_refuses_images_the_model_cannot_take(lenet_c10, images):
    with pytest.raises(rc.RConvError, match="the model was built for 32x32 images; the image is 28x28"):
        rc.client_gradients(lenet_c10, torch.rand(2, 3, 28, 28), [1, 2])
    with pytest.raises(rc.RConvError, match="first conv layer takes 3 channels; the image has 1"):
        rc.client_gradients(lenet_c10, torch.rand(2, 1, 32, 32), [1, 2])
    with pytest.raises(rc.RConvError, match=r"one image of shape \(C, H, W\) or a batch \(N, C, H, W\); "
                                            r"got shape \(0, 3, 32, 32\)"):
        rc.client_gradients(lenet_c10, images[:0], [])
    with pytest.raises(rc.RConvError, match=r"got shape \(1, 2, 3, 32, 32\)"):
        rc.client_gradients(lenet_c10, images[None, :2], [1, 2])
    with pytest.raises(rc.RConvError, match="the image must be a real floating-point tensor"):
        rc.client_gradients(lenet_c10, (images * 255).to(torch.uint8), [1, 2, 3, 4])


# ---------------------------------------------------------------------------------------------------------
# client_gradients' arguments

@pytest.mark.parametrize("label,problem", [(10, "label 10 is out of range for a model with 10 classes"),
                                           (-1, "label -1 is out of range"),
                                           (2.5, "label must be a whole number"),
                                           ("3", "label must be a whole number"),
                                           (True, "label must be a whole number"),
                                           (torch.tensor(1.0), "label must be a whole number")])
def test_client_gradients_refuses_bad_labels(lenet_c10, cifar_image, label, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.client_gradients(lenet_c10, cifar_image, label)


def test_client_gradients_refuses_images_the_model_cannot_take(lenet_c10):
    with pytest.raises(rc.RConvError, match="the model was built for 32x32 images; the image is 28x28"):
        rc.client_gradients(lenet_c10, torch.rand(3, 28, 28), 1)
    with pytest.raises(rc.RConvError, match="first conv layer takes 3 channels; the image has 1"):
        rc.client_gradients(lenet_c10, torch.rand(1, 32, 32), 1)
    plain = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
    with pytest.raises(rc.RConvError, match=r"the model cannot take an image of shape \(3, 10, 10\)"):
        rc.client_gradients(plain, torch.rand(3, 10, 10), 1)


def test_client_gradients_refuses_int_and_complex(lenet_c10, cifar_image):
    for dtype in (torch.int32, torch.complex64):
        with pytest.raises(rc.RConvError, match="real floating dtype"):
            rc.client_gradients(lenet_c10, cifar_image, 1, dtype=dtype)
    for bad in ((cifar_image * 255).to(torch.uint8), cifar_image.to(torch.complex64)):
        with pytest.raises(rc.RConvError, match="the image must be a real floating-point tensor"):
            rc.client_gradients(lenet_c10, bad, 1)


def test_gradient_dtype_by_name(lenet, cifar_image):
    by_name = rc.client_gradients(lenet, cifar_image, 2, dtype="float64")
    assert by_name[0].dtype == torch.float64
    assert torch.equal(by_name[0], rc.client_gradients(lenet, cifar_image, 2, dtype=torch.float64)[0])
    with pytest.raises(rc.RConvError, match="unknown dtype 'double64'"):
        rc.client_gradients(lenet, cifar_image, 2, dtype="double64")
    with pytest.raises(rc.RConvError, match="build_model always returns float32"):
        rc.build_model("lenet", dtype=torch.float64)


def test_an_unknown_dtype_is_named():
    with pytest.raises(rc.RConvError, match="unknown dtype 'float8'"):
        rc.as_dtype("float8")


def test_a_train_mode_batchnorm1d_given_one_image_is_refused_clearly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(rc.RConvError, match="forward pass failed.*train-mode BatchNorm needs several values per channel"):
        rc.client_gradients(model.train(), torch.rand(3, 8, 8), 2)


def test_an_image_with_nan_is_refused(lenet_c10, images):
    broken = images[0].clone()
    broken[0, 0, 0] = float("nan")
    with pytest.raises(rc.RConvError, match="the image holds NaN or infinite values"):
        rc.client_gradients(lenet_c10, broken, 1)


@pytest.mark.parametrize("head, problem", [(nn.Flatten(0), r"returns \(10,\) for 1 image"),
                                           (nn.Identity(), r"returns \(1, 3, 8, 8\) for 1 image")],
                         ids=["batch flattened", "no classifier"])
def test_a_model_whose_output_is_no_logits_is_refused(head, problem):
    layers = [nn.Flatten(0), nn.Linear(3 * 8 * 8, 10)] if isinstance(head, nn.Flatten) else [head]
    with pytest.raises(rc.RConvError, match=problem):
        rc.client_gradients(nn.Sequential(*layers), torch.rand(3, 8, 8), 2)
