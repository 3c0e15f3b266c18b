"""A federated client as Flower runs one: a NumPyClient whose fit() trains the server's weights locally (plain SGD,
or DP-SGD through Opacus) and returns its new weights, as the server then sees them (optional packages)."""

from __future__ import annotations

import copy
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..common.checks import whole_number
from ..common.errors import RConvError
from ..common.optional import missing

# The pins of requirements-federated.txt, named in the install hint.
FLOWER_PIN = "flwr==1.42.0"
_INSTALL = "pip install -r requirements-federated.txt in the repository's root"


class LocalTraining(NamedTuple):
    """What a client does with the server's weights before it sends them back.

    lr: the SGD learning rate; epochs: passes over the client's images; batches: mini-batches per pass
    (epochs x batches local steps: one is FedSGD, more is FedAvg); noise_multiplier and max_grad_norm:
    Opacus's DP-SGD (max_grad_norm None: plain SGD; noise_multiplier 0 with a max_grad_norm: clipping only).
    """

    lr: float = 0.1
    epochs: int = 1
    batches: int = 1
    noise_multiplier: float = 0.0
    max_grad_norm: float | None = None

    @property
    def local_steps(self):
        return self.epochs * self.batches

    @property
    def private(self):
        return self.max_grad_norm is not None


def flower_missing():
    """Why flower_client cannot run here (Flower, or Opacus for DP-SGD, missing), in one sentence naming the
    install command; "" when it can."""
    return missing(_numpy_client) or missing(_opacus_engine)


def _numpy_client():
    try:
        from flwr.client import NumPyClient
    except ImportError as error:
        raise ImportError(f"a Flower client needs the optional flwr package (and opacus for DP-SGD), which is not "
                          f"installed here: {_INSTALL} (or pip install \"{FLOWER_PIN}\")") from error
    return NumPyClient


def _opacus_engine():
    try:
        from opacus import PrivacyEngine
    except ImportError as error:
        raise ImportError(f"a DP-SGD client needs the optional opacus package, which is not installed here: "
                          f"{_INSTALL}") from error
    return PrivacyEngine


def _check_training(training):
    if not isinstance(training, LocalTraining):
        raise RConvError(f"flower_client: training must be a LocalTraining; got {type(training).__name__}")
    if not (math.isfinite(training.lr) and training.lr > 0):
        raise RConvError(f"flower_client: lr must be a finite number > 0; got {training.lr!r}")
    whole_number(training.epochs, "flower_client: epochs")
    whole_number(training.batches, "flower_client: batches")
    if not (math.isfinite(training.noise_multiplier) and training.noise_multiplier >= 0):
        raise RConvError(f"flower_client: noise_multiplier must be a finite number >= 0; got "
                         f"{training.noise_multiplier!r}")
    if training.private and not (math.isfinite(training.max_grad_norm) and training.max_grad_norm > 0):
        raise RConvError(f"flower_client: max_grad_norm must be a finite number > 0 or None; got "
                         f"{training.max_grad_norm!r}")
    if training.noise_multiplier > 0 and not training.private:
        raise RConvError("flower_client: noise needs a max_grad_norm (DP-SGD clips before it adds noise)")


def _weights(model):
    return [value.detach().cpu().numpy().copy() for value in model.state_dict().values()]


def _train(model, images, labels, training, seed):
    """The client's local steps on a copy of `model` (Opacus's hooks never reach the caller's model)."""
    trained = copy.deepcopy(model)
    optimiser = torch.optim.SGD(trained.parameters(), lr=training.lr)
    count = len(images)
    if count % training.batches:
        raise RConvError(f"flower_client: {count} images do not split into {training.batches} equal mini-batches")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=count // training.batches)
    forward = trained
    # Opacus warns about its non-cryptographic noise and its hooks: the study measures the attack, not the RNG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if training.private:
            forward, optimiser, loader = _opacus_engine()().make_private(
                module=trained, optimizer=optimiser, data_loader=loader, noise_multiplier=training.noise_multiplier,
                max_grad_norm=training.max_grad_norm, poisson_sampling=False,
                noise_generator=torch.Generator().manual_seed(seed))
        for _ in range(training.epochs):
            for x, y in loader:
                optimiser.zero_grad()
                F.cross_entropy(forward(x), y).backward()
                optimiser.step()
    return _weights(trained)


def flower_client(model, images, labels, training=LocalTraining(), *, seed=0):
    """A Flower NumPyClient holding `images` (N, C, H, W) and `labels` (N,) that trains `model` as `training` says.

    fit(parameters, config) loads the server's weights (state_dict order, as Flower sends them), runs the
    local steps and returns (new weights, N, {}); config may override "lr" and "epochs". get_parameters
    returns the client's current weights. seed: Opacus's noise generator. Needs the optional flwr package
    (and opacus for DP-SGD): flower_missing() says why not, and how to install it.
    """
    _check_training(training)
    images, labels = torch.as_tensor(images), torch.as_tensor(labels).reshape(-1)
    if images.dim() != 4 or len(images) != len(labels) or not len(images):
        raise RConvError(f"flower_client needs images (N, C, H, W) and N labels, N >= 1; got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if training.private:
        _opacus_engine()
    keys = list(model.state_dict())
    local = copy.deepcopy(model)

    class _Client(_numpy_client()):
        def get_parameters(self, config):
            return _weights(local)

        def fit(self, parameters, config):
            if len(parameters) != len(keys):
                raise RConvError(f"flower_client: the server sent {len(parameters)} arrays for a state_dict of "
                                 f"{len(keys)}")
            local.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in zip(keys, parameters)})
            steps = training._replace(lr=float(config.get("lr", training.lr)),
                                      epochs=int(config.get("epochs", training.epochs)))
            _check_training(steps)
            new = _train(local, images.to(next(local.parameters()).dtype), labels.long(), steps, seed)
            local.load_state_dict({key: torch.from_numpy(value) for key, value in zip(keys, new)})
            return new, len(images), {}

    return _Client()
