"""Summaries of the studies' tidy tables: one row per setting, read off the rows the loops wrote.

Pure table functions (pandas in, pandas out), so that a figure or a report can summarise a CSV
without running, or importing, the loops that made it.
"""

from __future__ import annotations

import math

from ..common.errors import RConvError
from .reports import BROKEN_PSNR, GOOD_PSNR


def batch_summary(table, *, good_psnr=GOOD_PSNR):
    """Per method, network, dtype and batch size: images, exact share, share at >= good_psnr dB, median PSNR,
    labels right, median seconds per batch, and the counting bound."""
    missing = [c for c in ("method", "model", "dtype", "batch_size", "image_exact", "psnr", "label",
                           "recovered_label", "seconds", "max_batch") if c not in table.columns]
    if missing:
        raise RConvError(f"batch_summary needs a batch_sweep table; missing columns {missing}")
    import pandas as pd
    rows = []
    for (method, model, dtype, size), part in table.groupby(["method", "model", "dtype", "batch_size"], sort=False):
        psnr = part.psnr.astype(float)
        rows.append(dict(method=method, model=model, dtype=dtype, batch_size=size, max_batch=part.max_batch.iloc[0],
                         images=len(part), exact=float(part.image_exact.astype(bool).mean()),
                         good=float((psnr >= good_psnr).mean()),
                         median_psnr=float(psnr.median()) if psnr.notna().any() else math.nan,
                         labels_right=float((part.label == part.recovered_label).mean()),
                         seconds=float(part.groupby("first_index").seconds.first().median())))
    return pd.DataFrame(rows)


def breaking_points(table, *, threshold=BROKEN_PSNR, by=("dataset", "defence", "project")):
    """Per defence: the weakest strength whose median PSNR falls below `threshold` dB (NaN if none)."""
    import pandas as pd
    missing = [column for column in ("defence", "strength", "psnr") if column not in table.columns]
    if missing:
        raise RConvError(f"breaking_points needs a table with columns defence, strength and psnr; missing {missing}")
    rows = []
    # every group holds one defence: their strengths run in opposite directions
    by = list(dict.fromkeys([column for column in by if column in table.columns] + ["defence"]))
    for key, group in table[table.defence != "none"].groupby(by, sort=False):
        medians = group.groupby("strength").psnr.median()
        # gaussian grows stronger with strength; top-k and quantisation with smaller keep ratios or bits
        ordered = medians.sort_index(ascending=group.defence.iloc[0] == "gaussian")
        broken = ordered[ordered < threshold]
        rows.append(dict(zip(by, key if isinstance(key, tuple) else (key,)),
                         breaks_at=broken.index[0] if len(broken) else math.nan,
                         strongest_tested=ordered.index[-1], psnr_at_strongest=ordered.iloc[-1]))
    return pd.DataFrame(rows)


def filter_summary(table, *, level=0.95):
    """Per model and conv position: the fewest filters full rank for at least `level` of images and seeds,
    against the counting bound and the weight-constraint (R-GAP style) count."""
    import pandas as pd
    rows = []
    for (model, position), part in table.groupby(["model", "position"], sort=False):
        shares = part.groupby("filters").full_rank.mean()
        enough = shares[shares >= level]
        measured = int(enough.index.min()) if len(enough) else math.nan
        rgap = int(part.rgap_filters.iloc[0])
        rows.append(dict(model=model, position=position, activation=part.activation.iloc[0],
                         pixels_per_channel=int(part.unknowns.iloc[0]), min_filters=int(part.min_filters.iloc[0]),
                         measured_filters=measured, rgap_filters=rgap,
                         share_of_rgap=measured / rgap if rgap and not math.isnan(measured) else math.nan))
    return pd.DataFrame(rows)


def success_rates(table):
    """Per model and dtype: attacks, the share recovered exactly, the share reported rank-deficient,
    and the median PSNR of the attacks that were not exact."""
    import pandas as pd
    rows = []
    for (model, dtype), part in table.groupby(["model", "dtype"], sort=False):
        rest = part[~part.exact]
        rows.append(dict(model=model, dtype=dtype, attacks=len(part), seeds=part.seed.nunique(),
                         images=part["index"].nunique(), exact=part.exact.mean(),
                         rank_deficient=(part.rank_deficient & ~part.exact).mean(),
                         median_psnr=part.psnr.median(),
                         median_psnr_not_exact=rest.psnr.median() if len(rest) else math.nan))
    return pd.DataFrame(rows)


def summarize(table, *, by=("dataset", "model", "dtype", "first_layer")):
    """Per setting: attacks (rows; images when a setting holds one seed and defence), exact count,
    rank-deficient count, median PSNR and SSIM, median seconds."""
    missing = [column for column in ("psnr", "ssim", "exact", "seconds") if column not in table.columns]
    if missing:
        raise RConvError(f"summarize needs a results table with columns psnr, ssim, exact and seconds; "
                         f"missing {missing}")
    if table.empty:
        raise RConvError("summarize got an empty table: no attacks to summarise")
    by = [column for column in by if column in table.columns]
    if not by:
        raise RConvError(f"summarize needs at least one of its `by` columns in the table; it has "
                         f"{list(table.columns)}")
    grouped = table.groupby(by, sort=False)
    summary = grouped.agg(images=("psnr", "size"), exact=("exact", "sum"),
                          median_psnr=("psnr", "median"), median_ssim=("ssim", "median"),
                          median_seconds=("seconds", "median"))
    if "rank_deficient" in table.columns:
        summary.insert(2, "rank_deficient", grouped["rank_deficient"].sum())
    return summary.reset_index()


def size_summary(table):
    """Per network and dtype of a size_sweep table: its counting verdict, images, exact count, median
    PSNR, the largest error, cold and warm seconds per image (medians), and the largest peak_mb."""
    missing = [c for c in ("size", "model", "channels", "dtype", "start", "verdict", "exact", "psnr", "max_abs_err",
                           "seconds", "peak_mb") if c not in table.columns]
    if missing:
        raise RConvError(f"size_summary needs a size_sweep table; missing columns {missing}")
    import pandas as pd
    rows = []
    for (size, model, channels, dtype), part in table.groupby(["size", "model", "channels", "dtype"], sort=False,
                                                               dropna=False):
        rows.append(dict(size=size, model=model, channels=channels, dtype=dtype, verdict=part.verdict.iloc[0],
                         images=len(part), exact=int(part.exact.astype(bool).sum()), median_psnr=part.psnr.median(),
                         max_abs_err=part.max_abs_err.max(),
                         cold_seconds=part.seconds[part.start == "cold"].median(),
                         warm_seconds=part.seconds[part.start == "warm"].median(), peak_mb=part.peak_mb.max()))
    return pd.DataFrame(rows)


def federated_summary(table, *, good_psnr=GOOD_PSNR):
    """Per setting and method: images, the share certified exact, the share at >= good_psnr dB, median PSNR and
    median seconds per update."""
    keys = ["scenario", "lr", "local_steps", "noise_multiplier", "max_grad_norm", "epsilon", "method"]
    grouped = table.groupby(keys, sort=False, dropna=False)
    return grouped.agg(images=("psnr", "size"), share_exact=("image_exact", "mean"),
                       share_good=("psnr", lambda psnr: float((psnr >= good_psnr).mean())),
                       median_psnr=("psnr", "median"), median_seconds=("seconds", "median")).reset_index()
