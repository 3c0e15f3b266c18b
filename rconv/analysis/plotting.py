"""Every figure of the suite, each built from a results table (or its CSV) or from images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..cases.client import DEFENCES, DTYPES
from ..common.errors import RConvError
from .reports import BROKEN_PSNR, GOOD_PSNR, as_image, image_metrics


def _pyplot():
    # Imported late: matplotlib picks Agg by itself without a display, and inline in notebooks.
    import matplotlib.pyplot as plt
    return plt


def _show_image(axis, image):
    array = as_image(image, "image").clamp(0, 1).permute(1, 2, 0).numpy()
    axis.imshow(array[..., 0] if array.shape[2] == 1 else array, cmap="gray" if array.shape[2] == 1 else None,
                vmin=0, vmax=1, interpolation="nearest")
    axis.set_xticks([])
    axis.set_yticks([])


def plot_reconstruction(original, reconstructed, *, path=None, title=None):
    """Original beside reconstructed and their absolute difference, with the metrics; saved to path if given."""
    plt = _pyplot()
    metrics = image_metrics(original, reconstructed)
    difference = (as_image(original, "original") - as_image(reconstructed, "reconstructed")).abs()
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    _show_image(axes[0], original)
    axes[0].set_title("original\n", fontsize=9)
    _show_image(axes[1], reconstructed)
    axes[1].set_title(f"reconstructed\nPSNR {metrics['psnr']:.1f} dB, SSIM {metrics['ssim']:.4f}", fontsize=9)
    shown = axes[2].imshow(difference.max(0).values.numpy(), cmap="magma", interpolation="nearest")
    axes[2].set_title(f"|difference|\nmax {metrics['max_abs_err']:.1e}", fontsize=9)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path, rect=(0, 0, 1, 0.93 if title else 1))


def plot_grid(originals, reconstructions, *, path=None, columns=10, title=None, indices=None):
    """Originals (odd rows) above their reconstructions (even rows); saved to path if given.

    indices: the images' dataset indices, written above each original.
    """
    plt = _pyplot()
    originals = [getattr(image, "image", image) for image in originals]
    reconstructions = [getattr(image, "image", image) for image in reconstructions]
    if not originals or len(originals) != len(reconstructions):
        raise RConvError(f"plot_grid needs as many reconstructions as originals, at least one; got "
                         f"{len(originals)} and {len(reconstructions)}")
    count = len(originals)
    indices = list(indices) if indices is not None else None
    if indices is not None and len(indices) != count:
        raise RConvError(f"plot_grid needs one index per image; got {len(indices)} for {count} images")
    columns = min(columns, count)
    blocks = math.ceil(count / columns)
    figure, axes = plt.subplots(2 * blocks, columns, figsize=(columns * 0.9, blocks * 1.9), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for k, (original, reconstructed) in enumerate(zip(originals, reconstructions)):
        row, column = 2 * (k // columns), k % columns
        for offset, image in ((0, original), (1, reconstructed)):
            axis = axes[row + offset, column]
            axis.axis("on")
            _show_image(axis, image)
        if indices is not None:
            axes[row, column].set_title(f"#{indices[k]}", fontsize=7, pad=2)
        if column == 0:
            axes[row, 0].set_ylabel("orig.", fontsize=7)
            axes[row + 1, 0].set_ylabel("recon.", fontsize=7)
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi=110)


def plot_methods(originals, reconstructions, *, path=None, title=None, columns=10):
    """One row per method (after the originals), one column per image.

    reconstructions: a dict method name -> list of images (or Reconstructions), aligned with originals.
    """
    plt = _pyplot()
    count = min(columns, len(originals))
    rows = [("original", list(originals[:count]))] + [
        (name, [getattr(r, "image", r) for r in images[:count]]) for name, images in reconstructions.items()]
    figure, axes = plt.subplots(len(rows), count, figsize=(count * 0.95, len(rows) * 1.05), squeeze=False)
    for row, (name, images) in enumerate(rows):
        for column, image in enumerate(images):
            axis = axes[row, column]
            if image is None or not bool(torch.isfinite(torch.as_tensor(image)).all()):
                axis.axis("off")
                continue
            _show_image(axis, image)
        axes[row, 0].set_ylabel(name.replace("_", "\n"), fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def _broken_line(axis, threshold=BROKEN_PSNR):
    """The dotted PSNR line below which an attack counts as failed, labelled for the legend."""
    return axis.axhline(threshold, color="grey", linestyle=":", linewidth=1,
                        label=f"{threshold:g} dB: below it the attack failed")


def plot_psnr(table, *, path=None, by="dtype", title=None):
    """PSNR of every image (dots) per group of `by` (e.g. dtype), from a results table or CSV path."""
    from matplotlib.lines import Line2D
    plt = _pyplot()
    table = _table(table)
    groups = list(dict.fromkeys(table[by]))
    figure, axis = plt.subplots(figsize=(4.2 + 1.6 * len(groups), 3.6))
    generator = np.random.default_rng(0)
    judged = "exact" in table
    for k, group in enumerate(groups):
        values = table.loc[table[by] == group, "psnr"].to_numpy(dtype=float)
        values = np.where(np.isfinite(values), values, np.nan)
        exact = table.loc[table[by] == group, "exact"].to_numpy(dtype=bool) if judged else None
        jitter = k + generator.uniform(-0.18, 0.18, len(values))
        colours = np.where(exact, "tab:green", "tab:red") if judged else "tab:blue"
        axis.scatter(jitter, values, s=9, c=colours, alpha=0.7, linewidths=0)
        if np.isfinite(values).any():
            axis.hlines(np.nanmedian(values), k - 0.3, k + 0.3, colors="black", linewidth=1.5)
    axis.set_xticks(range(len(groups)), [str(g) for g in groups])
    axis.set_ylabel("PSNR (dB, data range 1)")
    dot = dict(marker="o", linestyle="", markersize=4)
    handles = ([Line2D([], [], color="tab:green", label="image, exact", **dot),
                Line2D([], [], color="tab:red", label="image, not exact", **dot)] if judged
               else [Line2D([], [], color="tab:blue", label="image", **dot)])
    handles += [Line2D([], [], color="black", linewidth=1.5, label="median"), _broken_line(axis)]
    axis.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_title(title or "PSNR per image", fontsize=9)
    return _save(figure, path)


def _table(source):
    import pandas as pd
    return pd.read_csv(source) if isinstance(source, (str, Path)) else source


def _save(figure, path, dpi=120, rect=None):
    figure.tight_layout(rect=rect)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    return figure


def plot_precision(table, *, path=None):
    """PSNR per gradient dtype for each first-layer method and ReLU test, one panel per dataset."""
    plt = _pyplot()
    table = _table(table)
    datasets = list(dict.fromkeys(table.dataset))
    dtypes = [d for d in DTYPES if d in set(table.dtype)]
    methods = list(dict.fromkeys(zip(table.first_layer, table.relu_test)))
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(methods))
    for axis, dataset in zip(axes[0], datasets):
        part = table[table.dataset == dataset]
        for m, (first_layer, relu_test) in enumerate(methods):
            for d, dtype in enumerate(dtypes):
                values = part[(part.first_layer == first_layer) & (part.relu_test == relu_test) &
                              (part.dtype == dtype)].psnr.to_numpy(dtype=float)
                values = np.clip(values[np.isfinite(values)], -50, None)
                x = d - 0.4 + width * (m + 0.5)
                if len(values):
                    axis.scatter(np.full(len(values), x), values, s=4, color=colours(m), alpha=0.35, linewidths=0)
                    axis.hlines(np.median(values), x - width / 2, x + width / 2, color=colours(m), linewidth=2,
                                label=f"{first_layer}, {relu_test} ReLU test" if d == 0 else None)
        axis.set_xticks(range(len(dtypes)), dtypes)
        _broken_line(axis)
        axis.set_title(dataset)
    axes[0, 0].set_ylabel("PSNR (dB, data range 1; floored at -50)")
    axes[0, -1].legend(fontsize=7, loc="upper right")
    figure.suptitle("R-CONV by the precision of the client's gradients (bars: medians)", fontsize=10)
    return _save(figure, path)


def plot_defences(table, *, path=None, threshold=BROKEN_PSNR):
    """Median PSNR and SSIM against defence strength, plain and projected solves, per dataset."""
    plt = _pyplot()
    table = _table(table)
    defences = [d for d in DEFENCES if d != "none" and d in set(table.defence)]
    figure, axes = plt.subplots(2, len(defences), figsize=(4.4 * len(defences), 6.4), squeeze=False)
    styles = {False: "-", True: "--"}
    colours = plt.get_cmap("tab10")
    datasets = list(dict.fromkeys(table.dataset))
    labels = {"gaussian": "noise norm / gradient norm", "topk": "fraction of entries kept", "quantize": "bits"}
    for column, defence in enumerate(defences):
        part = table[table.defence == defence]
        for k, dataset in enumerate(datasets):
            for project in sorted(set(part.project)):
                rows = part[(part.dataset == dataset) & (part.project == project)]
                medians = rows.groupby("strength")[["psnr", "ssim"]].median().sort_index()
                for row, metric in enumerate(("psnr", "ssim")):
                    axes[row, column].plot(medians.index, medians[metric], styles[bool(project)], marker=".",
                                           color=colours(k),
                                           label=f"{dataset}{', projected' if project else ''}")
        for row in range(2):
            axis = axes[row, column]
            if defence != "quantize":
                axis.set_xscale("log")
            if defence != "gaussian":
                axis.invert_xaxis()  # stronger defence to the right
            axis.set_xlabel(labels[defence])
        _broken_line(axes[0, column], threshold)
        axes[0, column].set_title(defence)
    axes[0, 0].set_ylabel("median PSNR (dB)")
    axes[1, 0].set_ylabel("median SSIM")
    axes[0, -1].legend(fontsize=7)
    figure.suptitle("R-CONV under defences (right: stronger)", fontsize=10)
    return _save(figure, path)


# A weight-constraint count beyond this multiple of the largest count swept is drawn as a note at
# the panel's edge: LeNet_All_ReLU's layer 2 asks 308 filters where the curves live at 16-30.
_OFF_AXIS_FACTOR = 2.0


def _weight_count_marker(axis, model, count, colour, right_edge):
    """The model's weight-constraint count: a dotted line, or an arrow at the edge when it lies far beyond."""
    from matplotlib.lines import Line2D
    label = f"{model}: weight-constraint count ({count})"
    if count <= right_edge:
        axis.axvline(count, color=colour, linestyle=":", linewidth=1.5, label=label)
        return
    axis.annotate(f"{count} \u2192", xy=(0.99, 0.12), xycoords="axes fraction", ha="right", va="center",
                  color=colour, fontsize=8)
    axis.add_artist(Line2D([], [], color=colour, linestyle=":", linewidth=1.5, label=f"{label}, off the axis \u2192"))


def plot_filters(table, *, path=None):
    """Fraction of images and seeds whose gradient constraints are full rank, against filter count.

    One panel per conv layer, each with its own legend: a curve per model, labelled with that
    layer's activation, the model's weight-constraint count and the counting bound. A weight-
    constraint count far beyond the counts swept is noted at the panel's right edge.
    """
    plt = _pyplot()
    table = _table(table)
    positions = sorted(set(table.position))
    figure, axes = plt.subplots(1, len(positions), figsize=(3.7 * len(positions), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    models = list(dict.fromkeys(table.model))
    for axis, position in zip(axes[0], positions):
        part = table[table.position == position]
        bound = int(part.min_filters.iloc[0])
        swept = max(int(part.filters.max()), bound)
        right_edge = max([swept] + [count for count in part.rgap_filters if count <= _OFF_AXIS_FACTOR * swept])
        for model, rows in part.groupby("model", sort=False):
            colour = colours(models.index(model))
            fraction = rows.groupby("filters").full_rank.mean()
            axis.plot(fraction.index, fraction.values, marker="o", color=colour,
                      label=f"{model}, layer {position} {rows.activation.iloc[0]}")
            _weight_count_marker(axis, model, int(rows.rgap_filters.iloc[0]), colour, right_edge)
        axis.axvline(bound, color="black", linestyle="--", linewidth=1, label=f"counting bound ({bound})")
        left = min(int(part.filters.min()), bound, int(part.rgap_filters.min()))
        margin = 0.05 * (right_edge - left) + 0.5
        off_axis = bool((part.rgap_filters > right_edge).any())  # room for the note at the edge
        axis.set_xlim(left - margin, right_edge + margin * (3 if off_axis else 1))
        axis.set_title(f"conv layer {position}")
        axis.set_xlabel("filters")
        axis.set_ylim(-0.05, 1.05)
        handles = [artist for artist in axis.get_lines() + axis.artists if not artist.get_label().startswith("_")]
        axis.legend(handles=handles, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    axes[0, 0].set_ylabel("fraction full rank")
    figure.suptitle("How many filters the gradient constraints need", fontsize=10)
    return _save(figure, path)


def plot_success(table, *, path=None):
    """Per preset and dtype: the share recovered exactly, reported rank-deficient, and otherwise not exact."""
    plt = _pyplot()
    table = _table(table)
    groups = list(table.groupby(["model", "dtype"], sort=False))
    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(groups) + 1.2))
    for k, ((model, dtype), rows) in enumerate(groups):
        exact = rows.exact.mean()
        deficient = (rows.rank_deficient & ~rows.exact).mean()
        other = 1 - exact - deficient
        left = 0.0
        for share, colour, label in ((exact, "tab:green", "exact"), (deficient, "tab:orange", "rank-deficient"),
                                     (other, "tab:red", "full rank, not exact")):
            axis.barh(k, share, left=left, color=colour, label=label if k == 0 else None)
            left += share
        rest = rows[~rows.exact].psnr
        note = f"{exact:.1%} exact" + (f"; rest median {rest.median():.0f} dB" if len(rest) else "")
        axis.text(1.01, k, note, va="center", fontsize=7)
    axis.set_yticks(range(len(groups)), [f"{m} {d}" for (m, d), _ in groups], fontsize=8)
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_xlabel("share of images x seeds")
    axis.legend(fontsize=7, loc="lower left")
    axis.set_title("How often each architecture leaks its training image", fontsize=10)
    return _save(figure, path)


_DTYPE_COLOURS = {"float64": "tab:blue", "float32": "tab:orange", "bfloat16": "tab:green", "float16": "tab:red"}
_START_STYLES = {"cold": ("-", "o"), "warm": ("--", "s")}  # line style and marker


def _by_verdict(table):
    """The rows whose network the counting bound calls recoverable, and the others."""
    recoverable = table.recoverable.astype(str).str.lower().eq("true")
    return table[recoverable], table[~recoverable & table.verdict.fillna("").astype(str).str.startswith("not")]


def _size_panel(axis, table, column, series, ylabel):
    """Medians of `column` against size: a line per (dtype, series value) for networks recoverable by
    counting, crosses for the others."""
    recoverable, others = _by_verdict(table)
    for (dtype, kind), rows in recoverable.groupby(["dtype", series], sort=False):
        medians = rows.groupby("size")[column].median().dropna()
        style, marker = _START_STYLES.get(kind, ("-", "o")) if series == "start" else ("-", "o")
        axis.plot(medians.index, medians.values, linestyle=style, marker=marker, color=_DTYPE_COLOURS.get(dtype))
    for dtype, rows in others.groupby("dtype", sort=False):
        medians = rows.groupby("size")[column].median().dropna()
        axis.scatter(medians.index, medians.values, marker="x", s=40, color=_DTYPE_COLOURS.get(dtype))
    axis.set_xlabel("image side (px)")
    axis.set_ylabel(ylabel)
    axis.set_xticks(sorted(set(table["size"])))


def plot_sizes(table, *, path=None):
    """A size_sweep table (or its CSV): time and peak memory against image size, and the counting
    verdict against the outcome.

    Left: seconds per image, cold (the first image of a network, factorisations included) and warm
    (further images), medians; middle: the process's peak resident memory during an attack;
    right: the share of images recovered exactly per network, hatched where the counting bound
    says the network is not recoverable. Lines join the networks the counting bound calls
    recoverable; crosses mark the others.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    plt = _pyplot()
    table = _table(table)
    missing = [c for c in ("size", "model", "dtype", "start", "seconds", "peak_mb", "exact", "verdict",
                           "recoverable") if c not in table.columns]
    if missing:
        raise RConvError(f"plot_sizes needs a size_sweep table; missing columns {missing}")
    dtypes = [d for d in DTYPES if d in set(table.dtype)]
    figure, (time_axis, memory_axis, verdict_axis) = plt.subplots(1, 3, figsize=(15, 5.6))
    _size_panel(time_axis, table, "seconds", "start", "seconds per image (median)")
    time_axis.set_yscale("log")
    time_axis.set_title("time against image size", fontsize=9)
    _size_panel(memory_axis, table.assign(peak_gb=table.peak_mb / 1024), "peak_gb", "dtype",
                "peak resident memory (GB, median)")
    memory_axis.set_title("memory against image size", fontsize=9)
    colours = [Line2D([], [], color=_DTYPE_COLOURS.get(d), linewidth=2, label=f"{d} gradients") for d in dtypes]
    not_recoverable = Line2D([], [], color="black", marker="x", linestyle="", label="not recoverable by counting")
    starts = [Line2D([], [], color="black", linestyle=style, marker=marker, label=label)
              for style, marker, label in ((*_START_STYLES["cold"], "cold: first image, factorisations included"),
                                           (*_START_STYLES["warm"], "warm: a further image on the same model"))]
    below = dict(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # legends never hide data
    time_axis.legend(handles=colours + starts + [not_recoverable], **below)
    memory_axis.legend(handles=colours + [not_recoverable], **below)
    networks = list(dict.fromkeys(zip(table["size"], table.model)))
    width = 0.8 / max(1, len(dtypes))
    for k, (size, model) in enumerate(networks):
        rows = table[(table["size"] == size) & (table.model == model)]
        recoverable = str(rows.recoverable.iloc[0]).lower() == "true"
        for d, dtype in enumerate(dtypes):
            attacks = rows[rows.dtype == dtype]
            share = attacks.exact.astype(bool).mean() if len(attacks) else 0.0
            x = k - 0.4 + width * (d + 0.5)
            verdict_axis.bar(x, share, width, color=_DTYPE_COLOURS.get(dtype), hatch=None if recoverable else "//",
                             edgecolor="black", linewidth=0.5)
            verdict_axis.text(x, share + 0.02, f"{int(attacks.exact.astype(bool).sum())}/{len(attacks)}",
                              ha="center", fontsize=6)
    verdict_axis.set_xticks(range(len(networks)), [f"{model}\n{size} px" for size, model in networks], fontsize=7)
    verdict_axis.set_ylim(0, 1.1)  # room for the counts above the bars
    verdict_axis.set_ylabel("share of images recovered exactly (counts above)")
    verdict_axis.set_title("counting verdict against outcome", fontsize=9)
    hatches = [Patch(facecolor="white", edgecolor="black", label="counting: recoverable"),
               Patch(facecolor="white", edgecolor="black", hatch="//", label="counting: not recoverable")]
    verdict_axis.legend(handles=[Patch(color=_DTYPE_COLOURS.get(d), label=f"{d} gradients") for d in dtypes] + hatches,
                        **below)
    figure.suptitle("R-CONV at high resolution", fontsize=10)
    return _save(figure, path)


_METHOD_STYLES = {"rconv": ("-", "o"), "dlg": (":", "v"), "idlg": (":", "^"), "inverting_gradients": ("--", "s")}


def plot_batches(table, *, path=None):
    """A batch_sweep table (or its CSV): exact share, median PSNR and seconds against batch size.

    Colour: network and dtype; line style: the attack (R-CONV solid, baselines dotted or dashed);
    a grey line marks each network's counting bound (max_batch) where it falls inside the plot.
    """
    from matplotlib.lines import Line2D

    from .summaries import batch_summary
    plt = _pyplot()
    summary = batch_summary(_table(table))
    if summary.empty:
        raise RConvError("plot_batches needs a batch_sweep table with at least one row")
    figure, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    series = list(dict.fromkeys(zip(summary.model, summary.dtype)))
    palette = plt.get_cmap("tab10")
    colours = {key: palette(k % 10) for k, key in enumerate(series)}
    panels = (("exact", "share of images exact"), ("median_psnr", "median PSNR (dB)"),
              ("seconds", "seconds per batch (median)"))
    for axis, (column, label) in zip(axes, panels):
        for (method, model, dtype), part in summary.groupby(["method", "model", "dtype"], sort=False):
            style, marker = _METHOD_STYLES.get(method, ("-.", "x"))
            axis.plot(part.batch_size, part[column], linestyle=style, marker=marker, color=colours[(model, dtype)])
        for model, bound in dict(zip(summary.model, summary.max_batch)).items():
            if bound < summary.batch_size.max():
                axis.axvline(bound + 0.5, color="grey", linewidth=0.8, linestyle="-.")
        axis.set_xlabel("batch size B")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[0].set_ylim(-0.05, 1.05)
    handles = [Line2D([], [], color=colours[key], linewidth=2, label=f"{key[0]}, {key[1]}") for key in series]
    handles += [Line2D([], [], color="black", linestyle=s, marker=m, label=name)
                for name, (s, m) in _METHOD_STYLES.items() if name in set(summary.method)]
    handles.append(Line2D([], [], color="grey", linestyle="-.", label="counting bound (max_batch)"))
    for axis in axes:
        axis.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.suptitle("R-CONV on mini-batches: one mean gradient, every image", fontsize=10)
    return _save(figure, path)


_FEDERATED_COLUMNS = {"scenario", "lr", "local_steps", "epsilon", "method", "psnr", "image_exact"}
# Where a setting without noise (epsilon infinite) is drawn: this many times the largest finite epsilon.
_NO_NOISE_FACTOR = 100.0


def _epsilon_axis(axis, table):
    """x positions of the DP settings' epsilons (inf drawn past the largest finite one) and the axis' ticks."""
    finite = table.epsilon[np.isfinite(table.epsilon)]
    beyond = (finite.max() if len(finite) else 1.0) * _NO_NOISE_FACTOR
    axis.set_xscale("log")
    axis.axvline(beyond, color="lightgrey", linestyle="--", linewidth=1)
    axis.annotate("no noise", (beyond, 1.0), xycoords=("data", "axes fraction"), ha="right", va="top",
                  rotation=90, fontsize=7, color="grey")
    axis.set_xlabel("epsilon at delta 1e-5 (smaller: more private)")
    return table.epsilon.where(np.isfinite(table.epsilon), beyond)


def plot_federated(table, *, path=None):
    """The federated study: R-CONV's median PSNR per learning rate and local steps (FedSGD, FedAvg), and under
    DP-SGD against epsilon, with each baseline beside it and the share of images certified exact."""
    plt = _pyplot()
    table = _table(table)
    missing = sorted(_FEDERATED_COLUMNS - set(table.columns))
    if missing or table.empty:
        raise RConvError(f"plot_federated needs a federated_round table with at least one row; missing columns "
                         f"{missing}")
    figure, axes = plt.subplots(1, 3, figsize=(14.5, 4.0))
    plain = table[(table.scenario != "dp_sgd") & (table.method == "rconv")]
    for steps, rows in plain.groupby("local_steps"):
        medians = rows.groupby("lr").psnr.median().sort_index()
        axes[0].plot(medians.index, medians, marker="o",
                     label=f"{steps} local step{'s' if steps > 1 else ''}{' (FedSGD)' if steps == 1 else ' (FedAvg)'}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("client learning rate")
    axes[0].set_title("plain clients, float32 weights", fontsize=9)
    private = table[table.scenario == "dp_sgd"].copy()
    if len(private):
        private["where"] = _epsilon_axis(axes[1], private)
        _epsilon_axis(axes[2], private)
        for method, rows in private.groupby("method", sort=False):
            medians = rows.groupby("where").psnr.median().sort_index()
            line, = axes[1].plot(medians.index, medians, marker="o", label=method)
            lost = medians[medians.isna()]  # no image came back to measure: drawn at 0 dB, hollow
            if len(lost):
                axes[1].plot(lost.index, np.zeros(len(lost)), linestyle="", marker="o", markerfacecolor="none",
                             color=line.get_color(), label=f"{method}: no image found")
        rconv = private[private.method == "rconv"].groupby("where")
        axes[2].plot(rconv.image_exact.mean().sort_index(), marker="o", label="R-CONV: certified exact")
        axes[2].plot(rconv.psnr.apply(lambda psnr: float((psnr >= GOOD_PSNR).mean())).sort_index(),
                     marker="s", linestyle="--", label=f"R-CONV: at >= {GOOD_PSNR:g} dB")
    axes[1].set_title("DP-SGD clients: median PSNR", fontsize=9)
    axes[2].set_title("DP-SGD clients: share of images", fontsize=9)
    axes[2].set_ylim(-0.05, 1.05)
    for axis in axes[:2]:
        axis.set_ylabel("median PSNR (dB)")
        _broken_line(axis)
    for axis in axes:
        axis.legend(fontsize=7)
    figure.suptitle("A federated round as the server sees it", fontsize=10)
    return _save(figure, path)


# An exact image's PSNR is infinite (or beyond 150 dB): its bar is drawn to this height.
_PSNR_CEILING = 150.0


def plot_real_networks(table, *, path=None):
    """Median image PSNR per network people train: R-CONV and Inverting Gradients from each precision's
    gradients, exact images drawn at the ceiling, refused networks marked."""
    plt = _pyplot()
    table = _table(table)
    if table.empty or not {"network", "dtype", "outcome", "psnr", "ig_psnr"} <= set(table.columns):
        raise RConvError("plot_real_networks needs attack_networks' attacks table with at least one row")
    networks, dtypes = list(dict.fromkeys(table.network)), list(dict.fromkeys(table.dtype))
    series = [(method, dtype) for method in ("psnr", "ig_psnr") for dtype in dtypes]
    width = 0.8 / len(series)
    figure, axis = plt.subplots(figsize=(1.6 * len(networks) + 3, 3.6))
    for k, (column, dtype) in enumerate(series):
        medians = [table[(table.network == n) & (table.dtype == dtype)][column].median() for n in networks]
        heights = [min(m, _PSNR_CEILING) if m == m else 0.0 for m in medians]
        label = f"{'R-CONV' if column == 'psnr' else 'Inverting Gradients'}, {dtype} gradients"
        axis.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(networks))], heights, width,
                 color=_DTYPE_COLOURS.get(dtype), hatch="" if column == "psnr" else "//", alpha=0.9, label=label)
    for i, network in enumerate(networks):
        if (table[table.network == network].outcome == "refused").all():
            axis.text(i, 5, "refused", ha="center", fontsize=8, rotation=90)
    axis.axhline(_PSNR_CEILING, color="grey", linewidth=0.6, linestyle=":")
    axis.set_xticks(range(len(networks)), networks, fontsize=8)
    axis.set_ylabel(f"median PSNR (dB; exact drawn at {_PSNR_CEILING:g})")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_title("Networks people train, attacked as they are", fontsize=9)
    return _save(figure, path)
