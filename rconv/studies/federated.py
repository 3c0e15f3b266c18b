"""The federated study: a round as the server sees it. It sends its weights through Flower's wire format, each
client trains on its own images (FedSGD, FedAvg steps, or Opacus's DP-SGD) and sends its weights back, and the
server attacks each update (R-CONV, and breaching's baselines on the same gradients).

federated_round writes one tidy row per client image and method (analysis' federated_summary condenses it).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

from ..analysis.reports import match_batch
from ..attack.reconstruct import reconstruct
from ..cases.flower import LocalTraining, flower_client
from ..cases.privacy import privacy_budget
from ..cases.setup import setup
from ..cases.updates import gradients_from_update
from ..common.checks import whole_number
from ..common.errors import RConvError
from .baselines import run_baseline
from .executors import path_text, run_tasks

# The probability outside an epsilon guarantee, as DP-SGD papers quote it for datasets of 10^4 to 10^5 images.
DELTA = 1e-5


class _RoundTask(NamedTuple):
    """One client of one setting: its images' indices and what it does with the server's weights."""

    dataset: str
    model: str
    seed: int
    client: int
    indices: tuple
    training: LocalTraining
    data_root: str | None
    baselines: tuple  # (name, iterations) pairs


def fedsgd_fedavg(learning_rates, local_steps):
    """The plain clients of a sweep: every learning rate with every number of local steps (1 is FedSGD), each
    step a pass over the client's whole batch."""
    return [LocalTraining(lr=float(lr), epochs=whole_number(steps, "local_steps"))
            for steps in local_steps for lr in learning_rates]


def dp_sgd(noise_multipliers, *, max_grad_norm, lr=0.1):
    """DP-SGD clients, one step each: clipping every image's gradient to max_grad_norm and adding Gaussian noise
    of noise_multiplier x max_grad_norm (0: clipping only)."""
    return [LocalTraining(lr=float(lr), noise_multiplier=float(noise), max_grad_norm=float(max_grad_norm))
            for noise in noise_multipliers]


def _scenario(training):
    if training.private:
        return "dp_sgd"
    return "fedsgd" if training.local_steps == 1 else "fedavg"


def _epsilon(training):
    """The setting's epsilon at DELTA (inf without noise): one round, each step a pass over the client's data."""
    if not training.private or training.noise_multiplier == 0:
        return math.inf
    with warnings.catch_warnings():  # Opacus suggests more Renyi orders for tiny noise: epsilon is huge anyway
        warnings.simplefilter("ignore")
        return privacy_budget(training.noise_multiplier, 1.0 / training.batches, training.local_steps,
                              delta=DELTA).epsilon


def _round_trip(model, client):
    """The server's weights to the client and the client's back, through Flower's wire format."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    sent = [value.detach().cpu().numpy().copy() for value in model.state_dict().values()]
    returned, _, _ = client.fit(parameters_to_ndarrays(ndarrays_to_parameters(sent)), {})
    return sent, parameters_to_ndarrays(ndarrays_to_parameters(returned))


def _rows(setting, result, matched, method, seconds):
    reasons = list(getattr(result, "reasons", []))
    return [dict(setting, method=method, seconds=seconds, update_exact=bool(result.exact),
                 reason=reasons[0] if reasons else "") | row for row in matched.table.to_dict("records")]


def _round_task(task, cache):
    """The rows of one client: the server's R-CONV attack on its update, then each baseline on the same gradients."""
    case = setup(task.dataset, task.model, list(task.indices), task.seed, data_root=task.data_root)
    training = task.training
    shape = tuple(case.images.shape[1:])
    client = flower_client(case.model, case.images, case.labels, training, seed=task.client)
    sent, returned = _round_trip(case.model, client)
    setting = dict(dataset=case.info["name"], model=task.model, seed=task.seed, scenario=_scenario(training),
                   lr=training.lr, local_steps=training.local_steps, noise_multiplier=training.noise_multiplier,
                   max_grad_norm=training.max_grad_norm, epsilon=_epsilon(training), delta=DELTA,
                   client=task.client, batch_size=len(task.indices))
    try:
        update = gradients_from_update(case.model, sent, returned, lr=training.lr, local_steps=training.local_steps)
    except RConvError as refused:  # e.g. a client whose training diverged sends NaN: a row that says so
        return [dict(setting, method="rconv", seconds=math.nan, update_exact=False, reason=str(refused), member=k,
                     index=index, label=int(label), image_exact=False, psnr=math.nan, max_abs_err=math.nan)
                for k, (index, label) in enumerate(zip(task.indices, case.labels))]
    start = time.perf_counter()
    result = reconstruct(case.model, update, shape, cache=cache((case.info["name"], task.model, task.seed)))
    rows = _rows(setting, result, match_batch(case.images, case.labels, result), "rconv",
                 time.perf_counter() - start)
    for name, iterations in task.baselines:
        # given the true labels: breaching reads them off the Linear layer's gradient, which DP noise garbles
        # (it finds more labels than images), so the baseline is judged on its images alone
        baseline = run_baseline(name, case.model, list(update), shape, iterations=iterations, label=case.labels,
                                batch_size=len(task.indices), seed=task.client)
        rows += _rows(setting, baseline, match_batch(case.images, case.labels, baseline), name, baseline.seconds)
    for row in rows:
        row["index"] = task.indices[row["member"]]
    return rows


def federated_round(dataset, model_name, settings, *, clients=2, client_images=4, seed=50, data_root=None,
                    baselines=None, executor=None, progress=True):
    """One row per client image, setting and method: the server's attack on each client's weight update.

    Args:
        settings: LocalTraining records (fedsgd_fedavg and dp_sgd make the usual sweeps); each is one round.
        clients: how many clients take part; client k holds images k x client_images onwards of the dataset.
        baselines: None, or a dict baseline name -> iterations, run through breaching on the same gradients.
        executor: None (here, one client after another), or a concurrent.futures.Executor / Dask Client.
    Columns: the setting (scenario "fedsgd", "fedavg" or "dp_sgd", lr, local_steps, noise_multiplier,
    max_grad_norm, epsilon and delta of Opacus's accountant, inf without noise), client, method, the image
    (index, label, recovered_label, image_exact, psnr, ssim, max_abs_err), update_exact, seconds and the
    first reason. Needs the optional flwr package, and opacus for DP-SGD (flower_missing says how to install).
    """
    import pandas as pd
    settings = list(settings)
    if not settings or not all(isinstance(s, LocalTraining) for s in settings):
        raise RConvError("federated_round needs a list of LocalTraining settings (fedsgd_fedavg, dp_sgd)")
    clients = whole_number(clients, "clients")
    size = whole_number(client_images, "client_images")
    pairs = tuple(sorted((baselines or {}).items()))
    tasks = [_RoundTask(dataset, model_name, seed, k, tuple(range(k * size, (k + 1) * size)), training,
                        path_text(data_root), pairs) for training in settings for k in range(clients)]
    return run_tasks(_round_task, tasks, lambda results: pd.DataFrame([r for rows in results for r in rows]),
                     executor=executor, desc=f"{model_name} clients", unit="image", sizes=[size] * len(tasks),
                     progress=progress)

