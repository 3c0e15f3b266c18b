"""The networks people train (rconv.cases.networks) attacked as they are: which layer inputs come back exact,
the image beside Inverting Gradients' on the same gradients, and what refuses."""

from __future__ import annotations

import itertools
import math
import time

import pandas as pd

from ..analysis.reports import constraint_report, image_metrics, layer_inputs
from ..attack.reconstruct import reconstruct
from ..cases.client import as_dtype, client_gradients, dtype_name
from ..cases.setup import setup
from ..common.errors import RConvError
from ..common.progress import progress_bar
from .baselines import breaching_missing, run_baseline

# A layer input counts as recovered exactly within the brief's bars: 1e-6 max abs error from float64
# gradients, 60 dB (an RMS error of 1e-3 on the input's own scale) from float32.
_EXACT_ERROR = {"float64": 1e-6}
_EXACT_DB = 60.0


def _layer_rows(key, result, model, image, dtype):
    """One row per recovered layer input, last (the Linear layer's) first: its error and the attack's claim."""
    truth, features = layer_inputs(model, image)
    claims = {report.layer: report.full_rank and not report.stopped for report in result.layers}
    pairs = [("features", result.features.flatten(), features.flatten(), True)]
    pairs += [(f"conv {k + 1} input", x.flatten(), t.flatten(), claims[k + 1]) for k, (x, t)
              in reversed(list(enumerate(zip(result.inputs, truth))))]
    rows = []
    for layer, got, want, determined in pairs:
        error = float((got - want.double()).abs().max())
        scale = float(want.double().abs().max()) or 1.0
        rms = float((got - want.double()).pow(2).mean().sqrt()) / scale
        db = math.inf if rms == 0 else -20 * math.log10(rms)
        exact = error <= _EXACT_ERROR[dtype] if dtype in _EXACT_ERROR else db >= _EXACT_DB
        rows.append(dict(key, layer=layer, max_abs_err=error, psnr=db, exact=exact, determined=determined))
    return rows


def _counting(model, input_shape):
    """constraint_report's verdict for a network, or why it cannot count it."""
    try:
        return constraint_report(model, input_shape).attrs["verdict"]
    except RConvError as error:
        return f"refused: {error}"


def attack_networks(networks, indices, *, dtypes=("float64", "float32"), ig_iterations=500, seed=50,
                    data_root=None, progress=True):
    """Attack each network of rconv.cases.networks on its dataset's images, from each precision's gradients.

    Returns (attacks, layers): attacks has one row per network, dtype and image (counting: constraint_report's
    verdict for the network, before any gradient; outcome "exact", "not exact" or "refused" with the reason,
    the image's psnr, Inverting Gradients' psnr on the same gradients when
    breaching is installed, seconds); layers one row per recovered layer input (its error against the truth,
    whether it is exact by the brief's bars, and whether the attack called it determined).
    ig_iterations: Inverting Gradients' Adam steps, as the Baselines notebook's CPU budget (0: not run).
    """
    baseline = ig_iterations > 0 and not breaching_missing()
    attacks, layers = [], []
    for name in progress_bar(networks, desc="networks", unit="network", enabled=progress):
        case = setup(None, name, indices, seed, data_root=data_root)
        counting = _counting(case.model, tuple(case.images.shape[1:]))
        for dtype, (index, image, label) in itertools.product(dtypes, zip(indices, case.images, case.labels)):
            key = dict(network=name, dataset=case.info["name"], counting=counting,
                       dtype=dtype_name(as_dtype(dtype)), index=index)
            grads = client_gradients(case.model, image, int(label), dtype=as_dtype(dtype))
            start = time.perf_counter()
            try:
                result = reconstruct(case.model, grads, image.shape)
            except RConvError as error:
                attacks.append(dict(key, outcome="refused", reason=str(error), psnr=math.nan,
                                    ig_psnr=math.nan, seconds=time.perf_counter() - start, ig_seconds=math.nan))
                continue
            row = dict(key, outcome="exact" if result.exact else "not exact",
                       reason="; ".join(result.reasons[:2]), psnr=image_metrics(image, result.image[0])["psnr"],
                       ig_psnr=math.nan, seconds=result.seconds, ig_seconds=math.nan)
            if baseline:
                ig = run_baseline("inverting_gradients", case.model, grads, image.shape, label=int(label),
                                  iterations=ig_iterations, seed=seed)
                row.update(ig_psnr=image_metrics(image, ig.image[0])["psnr"], ig_seconds=ig.seconds)
            attacks.append(row)
            layers.extend(_layer_rows(key, result, case.model, image, key["dtype"]))
    return pd.DataFrame(attacks), pd.DataFrame(layers)
