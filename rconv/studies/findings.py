"""One sentence per study for results/README.md, read off the tables its notebook stored.

Each function takes the study's summary.csv (read) and its results folder, for the other CSVs it
reads, and returns the sentence; FINDINGS maps a notebook's name to its function, and finding() falls back to
"see the notebook" when the tables are missing or not as expected.
"""
from pathlib import Path

import pandas as pd


def precision(summary, folder):
    at = summary.set_index(["dtype", "first_layer", "relu_test"]).median_psnr
    return (f"float32: the published method (weights, absolute ReLU test) {at[('float32', 'weights', 'absolute')]:.0f}"
            f" dB median, the default (hybrid, relative) {at[('float32', 'hybrid', 'relative')]:.0f} dB; "
            f"bfloat16 {at.get(('bfloat16', 'hybrid', 'relative'), float('nan')):.0f} dB, "
            f"float16 {at.get(('float16', 'hybrid', 'relative'), float('nan')):.0f} dB")


def defences(summary, folder):
    breaks = pd.read_csv(folder / "breaking_points.csv")
    plain = breaks[~breaks.project.astype(bool)]
    parts = [f"{row.defence} at {row.breaks_at:g} ({row.dataset})" for row in plain.itertuples()
             if pd.notna(row.breaks_at)]
    return "median PSNR falls below 20 dB: " + ("; ".join(parts) if parts else "never in the tested range")


def filters(summary, folder):
    first = summary.model.iloc[0]
    parts = [f"layer {row.position} {row.measured_filters:.0f} vs {row.rgap_filters}"
             for row in summary.itertuples() if row.model == first]
    return f"{first}, filters the gradient constraints need vs a weight-constraint count: " + ", ".join(parts)


def success_rates(summary, folder):
    return "exact: " + ", ".join(f"{row.model} {row.dtype} {row.exact:.1%}" for row in summary.itertuples())


def baselines(summary, folder):
    """Per network, as R-CONV's time per image differs 25-fold between them."""
    medians = pd.read_csv(folder / "metrics.csv").groupby(["model", "method"], sort=False).agg(
        psnr=("psnr", "median"), seconds=("seconds", "median"))
    return "; ".join(f"{model}: " + ", ".join(f"{method} {row.psnr:.0f} dB in {row.seconds:.3g} s"
                                              for (_, method), row in part.iterrows())
                     for model, part in medians.groupby(level="model", sort=False))


def high_resolution(summary, folder):
    """Per network the counting bound calls recoverable: exact count, cold and warm seconds, peak memory; then
    how many of the others were reported exact (none, if the attack is honest)."""
    parts = []
    for (size, model), part in summary[summary.verdict == "recoverable"].groupby(["size", "model"], sort=False):
        warm = f", {part.warm_seconds.max():.2g} s warm" if part.warm_seconds.notna().any() else ""
        parts.append(f"{model} {size} px {part.exact.sum()}/{part.images.sum()} exact, "
                     f"{part.cold_seconds.max():.2g} s cold{warm}, {part.peak_mb.max() / 1024:.1f} GB")
    others = summary[summary.verdict.fillna("").str.startswith("not")]
    if len(others):
        sizes = ", ".join(str(size) for size in dict.fromkeys(others["size"]))
        parts.append(f"not recoverable by counting ({'/'.join(dict.fromkeys(others.model))} at {sizes} px): "
                     f"{others.exact.sum()} of {others.images.sum()} reported exact")
    return "float64 and float32 gradients: " + "; ".join(parts)


def batches(summary, folder):
    """Per dataset, network and dtype: the largest batch whose images all came back exact, and all at
    >= 60 dB, against the counting bound; within the bound, how many images were exact and at >= 60 dB
    per dtype; then images claimed exact beyond the bound (none, if the attack is honest)."""
    rconv = summary[summary.method == "rconv"]
    parts = []
    for (dataset, model, dtype), part in rconv.groupby(["dataset", "model", "dtype"], sort=False):
        whole, good = part[part.exact == 1.0].batch_size, part[part.good == 1.0].batch_size
        parts.append(f"{dataset} {model} {dtype}: all exact up to B = {whole.max() if len(whole) else 0}, all at "
                     f">= 60 dB up to B = {good.max() if len(good) else 0} (counting bound {part.max_batch.iloc[0]})")
    for dtype, part in rconv[rconv.batch_size <= rconv.max_batch].groupby("dtype", sort=False):
        count = {share: int((part[share] * part.images).round().sum()) for share in ("exact", "good")}
        parts.append(f"within the bound, {dtype}: {count['exact']} exact and {count['good']} at >= 60 dB of "
                     f"{int(part.images.sum())} images")
    beyond = rconv[rconv.batch_size > rconv.max_batch]
    claimed = int((beyond.exact * beyond.images).round().sum()) if len(beyond) else 0
    return "; ".join(parts) + f"; beyond the bound {claimed} of {int(beyond.images.sum())} images claimed exact"


def federated(summary, folder):
    """FedSGD at each learning rate, FedAvg at its best, and the epsilon below which DP-SGD stops R-CONV (its
    median PSNR under 20 dB) beside the baselines' median PSNR there."""
    rconv = summary[summary.method == "rconv"]
    fedsgd = rconv[rconv.scenario == "fedsgd"]
    parts = ["FedSGD " + ", ".join(f"lr {row.lr:g}: {row.share_good:.0%} at >= 60 dB ({row.share_exact:.0%} exact)"
                                   for row in fedsgd.itertuples())]
    fedavg = rconv[rconv.scenario == "fedavg"]
    if len(fedavg):
        parts.append(f"FedAvg (2+ local steps): at most {fedavg.share_good.max():.0%} at >= 60 dB, "
                     f"{fedavg.share_exact.max():.0%} exact")
    private = summary[summary.scenario == "dp_sgd"]
    working = private[(private.method == "rconv") & (private.median_psnr >= 20)]
    if len(working):
        parts.append(f"DP-SGD: R-CONV's median PSNR stays above 20 dB only up to noise multiplier "
                     f"{working.noise_multiplier.max():g} (epsilon {working.epsilon.min():.3g})")
    for method, part in private[private.method != "rconv"].groupby("method", sort=False):
        parts.append(f"{method} under DP-SGD {part.median_psnr.min():.0f}-{part.median_psnr.max():.0f} dB")
    return "; ".join(parts)


def real_networks(summary, folder):
    """Per network people train: how deep the attack is exact from float64, and its PSNR beside Inverting
    Gradients'."""
    layers = pd.read_csv(folder / "layers.csv")
    parts = []
    for network, part in summary.groupby("network", sort=False):
        first = part.iloc[0]
        if first.outcome == "refused":
            parts.append(f"{network} refused")
            continue
        dtype = first["dtype"]  # a row's .dtype would be the Series' own
        rows = layers[(layers.network == network) & (layers.dtype == dtype)]
        depth = rows.layer[rows.exact.astype(bool).cumprod().astype(bool)].tolist()
        reached = f"exact down to the {depth[-1]}" if depth else "nothing exact"
        parts.append(f"{network} {reached} ({dtype}), image {first.median_psnr:.0f} dB vs Inverting "
                     f"Gradients {first.median_ig_psnr:.0f} dB")
    return "; ".join(parts)


FINDINGS = {"Precision": precision, "Defences": defences, "Filters": filters, "Success_rates": success_rates,
            "Baselines": baselines, "High_resolution": high_resolution, "Batches": batches,
            "Federated": federated, "Real_networks": real_networks}


def finding(name, folder):
    """The sentence of the study `name` from its results folder; "" for a notebook that is no study."""
    if name not in FINDINGS:
        return ""
    try:
        return FINDINGS[name](pd.read_csv(Path(folder) / "summary.csv"), Path(folder))
    except (OSError, KeyError, ValueError, AttributeError):  # tables missing, or not of this study's shape
        return "see the notebook"
