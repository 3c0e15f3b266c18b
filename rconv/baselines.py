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

import torch
import torch.nn as nn

from .attack import Reconstruction, reconstruct
from .cases import setup
from .client import as_dtype, client_gradients
from .data import check_indices
from .errors import RConvError
from .network import check_gradients, check_input_shape, parse_network
from .progress import progress_bar
from .reports import image_metrics

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
    try:
        _breaching()
    except ImportError as error:
        return str(error)
    return ""


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


def run_baseline(name, model, grads, input_shape, label=None, iterations=None, seed=0):
    """An optimisation attack of the breaching package on the same gradients, as a Reconstruction.

    Args:
        name: one of BASELINES: "dlg", "idlg" or "inverting_gradients".
        label: the true label, if the attacker is to be given it; None lets the attack find it
            (DLG optimises it, iDLG and Inverting Gradients read it off the last layer's gradient).
        iterations: optimisation steps; None keeps breaching's default (DLG 1200, Inverting
            Gradients 24000, far beyond a CPU budget).
        seed: seed of the random starting image.
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
    labels = None if label is None else torch.as_tensor([int(label)])
    shared = [dict(gradients=[g.detach().float().clone() for g in grads], buffers=None,
                   metadata=dict(num_data_points=1, labels=labels, local_hyperparams=None))]
    chatter = io.StringIO()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.manual_seed(seed)
        output, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    found = output.get("labels")
    found = int(found.reshape(-1)[0].argmax() if found is not None and found.dtype.is_floating_point
                else found.reshape(-1)[0]) if found is not None else None
    return Reconstruction(image=output["data"][:1].detach().double().cpu(), exact=False, seconds=seconds,
                          method=name, iterations=int(config.attack.optim.max_iterations),
                          notes=[f"label found: {found}", *notes])


def compare_baselines(dataset, model_name, indices, *, methods=None, iterations=None, dtype="float32",
                      first_layer="hybrid", seed=50, data_root=None, progress=True):
    """R-CONV and the BASELINES on the same clients' gradients.

    methods: the baselines to run beside R-CONV (None: all of BASELINES; [] runs R-CONV alone,
        which needs no breaching package).
    iterations: a dict baseline name -> optimisation steps (missing: breaching's default).
    Returns (table, reconstructions): one row per image and method (dataset, model, method,
    index, label, psnr, ssim, seconds, iterations, exact; reconstructions clipped to [0, 1]
    before they are measured) and a dict method -> list of recovered images, "original" first.
    """
    import pandas as pd
    methods = list(BASELINES) if methods is None else list(methods)
    unknown = [name for name in methods if name not in BASELINES]
    if unknown:
        raise RConvError(f"unknown baseline {', '.join(map(repr, unknown))}; choose from {', '.join(BASELINES)}")
    indices = check_indices(indices)
    case = setup(dataset, model_name, indices, seed, data_root=data_root)
    iterations = dict(iterations or {})
    rows, shown, cache = [], {"original": list(case.images)}, {}
    items = progress_bar(list(zip(indices, case.images, case.labels)), desc=f"{case.info['name']} {model_name}",
                         unit="image", enabled=progress, mininterval=5.0)
    for index, image, label in items:
        grads = client_gradients(case.model, image, label, dtype=as_dtype(dtype))
        results = {"rconv": reconstruct(case.model, grads, image.shape, first_layer=first_layer, cache=cache)}
        for name in methods:
            results[name] = run_baseline(name, case.model, grads, image.shape, iterations=iterations.get(name),
                                         seed=index)
        for method, result in results.items():
            metrics = image_metrics(image, result.image.clamp(0, 1))
            rows.append(dict(dataset=case.info["name"], model=model_name, method=method, index=index,
                             label=int(label), psnr=metrics["psnr"], ssim=metrics["ssim"], seconds=result.seconds,
                             iterations=result.iterations, exact=result.exact))
            shown.setdefault(method, []).append(result.image)
    return pd.DataFrame(rows), shown
