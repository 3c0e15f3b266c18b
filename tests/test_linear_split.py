"""rconv.split.linear: split_linear against known features: a mini-batch's Linear-layer input, contributions and labels
recovered exactly from its mean gradients, and honest statuses where they cannot be."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rconv_core as rc
from rconv.split.linear import gradient_rank, track_split

# The network of the prototype's measurements: N = 12 x 8 x 8 = 768 features, PyTorch's initialisation.
CHANNELS, STRIDES = (12, 16, 12, 12), (2, 2, 1, 1)
ACTIVATIONS = ("leaky_relu", "leaky_relu", "relu", "relu")
# What "exact" means per precision: the largest error relative to the member's largest feature.
TARGET = {torch.float64: 1e-6, torch.float32: 1e-3}
DTYPES = [torch.float64, torch.float32]


@pytest.fixture(scope="module")
def data(packs):
    """The first 100 training images and labels of each dataset (CIFAR packs: label index % K)."""
    return {name: rc.load_images(name, range(100), root=packs) for name in ("cifar100", "cifar10", "mnist")}


def default_model(dataset, seed=0):
    info = rc.dataset_info(dataset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return rc.ConvNet(CHANNELS, STRIDES, ACTIVATIONS, info["channels"], info["num_classes"])


def batch(size, seed=0):
    """A batch of distinct images of the first 100, as the prototype's measurements drew them."""
    return np.random.default_rng(seed).choice(100, size=size, replace=False).tolist()


def distinct_labels(data, dataset, size, seed=0):
    """A batch whose labels are all different, drawn in the same random order."""
    labels, chosen, seen = data[dataset][1], [], set()
    for index in np.random.default_rng(seed).permutation(100).tolist():
        if int(labels[index]) not in seen and len(chosen) < size:
            chosen.append(index)
            seen.add(int(labels[index]))
    return chosen


class Truth:
    """A batch's gradients and what the client knew: features (forward hook), deltas / B, labels."""

    def __init__(self, model, images, labels, dtype):
        labels = torch.as_tensor(labels)
        client = model.to(dtype)
        seen = {}
        hook = client[-1].register_forward_hook(lambda module, inputs, output: seen.update(a=inputs[0].detach()))
        logits = client(images.to(dtype))
        hook.remove()
        linear = client[-1]
        loss = F.cross_entropy(logits, labels, reduction="mean")
        self.weight_grad, self.bias_grad = torch.autograd.grad(loss, [linear.weight, linear.bias])
        self.weight, self.bias = linear.weight.detach(), linear.bias.detach()
        self.features = seen["a"].double()
        self.contributions = ((torch.softmax(logits.detach(), 1) - F.one_hot(labels, logits.shape[1])) /
                              len(labels)).double()
        self.labels, self.dtype = labels, dtype
        model.float()

    def split(self, **options):
        return rc.split_linear(self.weight_grad, self.bias_grad, self.weight, self.bias, dtype=self.dtype, **options)


def truth(model, data, dataset, indices, dtype, labels=None):
    images, known = data[dataset]
    return Truth(model, images[indices], known[indices] if labels is None else labels, dtype)


def errors(result, true):
    """For each true member: the recovered feature closest to it, and its relative error."""
    gaps = torch.cdist(true.features, result.features, p=float("inf"))
    nearest = gaps.argmin(1)
    return nearest, gaps.min(1).values / true.features.abs().amax(1)


def assert_exact(result, true):
    nearest, relative = errors(result, true)
    target = TARGET[true.dtype]
    assert relative.max() <= target, f"feature errors {relative.tolist()}"
    assert torch.equal(result.labels[nearest], true.labels)
    scale = true.contributions.abs().max()
    for member in torch.unique(nearest):
        mine = nearest == member  # identical images share one row, their contributions summed
        assert (result.contributions[member] - true.contributions[mine].sum(0)).abs().max() <= target * scale
        assert int(result.multiplicities[member]) == int(mine.sum())
    assert result.batch_size == len(true.labels)


# -----------------------------------------------------------------------------------------------------
# exact recovery

@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("size", [1, 2, 4, 8])
@pytest.mark.parametrize("dataset", ["cifar100", "cifar10", "mnist"])
def test_every_member_is_recovered(data, dataset, size, dtype):
    """Distinct labels (duplicates: see test_duplicate_labels); CIFAR100 batches have them anyway."""
    true = truth(default_model(dataset), data, dataset, distinct_labels(data, dataset, size), dtype)
    result = true.split()
    assert result.status in ("ok", "imprecise"), result.reasons
    if dtype == torch.float64:
        assert result.status == "ok"
    assert result.rank == size and result.reasons == []
    assert result.features.dtype == result.contributions.dtype == result.error_bars.dtype == torch.float64
    assert result.labels.dtype == result.multiplicities.dtype == torch.int64
    assert result.features.shape == (size, 768) and result.contributions.shape == (size, len(true.bias))
    assert_exact(result, true)
    if result.status == "ok":  # "ok" promises error bars within the target
        assert result.error_bars.max() <= TARGET[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_one_image_gives_the_single_image_formula_bit_for_bit(data, dtype):
    images, labels = data["cifar10"]
    model = default_model("cifar10")
    grads = rc.client_gradients(model, images[3], labels[3], dtype=dtype)
    result = rc.split_linear(grads[-2], grads[-1], model[-1].weight, model[-1].bias, dtype=dtype)
    bias_grad, weight_grad = grads[-1].double(), grads[-2].double()
    features = bias_grad @ weight_grad / float(bias_grad @ bias_grad)  # what reconstruct() computes
    assert torch.equal(result.features[0], features)
    assert torch.equal(result.contributions[0], grads[-1].double())
    assert (result.status, result.batch_size, result.rank, result.labels.tolist()) == ("ok", 1, 1, [int(labels[3])])
    assert "single-image formula" in result.notes[0]


def test_the_batch_size_given_is_checked_not_trusted(data):
    true = truth(default_model("cifar100"), data, "cifar100", [0, 1, 2, 3], torch.float64)
    agreed = true.split(batch_size=4)
    assert agreed.status == "ok" and agreed.batch_size == 4
    assert_exact(agreed, true)
    larger = true.split(batch_size=5)
    assert larger.status == "fail" and larger.batch_size == 4
    assert larger.reasons == ["batch_size=5 was given, but the gradients' scales say 4 image(s)"]
    smaller = true.split(batch_size=3)
    assert smaller.status == "fail"
    assert "batch_size=3 was given, but the gradient has rank 4: at least 4 distinct images" in smaller.reasons


# -----------------------------------------------------------------------------------------------------
# what cannot be split, reported

def test_a_batch_of_k_or_more_images_fails_with_its_reason(data):
    true = truth(default_model("mnist"), data, "mnist", batch(12), torch.float64)
    result = true.split(batch_size=12)
    assert result.status == "fail" and result.rank == 9
    assert result.reasons == ["B >= K: 12 images for 10 classes cannot be told apart (rank 9)"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset,size,dtype", [("cifar10", 12, torch.float64), ("mnist", 10, torch.float32),
                                                ("cifar10", 16, torch.float32)])
def test_a_batch_of_k_or_more_images_is_never_ok_even_unannounced(data, dataset, size, dtype):
    true = truth(default_model(dataset), data, dataset, batch(size), dtype)
    result = true.split()
    assert result.status == "fail" and result.rank == 9
    assert any("K - 1" in reason for reason in result.reasons), result.reasons


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_identical_images_with_one_label_share_a_feature(data, dtype):
    indices = [10, 11, 12, 13, 14, 15, 16, 10]
    true = truth(default_model("cifar100"), data, "cifar100", indices, dtype)
    result = true.split()
    assert result.status == "ok" and result.rank == 7 and result.batch_size == 8
    assert sorted(result.multiplicities.tolist()) == [1] * 6 + [2]
    assert any("identical images" in note for note in result.notes)
    assert_exact(result, true)


def test_identical_images_with_different_labels_fail(data):
    indices = [10, 11, 12, 13, 14, 15, 16, 10]
    labels = [10, 11, 12, 13, 14, 15, 16, 42]
    result = truth(default_model("cifar100"), data, "cifar100", indices, torch.float64, labels).split()
    assert result.status == "fail"
    assert any("merged images with different labels" in reason for reason in result.reasons), result.reasons


def test_a_batch_of_one_image_repeated_needs_the_batch_size(data):
    true = truth(default_model("cifar100"), data, "cifar100", [5, 5, 5], torch.float64)
    alone = true.split()  # the mean of three equal gradients is one image's gradient
    assert (alone.status, alone.batch_size, alone.multiplicities.tolist()) == ("ok", 1, [1])
    told = true.split(batch_size=3)
    assert (told.status, told.batch_size, told.multiplicities.tolist()) == ("ok", 3, [3])
    assert any("the scales alone would say 1 image(s)" in note for note in told.notes)
    assert_exact(told, true)


@pytest.mark.parametrize("dataset,indices,labels,dtype", [
    ("cifar100", [1, 2, 3, 4], [7, 7, 7, 7], torch.float64),
    ("cifar100", [1, 2, 3, 4], [7, 7, 7, 7], torch.float32),
    ("cifar100", list(range(8)), [3, 9] * 4, torch.float64),
    ("cifar100", list(range(8)), [3, 9] * 4, torch.float32),
    ("cifar10", [0, 1, 10, 11], [0, 1, 0, 1], torch.float64),
    ("cifar10", [0, 1, 10, 11], [0, 1, 0, 1], torch.float32),
], ids=["all-equal-f64", "all-equal-f32", "two-labels-f64", "two-labels-f32", "k10-pairs-f64", "k10-pairs-f32"])
def test_duplicate_labels(data, dataset, indices, labels, dtype):
    """Same-label contributions differ only by softmax deviations: exact in float64, and in float32
    either exact or reported as not ok (never a wrong answer called ok)."""
    true = truth(default_model(dataset), data, dataset, indices, dtype, labels)
    result = true.split()
    if dtype == torch.float64:
        assert result.status == "ok", result.reasons
    if result.status in ("ok", "imprecise"):
        assert_exact(result, true)
    else:
        assert result.status == "fail" and result.reasons


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
def test_random_batches_of_ten_classes_in_float32_are_never_wrongly_ok(data, dataset, seed):
    """Random batches of 8 repeat labels (up to 3 images per class): same-label contributions differ
    by ~1e-4, so float32 rounding costs up to 1e-2 in their features. Whatever the status, it is honest."""
    true = truth(default_model(dataset), data, dataset, batch(8, seed), torch.float32)
    result = true.split()
    if result.status == "ok":
        assert_exact(result, true)
    elif result.status == "imprecise":
        nearest, relative = errors(result, true)
        assert torch.equal(result.labels[nearest], true.labels) and result.batch_size == 8
        # the checks allow 30 error bars; the bars are estimates (measured up to 8x below the error)
        assert torch.all(relative <= 30 * result.error_bars[nearest])
    else:
        assert result.status == "fail" and result.reasons


# -----------------------------------------------------------------------------------------------------
# the paper's U(-0.5, 0.5) initialisation: a saturated softmax

def paper_model(classes):
    return rc.build_model("lenet", 3, classes)


def test_saturated_but_distinct_members_are_recovered(data):
    true = truth(paper_model(100), data, "cifar100", [0, 1, 2, 3], torch.float64)
    result = true.split()
    assert result.status == "ok", result.reasons
    assert_exact(result, true)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_saturated_members_merged_by_their_prediction_are_partial(data, dtype):
    # images 95 and 45 share label 5 and the prediction 2 with p ~ 1: identical deltas, one row
    true = truth(paper_model(10), data, "cifar10", [74, 50, 95, 45], dtype)
    result = true.split()
    assert (result.status, result.rank, result.batch_size) == ("partial", 3, 4)
    assert sorted(result.multiplicities.tolist()) == [1, 1, 2]
    assert any("merged by the saturated softmax" in note for note in result.notes)
    nearest, relative = errors(result, true)
    for member, error in zip(nearest[:2], relative[:2]):  # the two images of multiplicity 1
        assert result.multiplicities[member] == 1 and error <= TARGET[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_an_invisible_saturated_member_is_counted_not_recovered(data, dtype):
    true = truth(paper_model(10), data, "cifar10", [49, 3, 74, 94, 45], dtype)
    result = true.split()
    assert (result.status, result.batch_size, len(result.features)) == ("partial", 5, 4)
    assert any("1 image(s) with ~zero gradient" in note for note in result.notes)
    nearest, relative = errors(result, true)
    recovered = relative <= TARGET[dtype]
    assert recovered.sum() == 4  # every member but the invisible one
    assert torch.equal(result.labels[nearest[recovered]], true.labels[recovered])


# -----------------------------------------------------------------------------------------------------
# bad input

@pytest.fixture(scope="module")
def small():
    true = Truth(default_model("cifar10"), torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                 [1, 2], torch.float64)
    return true.weight_grad, true.bias_grad, true.weight, true.bias


@pytest.mark.parametrize("change,problem", [
    (dict(dtype=torch.float16), "dtype=float16 is not supported"),
    (dict(dtype="bfloat16"), "dtype=bfloat16 is not supported"),
    (dict(dtype=torch.int32), "real floating dtype"),
    (dict(batch_size=0), "batch_size must be None"),
    (dict(batch_size=True), "batch_size must be None"),
    (dict(batch_size=2.0), "batch_size must be None"),
    (dict(time_limit=0), "time_limit must be a number > 0"),
    (dict(time_limit=float("nan")), "time_limit must be a number > 0"),
    (dict(noise=-1e-9), "noise must be a finite number >= 0"),
    (dict(noise=float("inf")), "noise must be a finite number >= 0"),
])
def test_refuses_bad_options(small, change, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.split_linear(*small, **{"dtype": torch.float64, **change})


def test_refuses_bad_tensors(small):
    weight_grad, bias_grad, weight, bias = small
    cases = [((weight_grad[:, :5], bias_grad, weight, bias), r"weight has shape \(10, 768\); expected \(10, 5\)"),
             ((weight_grad, bias_grad[:3], weight, bias), r"bias_grad has shape \(3,\); expected \(10,\)"),
             ((weight_grad, bias_grad, weight, bias[None]), r"bias has shape \(1, 10\)"),
             ((weight_grad[0], bias_grad, weight, bias), r"weight_grad must be a \(K, N\) tensor"),
             ((weight_grad.numpy(), bias_grad, weight, bias), "weight_grad must be a \\(K, N\\) tensor"),
             ((weight_grad, bias_grad, weight.long(), bias), "weight must be a floating-point tensor"),
             ((weight_grad, bias_grad.tolist(), weight, bias), "bias_grad must be a torch tensor"),
             ((weight_grad * float("nan"), bias_grad, weight, bias), "weight_grad holds NaN"),
             ((weight_grad[:1], bias_grad[:1], weight[:1], bias[:1]), "at least 2 classes")]
    for arguments, problem in cases:
        with pytest.raises(rc.RConvError, match=problem):
            rc.split_linear(*arguments, dtype=torch.float64)


def test_a_zero_gradient_is_a_failure_with_a_reason(small):
    weight_grad, bias_grad, weight, bias = small
    result = rc.split_linear(weight_grad * 0, bias_grad * 0, weight, bias, dtype=torch.float64)
    assert result.status == "fail" and result.features.shape == (0, 768)
    assert "the gradient is zero" in result.reasons[0]


def scaled_shares(seed=2):
    """Two images' gradients each scaled on its own (as DP-SGD's per-sample clipping does): no whole
    multiplicities, so that stage A's answer fails the checks and stage B searches."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    model = default_model("cifar10")
    one, two = (Truth(model, images[n:n + 1], [n + 1], torch.float64) for n in range(2))
    return 0.37 * one.weight_grad + 0.81 * two.weight_grad, 0.37 * one.bias_grad + 0.81 * two.bias_grad, \
        one.weight, one.bias


def test_the_vertex_search_stops_at_its_time_limit_with_a_reason():
    weight_grad, bias_grad, weight, bias = scaled_shares()
    searched = rc.split_linear(weight_grad, bias_grad, weight, bias, dtype=torch.float64)
    assert len(searched.features) == 2 and "stage B" in searched.notes[0]
    assert not any("time limit" in reason for reason in searched.reasons)
    stopped = rc.split_linear(weight_grad, bias_grad, weight, bias, dtype=torch.float64, time_limit=1e-9)
    assert stopped.status == "fail"
    assert any("stopped at its time limit of 1e-09 s" in reason for reason in stopped.reasons)


def test_noise_in_the_gradients_does_not_count_as_images(small):
    weight_grad, bias_grad, weight, bias = small
    size = float(torch.cat([weight_grad.flatten(), bias_grad]).pow(2).mean().sqrt())
    generator = torch.Generator().manual_seed(0)
    noise = 1e-9 * size  # far above float64's rounding, far below the two images' singular values
    noisy = (weight_grad + noise * torch.randn(weight_grad.shape, generator=generator, dtype=torch.float64),
             bias_grad + noise * torch.randn(bias_grad.shape, generator=generator, dtype=torch.float64))
    assert gradient_rank(*noisy, weight, bias, dtype=torch.float64) > 2
    assert gradient_rank(*noisy, weight, bias, dtype=torch.float64, noise=noise) == 2
    result = rc.split_linear(*noisy, weight, bias, dtype=torch.float64, noise=noise)
    assert result.rank == 2 and len(result.features) == 2 and result.batch_size == 2


def test_gradients_within_their_noise_hold_nothing_to_split(small):
    weight_grad, bias_grad, weight, bias = small
    result = rc.split_linear(weight_grad, bias_grad, weight, bias, dtype=torch.float64,
                             noise=float(weight_grad.abs().max()))
    assert result.status == "fail" and "within the errors its entries may carry" in result.reasons[0]


def test_a_row_space_without_a_nonnegative_vector_stops_the_search(small):
    """Noise on every coordinate (DP-SGD's) leaves no feature a ReLU could give: the search says so at once."""
    weight_grad, bias_grad, weight, bias = small
    generator = torch.Generator().manual_seed(1)
    noisy = weight_grad + weight_grad.abs().max() * torch.randn(weight_grad.shape, generator=generator,
                                                                  dtype=torch.float64)
    result = rc.split_linear(noisy, bias_grad, weight, bias, dtype=torch.float64)
    assert result.status == "fail" and any("holds no nonnegative vector" in reason for reason in result.reasons)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_come_back_on_their_device(data):
    true = truth(default_model("cifar100"), data, "cifar100", [0, 1, 2, 3], torch.float64)
    on_cpu = true.split()
    on_gpu = rc.split_linear(true.weight_grad.cuda(), true.bias_grad.cuda(), true.weight.cuda(), true.bias.cuda(),
                             dtype=torch.float64)
    assert on_gpu.features.device.type == "cuda" and on_gpu.status == on_cpu.status == "ok"
    assert torch.allclose(on_gpu.features.cpu(), on_cpu.features, rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------------------------------
# the error bound's probe: members followed into perturbed gradients

def test_gradient_rank_counts_the_distinct_images(data):
    true = truth(default_model("cifar100"), data, "cifar100", distinct_labels(data, "cifar100", 4), torch.float64)
    assert gradient_rank(true.weight_grad, true.bias_grad, true.weight, true.bias, dtype=torch.float64) == 4


def test_tracking_follows_each_member_in_order(data):
    true = truth(default_model("cifar100"), data, "cifar100", distinct_labels(data, "cifar100", 4), torch.float64)
    split = true.split()
    zeros = [(f.abs() <= 1e-9 * f.abs().max()).numpy() for f in split.features]
    noise = torch.randn(true.weight_grad.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noisy = true.weight_grad + 1e-9 * true.weight_grad.norm() * noise / noise.norm()
    tracked = track_split(noisy, true.bias_grad, true.weight, true.bias, dtype=torch.float64, zeros=zeros)
    moved = (tracked.features - split.features).abs().amax(1) / split.features.abs().amax(1)
    assert tracked.features.shape == split.features.shape and torch.equal(tracked.labels, split.labels)
    assert (moved > 0).all() and (moved < 1e-6).all()  # the same members, in the same order, moved by the noise
    # its zeros stay zeros to the noise's order (a least-squares null vector of the noisy row space)
    assert all(f[torch.as_tensor(z)].abs().max() <= 1e-7 * f.abs().max() for f, z in zip(tracked.features, zeros))
    # a mask with too few zeros cannot pin its member
    assert track_split(noisy, true.bias_grad, true.weight, true.bias, dtype=torch.float64,
                       zeros=[np.zeros(768, dtype=bool)] * 4) is None
