"""rconv.cases.updates: gradients read off a client's weights before and after local SGD, in every form a
federated framework sends them, with clear errors where they do not fit, and honest about several steps."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rconv_core as rc

LR = 0.1
# float32 weights differ by lr * g with errors of about ulp(w) / lr: a few parts in 1e6 of the gradient at lr 0.1
READ_RTOL = 1e-5


def tiny_model(classes=10, side=8):
    """lenet_batch at 8 x 8 inputs: the batch preset's layers, small enough to attack in a second."""
    return rc.build_model("lenet_batch", 3, classes, input_size=side)


def tiny_batch(count, side=8, seed=1, classes=10):
    images = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return images, torch.arange(count) % classes


def train(model, images, labels, *, steps=1, batches=1, **sgd):
    """A copy of `model` after `steps` passes of torch SGD over `batches` mini-batches; and each step's
    gradients at the weights it was taken at, in parameters() order."""
    client = copy.deepcopy(model)
    optimiser = torch.optim.SGD(client.parameters(), lr=LR, **sgd)
    taken = []
    for _ in range(steps):
        for part in range(batches):
            chosen = slice(part * len(images) // batches, (part + 1) * len(images) // batches)
            optimiser.zero_grad()
            F.cross_entropy(client(images[chosen]), labels[chosen]).backward()
            taken.append([p.grad.detach().double().clone() for p in client.parameters()])
            optimiser.step()
    return client, taken


def arrays(model):
    """The weights as a Flower NumPyClient sends them: NumPy arrays in state_dict order."""
    return [value.detach().cpu().numpy().copy() for value in model.state_dict().values()]


def assert_close(read, expected, rtol=READ_RTOL, atol=0.0):
    for mine, truth in zip(read, expected):
        scale = float(truth.abs().max()) or 1.0
        assert float((mine.double() - truth).abs().max()) <= rtol * scale + atol


@pytest.fixture(scope="module")
def one_step():
    """lenet_c10 after one SGD step on a random image: the server's model, the client's, the true gradients."""
    model = rc.build_model("lenet_c10", 3, 10)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    client, taken = train(model, images, torch.tensor([4]))
    return model, client, taken[0]


@pytest.mark.parametrize("form", ["state_dict arrays", "parameters arrays", "state dicts", "tensors"])
def test_one_sgd_step_gives_the_gradients_in_every_form(one_step, form):
    model, client, truth = one_step
    before, after = {
        "state_dict arrays": (arrays(model), arrays(client)),
        "parameters arrays": ([p.detach().numpy() for p in model.parameters()],
                              [p.detach().numpy() for p in client.parameters()]),
        "state dicts": (model.state_dict(), client.state_dict()),
        "tensors": (list(model.parameters()), list(client.parameters())),
    }[form]
    read = rc.gradients_from_update(model, before, after, lr=LR)
    assert isinstance(read, rc.Update) and isinstance(read, list) and len(read) == len(truth)
    assert all(g.dtype == torch.float32 and g.shape == p.shape for g, p in zip(read, model.parameters()))
    assert_close(read, truth)
    assert read.local_steps == 1 and read.lr == LR and "lr 0.1" in read.notes[0]


def test_the_rounding_it_reports_covers_the_error(one_step):
    model, client, truth = one_step
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR)
    for mine, true, rounding in zip(read, truth, read.rounding):
        actual = float((mine.double() - true).pow(2).mean().sqrt())
        # the step's own float32 rounding of lr * g adds eps relative to the gradient
        assert actual <= rounding + 2 * torch.finfo(torch.float32).eps * float(true.pow(2).mean().sqrt())


def test_buffers_in_state_dict_order_are_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    images, labels = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    client, taken = train(model, images, labels)
    assert len(arrays(model)) > len(list(model.parameters()))  # running mean, variance, batches tracked
    # the conv bias before BatchNorm has a zero gradient: its rounding (~1e-7) is all there is to compare
    assert_close(rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR), taken[0], atol=1e-6)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 5e-3), (0.9, 0.0), (0.9, 5e-3)])
def test_one_step_with_momentum_and_weight_decay(one_step, momentum, weight_decay):
    model, _, truth = one_step
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    client, _ = train(model, images, torch.tensor([4]), momentum=momentum, weight_decay=weight_decay)
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR, momentum=momentum,
                                    weight_decay=weight_decay)
    assert_close(read, truth)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.0, 5e-3), (0.5, 0.0)])
def test_several_steps_give_their_weighted_mean(momentum, weight_decay):
    model = tiny_model()
    images, labels = tiny_batch(2)
    client, taken = train(model, images, labels, steps=3, momentum=momentum, weight_decay=weight_decay)
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR, local_steps=3, momentum=momentum,
                                    weight_decay=weight_decay)
    # SGD's weights per step: (1 - lr wd)^(K-1-k) with weight decay, (1 - mu^(K-k)) / (1 - mu) with momentum
    c, mu = 1 - LR * weight_decay, momentum
    shares = [c ** (2 - k) if mu == 0 else (1 - mu ** (3 - k)) / (1 - mu) for k in range(3)]
    mean = [sum(s * step[i] for s, step in zip(shares, taken)) / sum(shares) for i in range(len(taken[0]))]
    assert_close(read, mean, rtol=1e-4)
    assert read.local_steps == 3 and any("never exact" in note for note in read.notes)


def test_several_steps_are_never_claimed_exact():
    """FedAvg on one mini-batch: the split reads the steps as images; the reasons say why none is exact."""
    model = tiny_model()
    images, labels = tiny_batch(2)
    client, _ = train(model, images, labels, steps=3)
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR, local_steps=3)
    result = rc.reconstruct(model, read, (3, 8, 8))
    assert not result.exact and not result.image_exact.any()
    assert any("3 local SGD steps" in reason for reason in result.reasons)


def test_one_step_on_a_batch_is_split_despite_the_weights_rounding():
    """The weights' rounding raises the gradient's rank at float32 tolerances; the update's rounding keeps it."""
    model = tiny_model()
    images, labels = tiny_batch(2)
    client, _ = train(model, images, labels)
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR)
    result = rc.reconstruct(model, read, (3, 8, 8))
    assert result.batch_size == 2
    assert (rc.match_batch(images, labels, result).table.psnr >= 60).all()


def test_a_plain_list_drops_what_the_update_carries(one_step):
    model, client, _ = one_step
    read = rc.gradients_from_update(model, arrays(model), arrays(client), lr=LR)
    assert not isinstance(list(read), rc.Update) and len(list(read)) == len(read)


def bad_arrays(model, client):
    before, after = arrays(model), arrays(client)
    nan = [a.copy() for a in after]
    nan[3][0] = np.nan
    return {
        "shapes": (before, after[::-1], "after\\['0.weight'\\] has shape"),
        "count": (before, after[:-1], "holds 9 arrays; the model's state_dict has 10"),
        "nan": (before, nan, "after\\['2.bias'\\] holds NaN"),
        "integers": (before, [a.astype(np.int64) for a in after], "holds int64, not floating-point"),
        "dtypes": (before, [a.astype(np.float64) if i else a for i, a in enumerate(after)], "mix dtypes"),
        "identical": (before, before, "before and after are identical"),
        "unknown key": ({**model.state_dict(), "extra": torch.zeros(1)}, after, "unexpected \\['extra'\\]"),
        "missing key": ({"0.weight": before[0]}, after, "missing \\['0.bias'"),
        "one array": (before[0], after, "must be a list of arrays"),
        "objects": (before, [object()] * len(after), "is not an array of numbers"),
    }


@pytest.mark.parametrize("case", ["shapes", "count", "nan", "integers", "dtypes", "identical", "unknown key",
                                  "missing key", "one array", "objects"])
def test_arrays_that_do_not_fit_are_refused_by_name(one_step, case):
    model, client, _ = one_step
    before, after, problem = bad_arrays(model, client)[case]
    with pytest.raises(rc.RConvError, match=problem):
        rc.gradients_from_update(model, before, after, lr=LR)


@pytest.mark.parametrize("options,problem", [
    (dict(lr=0), "lr must be a finite number > 0"),
    (dict(lr=-0.1), "lr must be a finite number > 0"),
    (dict(lr=math.nan), "lr must be a finite number > 0"),
    (dict(lr=True), "lr must be a finite number > 0"),
    (dict(lr=LR, local_steps=0), "local_steps must be a whole number >= 1"),
    (dict(lr=LR, local_steps=2.5), "local_steps must be a whole number >= 1"),
    (dict(lr=LR, momentum=1.0), "momentum must be a finite number >= 0 and < 1"),
    (dict(lr=LR, weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
    (dict(lr=LR, weight_decay=10.0), "lr \\* weight_decay = 1 >= 1"),
])
def test_settings_that_no_client_trains_with_are_refused(one_step, options, problem):
    model, client, _ = one_step
    with pytest.raises(rc.RConvError, match=problem):
        rc.gradients_from_update(model, arrays(model), arrays(client), **options)


def test_a_model_that_is_no_module_is_refused(one_step):
    model, client, _ = one_step
    with pytest.raises(rc.RConvError, match="model must be a torch.nn.Module"):
        rc.gradients_from_update(arrays(model), arrays(model), arrays(client), lr=LR)
