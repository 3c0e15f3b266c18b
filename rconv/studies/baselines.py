"""Optimisation attacks from the breaching package (Geiping et al.) on the same gradients, for comparison.

breaching is optional (pip install -r requirements-baselines.txt) and imported only when a
baseline runs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from ..analysis.reports import image_metrics
from ..attack.network import check_gradients, check_input_shape, parse_network
from ..attack.reconstruct import Reconstruction, reconstruct
from ..cases.client import as_dtype, client_gradients, dtype_name
from ..cases.data import check_indices, dataset_info
from ..cases.setup import setup
from ..common.checks import whole_number
from ..common.errors import RConvError
from ..common.optional import missing
from .executors import chunked, path_text, run_tasks

# name -> (breaching attack config, overrides)
BASELINES = {
    "dlg": ("deepleakage", []),  # Zhu et al. 2019: image and label optimised jointly with L-BFGS
    "idlg": ("deepleakage", ["attack.attack_type=optimization", "attack.label_strategy=iDLG"]),  # label first
    "inverting_gradients": ("invertinggradients", []),  # Geiping et al. 2020: cosine loss, TV, boxed Adam
}
# breaching reports progress every this many steps; more than any run here takes, so it stays quiet.
_QUIET_CALLBACK = 100000


_INSTALL_HINT = ("the baselines (DLG, iDLG, Inverting Gradients) need the optional breaching package, which is not "
                 "installed here: pip install -r requirements-baselines.txt in the repository's root (in Colab: "
                 "%pip install breaching==0.1.2)")


def breaching_missing():
    """Why the baselines cannot run here, in one sentence naming the install command; "" when they can."""
    return missing(_breaching)


def _breaching():
    try:
        import breaching
        from omegaconf import OmegaConf
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return breaching, OmegaConf


def _config(breaching, name, shape, iterations):
    """breaching's configuration of a baseline, and what it changes for this image, in words."""
    attack, overrides = BASELINES[name]
    overrides = [f"attack={attack}", "case=1_single_image_small", f"attack.optim.callback={_QUIET_CALLBACK}",
                 *overrides]
    notes = []
    if iterations is not None:
        overrides.append(f"attack.optim.max_iterations={int(iterations)}")
    if name == "inverting_gradients" and shape[0] != 3:
        overrides.append("attack.regularization.total_variation.scale=0.0")
        notes.append("total variation off: breaching's implementation handles 3-channel images only")
    logging.getLogger("breaching").setLevel(logging.WARNING)
    chatter = io.StringIO()  # breaching prints its configuration and progress
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return breaching.get_config(overrides=overrides), notes


def run_baseline(name, model, grads, input_shape, *, label=None, iterations=None, seed=0, batch_size=1):
    """An optimisation attack of the breaching package on the same gradients, as a Reconstruction.

    Args:
        name: one of BASELINES: "dlg", "idlg" or "inverting_gradients".
        label: the true label, if the attacker is to be given it; None lets the attack find it
            (DLG optimises it, iDLG and Inverting Gradients read it off the last layer's gradient).
        iterations: optimisation steps; None keeps breaching's default (DLG 1200, Inverting
            Gradients 24000, far beyond a CPU budget).
        seed: seed of the random starting image.
        batch_size: the number of images behind the (mean) gradients; breaching optimises that many
            images at once (label: then one per image, or None).
    The breaching package is optional: pip install -r requirements-baselines.txt.
    """
    if name not in BASELINES:
        raise RConvError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    breaching, OmegaConf = _breaching()
    network = parse_network(model)
    checked = check_gradients(model, network, grads)
    grads = [checked.of(parameter) for parameter in model.parameters()]
    shape = check_input_shape(network, input_shape)[0]
    config, notes = _config(breaching, name, shape, iterations)
    setting = dict(device=torch.device("cpu"), dtype=torch.float32)
    attacker = breaching.attacks.prepare_attack(copy.deepcopy(model).float(), nn.CrossEntropyLoss(), config.attack,
                                                setting)
    metadata = OmegaConf.create(dict(shape=list(shape), modality="vision", task="classification",
                                     classes=network.linear.out_features, mean=[0.0] * shape[0],
                                     std=[1.0] * shape[0]))
    payload = [dict(parameters=[p.detach().float() for p in model.parameters()], buffers=None, metadata=metadata)]
    batch_size = whole_number(batch_size, "batch_size")
    labels = None if label is None else torch.as_tensor(label, dtype=torch.long).reshape(-1)
    if labels is not None and len(labels) != batch_size:
        raise RConvError(f"run_baseline needs one label per image: {len(labels)} for a batch of {batch_size}")
    shared = [dict(gradients=[g.detach().float().clone() for g in grads], buffers=None,
                   metadata=dict(num_data_points=batch_size, labels=labels, local_hyperparams=None))]
    chatter = io.StringIO()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.manual_seed(seed)
        output, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    found = output.get("labels")
    if found is not None:
        found = (found.argmax(-1) if found.dtype.is_floating_point and found.dim() > 1 else found).reshape(-1)
        found = found[:batch_size].long().cpu()
    note = f"label found: {int(found[0])}" if found is not None and batch_size == 1 else f"labels found: " \
        f"{found.tolist() if found is not None else None}"
    return Reconstruction(image=output["data"][:batch_size].detach().double().cpu(), exact=False, seconds=seconds,
                          method=name, iterations=int(config.attack.optim.max_iterations),
                          notes=[note, *notes], labels=found, batch_size=batch_size,
                          image_exact=torch.zeros(batch_size, dtype=torch.bool))


class _CompareTask(NamedTuple):
    """One task of compare_baselines: some images, attacked by R-CONV and each baseline."""

    dataset: str
    model: str
    seed: int
    indices: tuple
    methods: tuple
    iterations: tuple  # (baseline, steps) pairs
    dtype: str
    first_layer: str
    data_root: str | None


class _Compared(NamedTuple):
    """One image of compare_baselines: the original, and per method its row and recovered image."""

    original: torch.Tensor
    rows: list
    images: dict  # method -> recovered image


def _compare_task(task, cache):
    """compare_baselines' images of one task, each a _Compared."""
    case = setup(task.dataset, task.model, list(task.indices), task.seed, data_root=task.data_root)
    weights = cache((case.info["name"], task.model, task.seed))
    iterations = dict(task.iterations)
    compared = []
    for index, image, label in zip(task.indices, case.images, case.labels):
        grads = client_gradients(case.model, image, label, dtype=as_dtype(task.dtype))
        results = {"rconv": reconstruct(case.model, grads, image.shape, first_layer=task.first_layer, cache=weights,
                                         batch_size=1)}
        for name in task.methods:
            results[name] = run_baseline(name, case.model, grads, image.shape, iterations=iterations.get(name),
                                         seed=index)
        rows, images = [], {}
        for method, result in results.items():
            metrics = image_metrics(image, result.image.clamp(0, 1))
            rows.append(dict(dataset=case.info["name"], model=task.model, method=method, index=index,
                             label=int(label), psnr=metrics["psnr"], ssim=metrics["ssim"], seconds=result.seconds,
                             iterations=result.iterations, exact=result.exact))
            images[method] = result.image
        compared.append(_Compared(image, rows, images))
    return compared


def _compared_table(results):
    import pandas as pd
    compared = [image for result in results for image in result]
    shown = {"original": [image.original for image in compared]}
    for image in compared:
        for method, recovered in image.images.items():
            shown.setdefault(method, []).append(recovered)
    return pd.DataFrame([row for image in compared for row in image.rows]), shown


def compare_baselines(dataset, model_name, indices, *, methods=None, iterations=None, dtype="float32",
                      first_layer="hybrid", seed=50, data_root=None, progress=True, executor=None):
    """R-CONV and the BASELINES on the same clients' gradients.

    methods: the baselines to run beside R-CONV (None: all of BASELINES; [] runs R-CONV alone,
        which needs no breaching package).
    iterations: a dict baseline name -> optimisation steps (missing: breaching's default).
    executor: as attack_grid's (None: here; a Dask Client or concurrent.futures.Executor: one
        image per task there; its workers need breaching for the baselines).
    Returns (table, reconstructions): one row per image and method (dataset, model, method,
    index, label, psnr, ssim, seconds, iterations, exact; reconstructions clipped to [0, 1]
    before they are measured) and a dict method -> list of recovered images, "original" first.
    """
    methods = list(BASELINES) if methods is None else list(methods)
    unknown = [name for name in methods if name not in BASELINES]
    if unknown:
        raise RConvError(f"unknown baseline {', '.join(map(repr, unknown))}; choose from {', '.join(BASELINES)}")
    indices = check_indices(indices)
    name = dataset_info(dataset)["name"]
    dtype = dtype_name(as_dtype(dtype))
    # one image per task: a baseline spends seconds on each
    tasks = [_CompareTask(dataset, model_name, seed, chunk, tuple(methods), tuple(sorted((iterations or {}).items())),
                          dtype, first_layer, path_text(data_root)) for chunk in chunked(indices, 1)]
    return run_tasks(_compare_task, tasks, _compared_table, executor=executor, desc=f"{name} {model_name}",
                     unit="image", progress=progress)
