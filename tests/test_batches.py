"""rconv.attack.batch_steps and rconv.studies.batches: every image and label of a mini-batch from one mean
gradient, honestly reported, and the batch sweep's table."""
import math

import pytest
import torch

import rconv_core as rc
from conftest import unpadded_stride_two

# lenet_batch's factorisations (they depend only on its weights), shared by this module's attacks.
CACHE = {}


@pytest.fixture(scope="module")
def cifar_batch(packs):
    """lenet_batch on the first 8 CIFAR100 images."""
    return rc.setup("cifar100", "lenet_batch", range(8), data_root=packs)


def attack(case, size, dtype, **options):
    images, labels = case.images[:size], case.labels[:size]
    grads = rc.client_gradients(case.model, images, labels, dtype=dtype)
    result = rc.reconstruct(case.model, grads, tuple(images.shape[1:]), cache=CACHE, **options)
    return result, rc.match_batch(images, labels, result)


@pytest.mark.parametrize("size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_a_batch_comes_back_exact_from_float64_with_its_labels(cifar_batch, size):
    result, matched = attack(cifar_batch, size, torch.float64)
    assert result.image.shape == (size, 3, 32, 32) and result.batch_size == size
    assert result.exact and result.image_exact.all() and not result.reasons
    assert (matched.table.max_abs_err <= 1e-6).all()
    assert sorted(result.labels.tolist()) == sorted(cifar_batch.labels[:size].tolist())
    assert (matched.table.label == matched.table.recovered_label).all()
    assert any("batch size inferred" in note for note in result.notes)
    assert [r.layer for r in result.layers] == [1, 2, 3, 4]
    assert all(r.unknowns == size * math.prod(s) and r.full_rank for r, s in
               zip(result.layers, [(3, 32, 32), (24, 16, 16), (128, 8, 8), (48, 8, 8)]))


@pytest.mark.slow
def test_a_batch_of_eight_from_float32_is_above_60_db(cifar_batch):
    result, matched = attack(cifar_batch, 8, torch.float32)
    assert len(result.image) == 8
    assert (matched.table.psnr >= 60).all()
    # exact claimed only within the float32 target
    claimed = matched.table[matched.table.image_exact]
    assert (claimed.max_abs_err <= 1e-3).all()


@pytest.mark.slow
def test_a_batch_reports_a_bound_that_holds_per_image(cifar_batch):
    result, matched = attack(cifar_batch, 4, torch.float64)
    assert 0 < result.error_bound <= 1e-6 and (matched.table.max_abs_err <= result.error_bound).all()
    assert all(0 < r.error_bound < math.inf for r in result.layers)


@pytest.mark.parametrize("strength", [pytest.param(1e-7, marks=pytest.mark.slow), 1e-6])
def test_noisy_batch_gradients_are_never_claimed_exact_beyond_the_bound(cifar_batch, strength):
    images, labels = cifar_batch.images[:4], cifar_batch.labels[:4]
    grads = rc.defend(rc.client_gradients(cifar_batch.model, images, labels, dtype=torch.float32), "gaussian",
                      strength)
    result = rc.reconstruct(cifar_batch.model, grads, (3, 32, 32), batch_size=4, cache=CACHE)
    matched = rc.match_batch(images, labels, result)
    claimed = matched.table[matched.table.image_exact]
    assert (claimed.max_abs_err <= min(1e-3, result.error_bound)).all()
    assert result.exact == bool(result.image_exact.all()) and (result.exact or result.reasons)


@pytest.mark.slow
def test_a_known_batch_size_gives_the_same_images(cifar_batch):
    inferred, _ = attack(cifar_batch, 2, torch.float64)
    given, _ = attack(cifar_batch, 2, torch.float64, batch_size=2)
    assert given.exact and not any("inferred" in note for note in given.notes)
    torch.testing.assert_close(torch.sort(given.image.flatten(1), 0).values,
                               torch.sort(inferred.image.flatten(1), 0).values, rtol=0, atol=1e-9)


def test_one_image_is_unchanged_by_batch_inference(cifar_batch):
    image, label = cifar_batch.images[0], cifar_batch.labels[0]
    grads = rc.client_gradients(cifar_batch.model, image, label, dtype=torch.float64)
    inferred = rc.reconstruct(cifar_batch.model, grads, (3, 32, 32), cache=CACHE)
    single = rc.reconstruct(cifar_batch.model, grads, (3, 32, 32), batch_size=1, cache=CACHE)
    assert torch.equal(inferred.image, single.image) and inferred.exact and inferred.batch_size == 1
    assert inferred.labels.tolist() == [int(label)] and inferred.image_exact.tolist() == [True]


def test_the_paper_lenet_beyond_its_bound_is_never_exact(packs):
    case = rc.setup("cifar100", "lenet", range(4), init="default", data_root=packs)
    report = rc.constraint_report(case.model, (3, 32, 32), batch_size=4)
    assert report.attrs["max_batch"] == 2 and report.max_batch.tolist()[1] == 2
    grads = rc.client_gradients(case.model, case.images, case.labels, dtype=torch.float64)
    result = rc.reconstruct(case.model, grads, (3, 32, 32))
    assert len(result.image) == 4 and not result.exact and not result.image_exact.any()
    assert any("conv layer 2" in reason and "not determined" in reason for reason in result.reasons)


def test_a_batch_of_k_or_more_images_is_reported_not_crashed():
    model = rc.build_model("lenet_batch", num_classes=3, init="default")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = rc.client_gradients(model, images, torch.tensor([0, 1, 2, 0]), dtype=torch.float64)
    result = rc.reconstruct(model, grads, (3, 32, 32))
    assert not result.exact and result.reasons
    assert result.image.dim() == 4 and len(result.image_exact) == len(result.image)


def test_counting_gives_max_batch():
    model = rc.build_model("lenet_batch", num_classes=100)
    report = rc.constraint_report(model, (3, 32, 32), batch_size=4)
    assert report.batch_size.tolist() == [4] * 4
    assert report.unknowns.tolist() == [4 * 3072, 4 * 6144, 4 * 8192, 4 * 3072]
    assert report.attrs["max_batch"] == 30  # layer 3: 128 * 1200 // (8192 - 3072)
    assert rc.constraint_report(rc.build_model("lenet_batch", num_classes=10), (3, 32, 32)).attrs["max_batch"] == 9
    with pytest.raises(rc.RConvError, match="batch_size must be a whole number >= 1; got 0"):
        rc.constraint_report(model, (3, 32, 32), batch_size=0)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_a_bad_batch_size_is_named(bad):
    model = rc.build_model("lenet")
    grads = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match="batch_size must be a whole number >= 1"):
        rc.reconstruct(model, grads, (3, 32, 32), batch_size=bad)


def test_match_batch_refuses_mismatched_shapes(cifar_batch):
    result = rc.Reconstruction(image=torch.zeros(2, 3, 32, 32), labels=torch.tensor([0, 1]),
                               image_exact=torch.tensor([False, False]))
    with pytest.raises(rc.RConvError, match="match_batch needs originals"):
        rc.match_batch(cifar_batch.images[:2, :, :16], cifar_batch.labels[:2], result)


@pytest.mark.slow
def test_batch_sweep_rows_and_summary(packs):
    table = rc.batch_sweep("cifar100", ["lenet_batch"], [1, 2], dtypes=["float64"], data_root=packs, progress=False)
    assert len(table) == 3 and set(table.batch_size) == {1, 2}
    assert table.image_exact.all() and (table.within_bound).all() and (table.init == "default").all()
    summary = rc.batch_summary(table)
    assert summary.exact.tolist() == [1.0, 1.0] and summary.labels_right.tolist() == [1.0, 1.0]
    with pytest.raises(rc.RConvError, match="batch_sizes must be whole numbers"):
        rc.batch_sweep("cifar100", ["lenet_batch"], [0])


def test_duplicate_labels_are_reported_not_crashed(cifar_batch):
    images = cifar_batch.images[:2]
    grads = rc.client_gradients(cifar_batch.model, images, torch.tensor([5, 5]), dtype=torch.float64)
    result = rc.reconstruct(cifar_batch.model, grads, (3, 32, 32), cache=CACHE)
    assert result.image.dim() == 4 and len(result.image_exact) == len(result.image)
    if result.exact:  # claimed exact only if every image really is
        matched = rc.match_batch(images, torch.tensor([5, 5]), result)
        assert (matched.table.max_abs_err <= 1e-6).all()
    else:
        assert result.reasons


@pytest.mark.slow
def test_two_images_of_one_label_come_back_exact(packs):
    # MNIST's first eight hold two 1s: the split is ill-conditioned along them, and its features'
    # errors (one-sided, 1e-11) once read dead ReLU units as active (every image wrong before)
    case = rc.setup("mnist", "lenet_batch", range(8), data_root=packs, init="default")
    assert len(set(case.labels.tolist())) == 7
    grads = rc.client_gradients(case.model, case.images, case.labels, dtype=torch.float64)
    result = rc.reconstruct(case.model, grads, tuple(case.images.shape[1:]))
    matched = rc.match_batch(case.images, case.labels, result)
    assert result.exact and (matched.table.max_abs_err <= 1e-6).all()
    assert (matched.table.label == matched.table.recovered_label).all()


@pytest.mark.slow
def test_a_float32_batch_of_sixteen_settles_its_near_zero_units_jointly(packs):
    # one LeakyReLU unit of layer 1's output 7e-8 below zero reads positive from float32; the
    # batch's shared bias gradient settles it (without: residual 7e-3, every image at 8 dB)
    case = rc.setup("cifar100", "lenet_batch", range(16), data_root=packs, init="default")
    grads = rc.client_gradients(case.model, case.images, case.labels, dtype=torch.float32)
    result = rc.reconstruct(case.model, grads, tuple(case.images.shape[1:]), cache=CACHE)
    matched = rc.match_batch(case.images, case.labels, result)
    assert (matched.table.psnr >= 60).all() and (matched.table.label == matched.table.recovered_label).all()
    assert all(r.bias_residual <= 1e-5 for r in result.layers)
    # the probe keeps the Linear layer's rank, so the batch gets a finite bound
    assert result.error_bound < math.inf
    assert (matched.table.max_abs_err[matched.table.image_exact] <= result.error_bound).all()


def test_a_layer_without_known_pre_activations_never_builds_an_empty_weight_matrix():
    # a split gone wrong (a multi-step update read as a batch) can leave every ReLU unit of a layer off:
    # no weight row anywhere, and the joint solve would factorise a matrix with no rows
    from types import SimpleNamespace

    from rconv.attack.batch_steps import _joint_completion, _methods
    channels, pixels, rows = 12, 256, 400  # lenet_c10's second conv layer: its 16 * 5 * 5 gradient rows
    layer = SimpleNamespace(channels=channels, pixels=pixels, unknowns=channels * pixels,
                            known=torch.zeros(16 * 16 * 16, dtype=torch.bool),
                            gradients=SimpleNamespace(shape=(rows, pixels)))
    methods, why = _methods([layer], channels * pixels)
    assert methods == ["gradients"] and not why
    assert _joint_completion([layer], torch.zeros(rows, channels, dtype=torch.float64), torch.float32, None,
                             "conv layer 2") is None


def _plain_net(hidden, seed):
    """A plain network that is not a preset: conv 16/64/32 filters (strides 2, 2, 1), PyTorch's default
    initialisation, `hidden` activations after the first two conv layers and ReLU before the Linear layer."""
    torch.manual_seed(seed)
    act = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[hidden]
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, 2, 2), act(), torch.nn.Conv2d(16, 64, 5, 2, 2), act(),
                               torch.nn.Conv2d(64, 32, 5, 1, 2), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(2048, 100))


@pytest.mark.slow
@pytest.mark.parametrize("hidden, seed", [("tanh", 1), ("sigmoid", 3)])
def test_a_float32_batch_of_eight_on_a_plain_net_is_above_60_db_with_its_labels(packs, hidden, seed):
    # Layer 2's weight constraints are square and, at float32 precision, rank deficient by ~15 directions
    # per image: the batch's shared gradient constraints settle those (it was 13-30 dB before they did).
    model = _plain_net(hidden, seed)
    images, _ = rc.load_images("cifar100", range(8 * seed, 8 * seed + 8), root=packs)
    labels = torch.arange(8) * 7 + seed
    grads = rc.client_gradients(model, images, labels, dtype=torch.float32)
    result = rc.reconstruct(model, grads, (3, 32, 32))
    matched = rc.match_batch(images, labels, result)
    assert result.layers[1].method == "hybrid (batch of 8)" and result.layers[1].full_rank
    assert (matched.table.psnr >= 60).all()
    assert (matched.table.label == matched.table.recovered_label).all()
    claimed = matched.table[matched.table.image_exact]
    assert (claimed.max_abs_err <= 1e-3).all()
    assert not any("inf (max abs)" in reason for reason in result.reasons), "an unmeasured bound says why instead"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_batch_is_exact_behind_a_hidden_layer_whose_border_nothing_reads(dtype):
    """A stride-2 unpadded second layer never reads its input's last row and column: every image's layer solves
    for the rest, and the images below come back exact with their labels."""
    model = unpadded_stride_two()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.tensor([1, 4])
    result = rc.reconstruct(model, rc.client_gradients(model, images, labels, dtype=dtype), (3, 16, 16),
                            batch_size=2)
    matched = rc.match_batch(images, labels, result).table
    assert result.exact and bool(matched.image_exact.all()), result.reasons
    assert list(matched.recovered_label) == [1, 4]
    assert result.layers[1].unknowns == 2 * 12 * 15 * 15
    assert any("no kernel position reaches" in note for note in result.notes)
