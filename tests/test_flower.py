"""The Flower client of the federated study: it refuses bad settings by name, and its update is the SGD step the
server reads back as the client's gradients."""
import copy

import numpy as np
import pytest
import torch

import rconv_core as rc
from rconv.cases.flower import FLOWER_PIN


def images_and_labels(count=2, side=32, seed=3):
    images = torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))
    return images, torch.arange(count)


@pytest.mark.parametrize("training,problem", [
    (rc.LocalTraining(lr=0.0), "lr must be a finite number > 0"),
    (rc.LocalTraining(lr=float("nan")), "lr must be a finite number > 0"),
    (rc.LocalTraining(epochs=0), "epochs must be a whole number >= 1"),
    (rc.LocalTraining(batches=1.5), "batches must be a whole number"),
    (rc.LocalTraining(noise_multiplier=-1.0, max_grad_norm=1.0), "noise_multiplier must be a finite number >= 0"),
    (rc.LocalTraining(noise_multiplier=1.0), "noise needs a max_grad_norm"),
    (rc.LocalTraining(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
])
def test_a_client_refuses_bad_training_by_name(training, problem):
    model = rc.build_model("lenet_c10", 3, 10)
    with pytest.raises(rc.RConvError, match=problem):
        rc.flower_client(model, *images_and_labels(), training)


def test_a_client_needs_one_label_per_image():
    model = rc.build_model("lenet_c10", 3, 10)
    images, labels = images_and_labels(3)
    with pytest.raises(rc.RConvError, match=r"images \(N, C, H, W\) and N labels"):
        rc.flower_client(model, images, labels[:2])
    with pytest.raises(rc.RConvError, match="training must be a LocalTraining"):
        rc.flower_client(model, images, labels, {"lr": 0.1})


def test_the_settings_of_a_sweep():
    plain = rc.fedsgd_fedavg([0.1, 0.01], [1, 3])
    assert [(t.lr, t.local_steps, t.private) for t in plain] == [(0.1, 1, False), (0.01, 1, False), (0.1, 3, False),
                                                                 (0.01, 3, False)]
    private = rc.dp_sgd([0.0, 1.0], max_grad_norm=0.5, lr=0.2)
    assert [(t.noise_multiplier, t.max_grad_norm, t.lr, t.private) for t in private] == [(0.0, 0.5, 0.2, True),
                                                                                          (1.0, 0.5, 0.2, True)]
    with pytest.raises(rc.RConvError, match="local_steps must be a whole number"):
        rc.fedsgd_fedavg([0.1], [0])


def test_fedsgd_update_is_the_clients_gradient():
    """One local step: the server reads back the client's mean gradient, to float32 weights' rounding over lr."""
    pytest.importorskip("flwr", reason="needs the optional flwr package: make federated")
    model = rc.build_model("lenet_c10", 3, 10)
    images, labels = images_and_labels()
    client = rc.flower_client(copy.deepcopy(model), images, labels, rc.LocalTraining(lr=0.1))
    sent = [value.detach().numpy().copy() for value in model.state_dict().values()]
    returned, count, _ = client.fit(sent, {})
    assert count == 2 and all(a.dtype == np.float32 for a in returned)
    update = rc.gradients_from_update(model, sent, returned, lr=0.1)
    truth = rc.client_gradients(model, images, labels, dtype=torch.float32)
    for read, true, rounding in zip(update, truth, update.rounding):
        assert torch.allclose(read.double(), true.double(), rtol=0, atol=20 * rounding + 1e-7)
    # the server's model is untouched, and the client keeps its own weights for get_parameters
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(sent, model.state_dict().values()))
    assert all(np.array_equal(a, b) for a, b in zip(returned, client.get_parameters({})))


def test_a_clients_config_sets_its_learning_rate():
    pytest.importorskip("flwr", reason="needs the optional flwr package: make federated")
    model = rc.build_model("lenet_c10", 3, 10)
    client = rc.flower_client(model, *images_and_labels(), rc.LocalTraining(lr=0.1))
    sent = [value.detach().numpy().copy() for value in model.state_dict().values()]
    slow, _, _ = client.fit(sent, {"lr": 0.01})
    fast, _, _ = client.fit(sent, {})
    moved = [np.abs(s - w).max() for s, w in zip(sent, slow)], [np.abs(f - w).max() for f, w in zip(fast, sent)]
    assert max(moved[1]) == pytest.approx(10 * max(moved[0]), rel=1e-3)
    with pytest.raises(rc.RConvError, match="the server sent 1 arrays"):
        client.fit(sent[:1], {})


def test_without_flower_the_client_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "flwr", None)
    monkeypatch.setitem(sys.modules, "flwr.client", None)
    message = rc.flower_missing()
    assert "pip install -r requirements-federated.txt" in message and FLOWER_PIN in message
    with pytest.raises(ImportError, match="requirements-federated.txt"):
        rc.flower_client(rc.build_model("lenet_c10", 3, 10), *images_and_labels())
