"""Real federated clients: a Flower NumPyClient's FedSGD and FedAvg updates, and Opacus's DP-SGD, attacked through
gradients_from_update; an honest answer within a minute whatever they send. Skips without flwr or opacus."""
import copy
import math
import sys
import time
import tomllib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rconv_core as rc
from conftest import REPO
from rconv.cases.flower import FLOWER_PIN
from rconv.cases.privacy import OPACUS_PIN

LR = 0.1
# The attack must answer within this many seconds on what no image gives exactly (the bar).
ANSWER_SECONDS = 60.0
# What an image within float32's precision reaches (test_batches' bar for float32 batches).
GOOD_PSNR = 60.0
# Below every per-image gradient norm of the batch below (about 1.5), so that Opacus clips each by its own
# factor; not much smaller, as a step of lr * 0.05 leaves float32 weights too few of its digits (40 dB).
MAX_GRAD_NORM = 0.2


def flower():
    """Flower's client class and its wire format, or a skip naming the missing package."""
    pytest.importorskip("flwr", reason="needs the optional flwr package: make federated")
    from flwr.client import NumPyClient
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    return NumPyClient, ndarrays_to_parameters, parameters_to_ndarrays


def make_client(model, images, labels, *, epochs=1, batches=1, dp=None):
    """A Flower NumPyClient of our own: local SGD at LR over its images (`epochs` passes over `batches`
    mini-batches), privately by Opacus when dp = (noise_multiplier, max_grad_norm)."""
    NumPyClient = flower()[0]

    class Client(NumPyClient):
        def get_parameters(self, config):
            return [value.detach().cpu().numpy() for value in model.state_dict().values()]

        def fit(self, parameters, config):
            model.load_state_dict({key: torch.from_numpy(np.array(value))
                                   for key, value in zip(model.state_dict(), parameters)})
            optimiser = torch.optim.SGD(model.parameters(), lr=LR)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                                 batch_size=len(images) // batches)
            trained = model
            # Opacus's advice on secure random numbers and on its hooks' firing: nothing this test needs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dp is not None:
                    from opacus import PrivacyEngine
                    trained, optimiser, loader = PrivacyEngine().make_private(
                        module=model, optimizer=optimiser, data_loader=loader, noise_multiplier=dp[0],
                        max_grad_norm=dp[1], poisson_sampling=False, noise_generator=torch.Generator().manual_seed(0))
                for _ in range(epochs):
                    for x, y in loader:
                        optimiser.zero_grad()
                        F.cross_entropy(trained(x), y).backward()
                        optimiser.step()
            return self.get_parameters(config), len(images), {}

    return Client()


def round_trip(server, client):
    """One round: the server's weights to the client and its weights back, through Flower's wire format."""
    _, to_wire, from_wire = flower()
    sent = [value.detach().numpy().copy() for value in server.state_dict().values()]
    returned, _, _ = client.fit(from_wire(to_wire(sent)), {})
    return sent, from_wire(to_wire(returned))


def attack(server, images, labels, *, local_steps=1, **client):
    """The server's attack on one client's update: (Reconstruction, its images matched to the truth, seconds)."""
    sent, returned = round_trip(server, make_client(copy.deepcopy(server), images, labels, **client))
    assert returned[0].dtype == np.float32  # what Flower carries: the client's float32 weights
    update = rc.gradients_from_update(server, sent, returned, lr=LR, local_steps=local_steps)
    start = time.perf_counter()
    result = rc.reconstruct(server, update, tuple(images.shape[1:]))
    return result, rc.match_batch(images, labels, result), time.perf_counter() - start


def assert_honest(result, matched, target=1e-3):
    """Never exact, and no image claimed exact beyond what exact allows for float32 (nor one that is no
    client's image at all: a member the truth does not match)."""
    claimed = matched.table[matched.table.image_exact]
    assert not result.exact and result.reasons
    assert len(claimed) == int(result.image_exact.sum()) and (claimed.max_abs_err <= target).all()


def random_images(count, side=32, seed=5):
    return torch.rand(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_fedsgd_images_come_back_from_float32_weights():
    server = rc.build_model("lenet_c10", 3, 10)
    for seed, label in [(5, 3), (6, 7)]:  # two clients, one image each
        images, labels = random_images(1, seed=seed), torch.tensor([label])
        result, matched, _ = attack(server, images, labels)
        assert len(result.image) == 1 and (matched.table.psnr >= GOOD_PSNR).all()
        assert (matched.table.max_abs_err[matched.table.image_exact] <= 1e-3).all()


@pytest.mark.slow
def test_opacus_clipping_alone_leaves_every_image_of_a_batch():
    pytest.importorskip("opacus", reason="needs the optional opacus package: make federated")
    server = rc.build_model("lenet_batch", 3, 10)
    images, labels = random_images(4), torch.tensor([0, 1, 2, 3])
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in rc.client_gradients(server, image, label)))
             for image, label in zip(images, labels)]
    assert min(norms) > MAX_GRAD_NORM  # every image's gradient is clipped, each by its own factor
    result, matched, _ = attack(server, images, labels, dp=(0.0, MAX_GRAD_NORM))
    assert result.batch_size == 4 and (matched.table.psnr >= GOOD_PSNR).all()
    # clipping scales each image's share of the batch: the split cannot vouch for the batch size
    assert any("no whole numbers of images" in reason for reason in result.reasons)
    assert_honest(result, matched)


@pytest.mark.slow
def test_opacus_noise_gets_an_honest_answer_within_a_minute():
    pytest.importorskip("opacus", reason="needs the optional opacus package: make federated")
    server = rc.build_model("lenet_batch", 3, 10)
    images, labels = random_images(4), torch.tensor([0, 1, 2, 3])
    result, matched, seconds = attack(server, images, labels, dp=(1.0, 1.0))
    assert seconds < ANSWER_SECONDS
    assert_honest(result, matched)


@pytest.mark.slow
@pytest.mark.parametrize("epochs,batches", [(3, 1), (1, 3)])
def test_fedavg_local_steps_get_an_honest_answer_within_a_minute(epochs, batches):
    server = rc.build_model("lenet_batch", 3, 10, input_size=8)  # the batch preset's layers on 8 x 8 images
    images, labels = random_images(3, side=8), torch.tensor([0, 1, 2])
    result, matched, seconds = attack(server, images, labels, epochs=epochs, batches=batches,
                                      local_steps=epochs * batches)
    assert seconds < ANSWER_SECONDS
    assert_honest(result, matched)
    assert any(f"{epochs * batches} local SGD steps" in reason for reason in result.reasons)


# -----------------------------------------------------------------------------------------------------
# the privacy budget

def test_the_privacy_budget_is_opacus_accountants():
    pytest.importorskip("opacus", reason="needs the optional opacus package: make federated")
    from opacus.accountants import RDPAccountant
    accountant = RDPAccountant()
    for _ in range(100):
        accountant.step(noise_multiplier=1.1, sample_rate=0.01)
    epsilon, order = accountant.get_privacy_spent(delta=1e-5)
    budget = rc.privacy_budget(1.1, 0.01, 100, delta=1e-5)
    assert isinstance(budget, rc.PrivacyBudget) and budget.delta == 1e-5
    assert budget.epsilon == pytest.approx(epsilon, rel=1e-12) and budget.order == order
    # more noise, fewer steps or a smaller sample rate spend less
    assert rc.privacy_budget(2.0, 0.01, 100).epsilon < budget.epsilon
    assert rc.privacy_budget(1.1, 0.01, 10).epsilon < budget.epsilon
    assert rc.privacy_budget(1.1, 0.001, 100).epsilon < budget.epsilon
    assert rc.opacus_missing() == ""


@pytest.mark.parametrize("arguments,problem", [
    ((0.0, 0.01, 10), "noise_multiplier must be a finite number > 0"),
    ((1.0, 0.0, 10), "sample_rate must be a number in \\(0, 1\\]"),
    ((1.0, 1.5, 10), "sample_rate must be a number in \\(0, 1\\]"),
    ((1.0, 0.01, 0), "steps must be a whole number >= 1"),
    ((1.0, 0.01, 2.5), "steps must be a whole number >= 1"),
    ((math.nan, 0.01, 10), "noise_multiplier must be a finite number > 0"),
    ((math.inf, 0.01, 10), "noise_multiplier must be a finite number > 0"),
])
def test_the_privacy_budget_refuses_settings_by_name(arguments, problem):
    with pytest.raises(rc.RConvError, match=problem):
        rc.privacy_budget(*arguments)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5])
def test_the_privacy_budget_needs_a_delta_between_0_and_1(delta):
    with pytest.raises(rc.RConvError, match="delta must be"):
        rc.privacy_budget(1.0, 0.01, 10, delta=delta)


def test_without_opacus_the_budget_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    message = rc.opacus_missing()
    assert "pip install -r requirements-federated.txt" in message and "\n" not in message
    with pytest.raises(ImportError, match="requirements-federated.txt"):
        rc.privacy_budget(1.0, 0.01, 10)


def test_the_pins_agree_everywhere():
    pins = [line for line in (REPO / "requirements-federated.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    lock = (REPO / "requirements-lock.txt").read_text().splitlines()
    assert extras["federated"] == pins and {OPACUS_PIN, FLOWER_PIN} <= set(pins) and all(pin in lock for pin in pins)
