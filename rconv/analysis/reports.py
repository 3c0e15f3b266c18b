"""Measuring a reconstruction and explaining it: image metrics, per-step tables, constraint counts."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..attack.constraints import max_equations, min_filters
from ..attack.network import check_input_shape, parse_network
from ..attack.pooling import AVG_ACTIVATIONS
from ..attack.steps import POOLED_MAX_UNKNOWNS, covered_input
from ..attack.systems import DENSE_MAX_UNKNOWNS, plan_solver
from ..cases.client import as_dtype
from ..common.checks import whole_number
from ..common.errors import RConvError
from ..common.geometry import conv_output_size, footprints, pool_spec

# PSNR below this no longer shows the image: where the suite says a defence stops the attack.
BROKEN_PSNR = 20.0
# What an image within float32's precision reaches, exact or not: a reconstruction no eye can tell apart.
GOOD_PSNR = 60.0
# SSIM's default 7x7 window needs images at least this large.
_SSIM_MIN_SIDE = 7


def as_image(image, name):
    """One image as a float64 (C, H, W) CPU tensor; `name` goes into the error for anything else."""
    array = torch.as_tensor(image).detach().cpu().double()
    if array.dim() == 4:
        if array.shape[0] != 1:
            raise RConvError(f"{name} must be one image; got a batch of shape {tuple(array.shape)}")
        array = array[0]
    if array.dim() != 3:
        raise RConvError(f"{name} must have shape (C, H, W) or (1, C, H, W); got {tuple(array.shape)}")
    return array


def image_metrics(original, reconstructed):
    """mse, psnr (dB, data range 1), ssim (scikit-image, data range 1) and max_abs_err of two images in [0, 1]."""
    from skimage.metrics import structural_similarity
    a, b = as_image(original, "original"), as_image(reconstructed, "reconstructed")
    if a.shape != b.shape:
        raise RConvError(f"images differ in shape: original {tuple(a.shape)}, reconstructed {tuple(b.shape)}")
    difference = (a - b).numpy()
    mse = float(np.mean(difference ** 2))
    finite = np.isfinite(difference).all()
    psnr = math.inf if mse == 0 else (10 * math.log10(1.0 / mse) if finite else -math.inf)
    # SSIM compares what a viewer sees, so the reconstruction is clipped to the image range.
    viewed = np.clip(np.nan_to_num(b.permute(1, 2, 0).numpy()), 0, 1)
    ssim = float(structural_similarity(a.permute(1, 2, 0).numpy(), viewed, channel_axis=2, data_range=1.0)) \
        if min(a.shape[1:]) >= _SSIM_MIN_SIDE else math.nan
    return dict(mse=mse, psnr=psnr, ssim=ssim, max_abs_err=float(np.abs(difference).max()))


def layer_inputs(model, image):
    """The true input of every conv layer (first to last) and of the Linear layer, for one image (float64)."""
    model = copy.deepcopy(model).double()
    network = parse_network(model)
    seen = {}
    hooks = [step.module.register_forward_hook(lambda module, args, out, n=step.number: seen.__setitem__(n, args[0]))
             for step in network.steps]
    hooks.append(network.source_linear.register_forward_hook(
        lambda module, args, out: seen.__setitem__("linear", args[0])))
    try:
        with torch.no_grad():
            image = torch.as_tensor(image)
            model(image.reshape(1, *image.shape[-3:]).double())
    finally:
        for hook in hooks:
            hook.remove()
    return [seen[step.number][0] for step in network.steps], seen["linear"][0]


def output_gradients(model, image, label, *, dtype=torch.float64):
    """The true dL/dO of every conv layer's pre-activation output (first to last) for one image."""
    dtype = as_dtype(dtype)
    model = copy.deepcopy(model).to(dtype)
    network = parse_network(model)
    outputs = {}

    def keep(out, number):
        out.retain_grad()
        outputs[number] = out

    # the pre-activation output: a folded BatchNorm's, else the conv layer's own
    hooks = [step.output_module.register_forward_hook(lambda m, a, o, n=step.number: keep(o, n))
             for step in network.steps]
    try:
        image = torch.as_tensor(image).to(dtype)
        loss = F.cross_entropy(model(image.reshape(1, *image.shape[-3:])), torch.as_tensor([int(label)]))
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return [outputs[step.number].grad[0].detach() for step in network.steps]


def solve_steps(result, model=None, image=None):
    """R-CONV's steps in solving order (Linear layer, then conv layers last to first) as a DataFrame.

    With the model and the true image, each step also shows the largest error of what it
    recovered (the layer's input) against the truth.
    """
    import pandas as pd
    truth = layer_inputs(model, image) if model is not None and image is not None else None
    rows = [dict(step="linear", method="dL/dW / dL/db", equations=None, unknowns=len(result.features), rank=None,
                 cond=None, residual=result.linear_misfit, bias_residual=None)]
    if truth is not None:
        rows[0]["max_abs_err"] = float((result.features.double() - truth[1].reshape(-1)).abs().max())
    for report in reversed(result.layers):
        row = dict(step=f"conv {report.layer}", method=report.method, equations=report.equations,
                   unknowns=report.unknowns, rank=report.rank, cond=report.cond, residual=report.residual,
                   bias_residual=report.bias_residual)
        if truth is not None:
            recovered = result.inputs[report.layer - 1].double()
            row["max_abs_err"] = float((recovered - truth[0][report.layer - 1].reshape(recovered.shape)).abs().max())
        rows.append(row)
    return pd.DataFrame(rows)


def _determined_by(row):
    """Which constraints can determine a layer's input by counting, in words."""
    if not row["linear"]:
        return f"none: {row['activation']} before an average pool gives no linear equations"
    if row["gradients_suffice"]:
        found = "gradients"
    elif row["uncovered_pixels"]:
        return "none: pixels no kernel position reaches"
    elif row["weight_constraints"] >= row["unknowns"]:
        found = "weights where active (ReLU)" if row["activation"] == "relu" else "weights"
    elif row["max_equations"] >= row["unknowns"]:
        found = "both jointly"
    else:
        return "none: too few equations"
    return f"{found}, given the pool's pattern" if row["needs_pattern"] else found


def _why_not(row):
    """Why counting leaves one layer's input undetermined, in words."""
    where = f"conv layer {row['layer']}"
    if row["determined_by"].endswith("too few equations"):
        return f"{where} has {row['unknowns']:,} unknowns and at most {row['max_equations']:,} equations"
    if row["determined_by"].endswith("reaches"):
        return f"{where} has {row['uncovered_pixels']:,} input values no kernel position reaches"
    return f"{where}: {row['determined_by'][len('none: '):]}"


def _verdict(rows):
    """The counting verdict for the whole network: how deep the attack can be exact, naming the deepest layer
    that cannot be determined (the chain runs from the Linear layer down, so every layer below it is lost too)."""
    blocked = [row for row in rows if row["determined_by"].startswith("none")]
    if not blocked:
        return "recoverable, given the pools' patterns" if any(row["needs_pattern"] for row in rows) else "recoverable"
    deepest = blocked[-1]
    reach = "the Linear layer's input" if deepest is rows[-1] else f"conv layer {deepest['layer'] + 1}'s input"
    return f"not: exact at best down to {reach}; {_why_not(deepest)}"


# constraint_report's columns, in order (for a network without conv layers, which has no row to name them).
_REPORT_COLUMNS = ["layer", "input", "filters", "kernel", "stride", "padding", "activation", "pool", "needs_pattern",
                   "linear", "unknowns", "gradient_constraints", "weight_constraints", "max_equations",
                   "uncovered_pixels", "unread_pixels", "min_filters", "gradients_suffice", "weights_suffice",
                   "weights_need_active", "batch_size", "max_batch", "determined_by", "weight_solver",
                   "weight_solver_memory"]


def constraint_report(model, input_shape, *, batch_size=1):
    """What each conv layer offers R-CONV before any gradient exists: unknowns against constraints.

    One row per conv layer. gradient_constraints counts dL/dW entries (F*k*k per input
    channel, all channels); weight_constraints counts pre-activation outputs (F*P*Q), or the pooled
    values where a pool follows (pool: "max 2x2", "avg 2x2"); max_equations counts the independent
    equations both can offer together (gradient constraints give at most H*W per channel, and a stride's
    residue classes each at most its pixels: rconv.attack.constraints.max_equations). min_filters
    is the counting bound of min_filters(); gradients_suffice / weights_suffice say whether one kind
    alone could determine the input, and determined_by which constraints can ("gradients", "weights",
    "both jointly", each with ", given the pool's pattern" where needs_pattern: a max pool's argmaxes or
    the units on before an average pool must be found first; or "none: ...", as where linear is False: Tanh
    or Sigmoid before an average pool, whose pooled values no pattern makes linear). These are necessary
    conditions: ReLU reveals the pre-activation only where active (weights_need_active is the share of
    outputs that must be), and the numerical rank decides in the end. weight_solver says how the weight
    constraints would be solved ("dense", "direct": a sparse factorisation, "krylov": preconditioned CG,
    where the sparse normal equations would be too large, or "pattern search" for a pooled layer),
    weight_solver_memory the bytes predicted for it. The table's attrs hold the network's verdict:
    attrs["recoverable"] (bool) and attrs["verdict"]: "recoverable" (with ", given the pools' patterns"
    where a layer needs one), or how deep the attack can be exact at best and which layer stops it ("not:
    exact at best down to conv layer 2's input; conv layer 1 has 3,072 unknowns and at most 1,626
    equations"); the attack runs from the Linear layer down, so the deepest undetermined layer decides.
    uncovered_pixels counts the input values no kernel position reaches (or none whose output the layer above
    reads), which no equation determines; unread_pixels those of a hidden layer's bottom and right border, which
    nothing reads at all: they are no unknowns (its row counts the rest), and the layer below knows none of its
    outputs there.

    batch_size: count for the mean gradients of B images: B times the unknowns and the weight
    constraints (each image has its own), the gradient constraints shared (at most B*H*W per
    channel). max_batch is the largest B each layer supports by counting (inf when its weight
    constraints suffice image by image), and attrs["max_batch"] the network's: the smallest over its
    layers, and below the number of classes, which a batch must stay under for its Linear layer to split;
    1 where reconstruct attacks one image only (a head after the first Linear layer, a bias-free one, a
    pool, a train-mode BatchNorm).
    """
    batch_size = whole_number(batch_size, "batch_size")
    import pandas as pd
    network = parse_network(model)
    sizes = check_input_shape(network, input_shape)
    rows = []
    for step in network.steps:
        below = network.steps[step.number - 2] if step.number > 1 else None
        above = network.steps[step.number] if step.number < len(network.steps) else None
        # A hidden layer's input border that no kernel position reaches is no unknown, nor read by anything; the
        # layer below then knows none of its outputs there (steps.covered_input).
        covered = covered_input(step, below, sizes[step.number - 1])
        read = covered_input(above, step, sizes[step.number]) if above is not None else None
        channels, height, width = covered or sizes[step.number - 1]
        unread = math.prod(sizes[step.number - 1]) - channels * height * width
        filters, out_h, out_w = read or sizes[step.number]
        kh, kw = step.conv.kernel_size
        unknowns = batch_size * channels * height * width
        along_rows, along_columns = footprints((height, width), (kh, kw), step.conv.stride, step.padding)
        # Where the layer above reads only part of this layer's output, the input beyond what that part's kernel
        # positions reach meets no equation either.
        reach = (height, width) if read is None else [
            min(size, (out - 1) * stride - pad + k)
            for size, out, stride, pad, k in zip((height, width), read[1:], step.conv.stride, step.padding, (kh, kw))]
        uncovered = height * width - sum(along_rows.covered[:reach[0]]) * sum(along_columns.covered[:reach[1]])
        needed = min_filters((height, width), (kh, kw), step.conv.stride, step.padding)
        gradient_constraints = filters * kh * kw * channels
        weight_constraints = batch_size * filters * out_h * out_w
        per_image = filters * out_h * out_w
        pool = _pool_of(step, (height, width))
        row = dict(
            layer=step.number, input="x".join(map(str, sizes[step.number - 1])), filters=filters, kernel=f"{kh}x{kw}",
            stride=step.conv.stride[0], padding=step.padding[0], activation=step.activation,
            pool=pool.name, needs_pattern=pool.needs_pattern, linear=pool.linear,
            unknowns=unknowns, gradient_constraints=gradient_constraints,
            weight_constraints=weight_constraints,
            max_equations=max_equations(channels, (height, width), (kh, kw), step.conv.stride, step.padding, filters,
                                        weight_constraints, batch_size),
            uncovered_pixels=uncovered * channels, unread_pixels=unread, min_filters=needed,
            gradients_suffice=filters >= needed * batch_size,
            weights_suffice=(weight_constraints >= unknowns and uncovered == 0 and step.activation != "relu"
                             and pool.linear),
            weights_need_active=min(1.0, unknowns / weight_constraints),
            batch_size=batch_size, max_batch=_layer_max_batch(step, (channels, height, width), per_image, uncovered))
        row["determined_by"] = (_determined_by(row) if not step.blind_to_shifts else
                                f"none: its train-mode BatchNorm cannot see a constant added to an input channel "
                                f"without padding ({channels} directions)")
        row["weight_solver"], row["weight_solver_memory"] = (
            _weight_solver(step, covered or sizes[step.number - 1], batch_size) if pool.name is None
            else _pool_solver(unknowns))
        rows.append(row)
    # Without conv layers the table has no row: the Linear layer's input is the image, determined by itself.
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=_REPORT_COLUMNS)
    table.attrs["verdict"] = _verdict(rows)
    table.attrs["recoverable"] = table.attrs["verdict"].startswith("recoverable")
    classes = network.linear.out_features
    table.attrs["max_batch"] = (1 if network.one_image_only() else
                                int(min(table.max_batch.min(), classes - 1)) if rows else classes - 1)
    return table


class _PoolCount(NamedTuple):
    """What a conv layer's pool changes in its count."""

    name: str | None  # "max 2x2", "avg 2x2", or None without a pool
    needs_pattern: bool  # its equations hold only once the pattern (argmaxes, units on) is found
    linear: bool  # False: no pattern makes its pooled values linear in the input (Tanh, Sigmoid before AvgPool)


def _pool_of(step, input_size):
    """The pool after a conv step, as counting sees it: pooled values are the weight constraints (already counted
    at the pooled size), and the output gradient is known only through the pattern."""
    if step.pool is None:
        return _PoolCount(None, False, True)
    out = conv_output_size(input_size, step.conv.kernel_size, step.conv.stride, step.padding)
    kind, window = pool_spec(step.pool, out)
    piecewise_linear = step.activation in AVG_ACTIVATIONS
    if kind == "avg":
        return _PoolCount(f"avg {window}x{window}", step.activation != "identity", piecewise_linear)
    return _PoolCount(f"max {window}x{window}", True, True)


def _pool_solver(unknowns):
    """How a pooled layer is solved: dense solves inside its pattern search, up to the search's size."""
    return ("pattern search" if unknowns <= POOLED_MAX_UNKNOWNS else "none: beyond the pattern search"), None


def _weight_solver(step, input_shape, batch_size):
    """How the layer's weight constraints would be solved ("dense", "direct" sparse, or "krylov") and the memory
    predicted for it in bytes (for "direct", before the factor's fill-in, which PARDISO measures later)."""
    if batch_size * math.prod(input_shape) <= DENSE_MAX_UNKNOWNS:
        return "dense", None
    # ReLU reveals only the units that are on: a Krylov solve of partial rows needs no preconditioner's factor
    chosen = plan_solver(tuple(step.conv.weight.shape), input_shape, step.conv.stride, step.padding,
                         partial=step.activation == "relu")
    return chosen.solver, chosen.memory


def _layer_max_batch(step, input_size, weight_rows, uncovered):
    """The largest batch whose B*C*H*W unknowns a layer's equations can match by counting (max_equations): each
    image's weight_rows, plus the gradient constraints the batch shares."""
    channels, height, width = input_size
    if uncovered:
        return 0
    if weight_rows >= channels * height * width:
        return math.inf

    def enough(batch):
        return max_equations(channels, (height, width), step.conv.kernel_size, step.conv.stride, step.padding,
                             step.conv.out_channels, batch * weight_rows, batch) >= batch * channels * height * width
    batch = 0
    while enough(batch + 1):  # the shared gradient rows are finite, so each image's deficit ends the count
        batch += 1
    return batch


class BatchMatch(NamedTuple):
    """A batch's reconstructions matched to its originals (the attack returns them in no particular order)."""

    order: list  # order[i]: the reconstruction matched to original i, or None when fewer were found
    table: object  # pandas DataFrame, one row per original: image_metrics, labels, image_exact


def match_batch(originals, labels, result):
    """Match each original of a batch to the reconstruction closest to it (least total squared error).

    originals: (B, C, H, W) images; labels: their (B,) true labels; result: reconstruct()'s Reconstruction.
    """
    import pandas as pd
    from scipy.optimize import linear_sum_assignment
    originals = torch.as_tensor(originals).double()
    found = result.image.double()
    if originals.dim() != 4 or found.dim() != 4 or originals.shape[1:] != found.shape[1:]:
        raise RConvError(f"match_batch needs originals (B, C, H, W) shaped like the reconstruction "
                         f"{tuple(found.shape)}; got {tuple(originals.shape)}")
    order = [None] * len(originals)
    if len(found):
        cost = torch.cdist(originals.flatten(1), torch.nan_to_num(found, nan=1e9, posinf=1e9,
                                                                   neginf=-1e9).flatten(1)).numpy()
        for i, j in zip(*linear_sum_assignment(cost)):
            order[i] = int(j)
    rows = []
    for i, j in enumerate(order):
        metrics = image_metrics(originals[i], found[j]) if j is not None else \
            dict(mse=math.nan, psnr=math.nan, ssim=math.nan, max_abs_err=math.nan)
        rows.append(dict(member=i, matched=j, label=int(labels[i]),
                         recovered_label=int(result.labels[j]) if j is not None else None,
                         image_exact=bool(result.image_exact[j]) if j is not None else False) | metrics)
    return BatchMatch(order, pd.DataFrame(rows))
