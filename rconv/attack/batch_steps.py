"""The steps of the attack on a mini-batch: its Linear layer split into images, then each conv layer.

A client that trains on B images shares the mean of their gradients. split_linear reads each
image's Linear-layer input (its features) and its share c_n = delta_n / B of dL/dlogits off the
Linear layer's gradients; from there every conv layer is solved for all the batch's inputs:

* gradient constraints are shared by the whole batch: sum_n A_n x_n[c] = dL/dW[:, c], one system of
  B*H*W unknowns per input channel, with the same matrix [A_1 ... A_B] for every channel;
* weight constraints stay per image: M x_n + b = O_n where image n's pre-activation is known;
* where neither alone can determine the inputs, both jointly (one dense system), if small enough.

Each layer reports the batch as a whole; each image is trusted only if every layer determined it.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch

from ..linalg.memory import check
from ..linalg.solvers import TINY, Spectrum, System, eps, norm_2, rank_rtol, solve
from ..split.linear import split_linear, track_split
from .activations import NOISE_MARGIN, Noise, batch_branches
from .steps import (LINEAR_NOISE_GAIN, LayerReport, Signal, bias_misfit, covered_mask, cropped, layer_equations,
                    noise_of, padded, project_input, unread_note)
from .nullspace import complete, null_images, null_space
from .systems import (COMPLETION_MAX_DIRECTIONS, DEFLATION_SIZE, DEFLATION_STEPS, counted_equations, estimate_layer,
                      solve_layer)

# A joint system of both kinds of constraint over the whole batch is solved dense, up to this
# many unknowns (a 6,848 x 6,144 matrix for two of the paper's LeNet layer-2 inputs, ~0.3 GB).
JOINT_DENSE_MAX_UNKNOWNS = 8192
# A split feature's entries may stray from the truth by up to ~17x its error bar (error bars are
# 0.06-2.1x the actual error, and far above it in float32); zeros are looked for up to 30x.
_SPLIT_ERROR_MARGIN = 30.0
_FLOAT64_BYTES = 8


class BatchLinear(NamedTuple):
    """The Linear layer of a batch: one Signal per image found, their labels, and what the split said."""

    signals: list
    readings: list  # lists of Signals like `signals`, each reading the features' zeros its own way
    features: torch.Tensor  # (B, N)
    labels: torch.Tensor  # (B,)
    trusted: bool  # the split vouches for every member (status "ok")
    reasons: list
    notes: list


class BatchLayer(NamedTuple):
    """One conv layer solved for a whole batch."""

    inputs: torch.Tensor  # (B, C, H, W)
    report: LayerReport
    signals: list  # Signal per image for the layer below
    determined: list  # bool per image: this layer determined its input
    notes: tuple
    activation_reads: list  # steps.ActivationRead per image: how the activation was read


def batch_linear_step(network, grads, shape, options, batch_size, zeros=None):
    """Split the Linear layer's gradients into the batch's images: features, gradients reaching them, labels.

    zeros: where an earlier split's features were zero, one mask per member (the error bound's
    probe): its members are followed into these gradients (linear_split.track_split) when they can be.
    """
    wide = dict(device=options.device, dtype=torch.float64)
    linear = network.linear
    weight = linear.weight.detach().to(**wide)
    arguments = (grads.of(linear.weight).to(**wide), grads.of(linear.bias).to(**wide), weight,
                 linear.bias.detach().to(**wide))
    split = track_split(*arguments, dtype=options.tolerances.dtype, zeros=zeros) if zeros is not None else None
    if split is None:
        split = split_linear(*arguments, dtype=options.tolerances.dtype, batch_size=batch_size,
                             noise=update_noise(grads, linear))
    signals, cautious = [], []
    for features, contribution, error_bar in zip(split.features.to(**wide), split.contributions.to(**wide),
                                                 split.error_bars.tolist()):
        activated, activated_grad = features.view(shape), (weight.T @ contribution).view(shape)
        signals.append(Signal(activated, activated_grad, Noise(LINEAR_NOISE_GAIN, max(0.0, -float(activated.min())))))
        cautious.append(Signal(activated, activated_grad, Noise(LINEAR_NOISE_GAIN, _zero_noise(activated, error_bar))))
    notes = [f"Linear layer: batch split {split.status}: {len(signals)} image(s) found, batch size "
             f"{split.batch_size}, gradient rank {split.rank}"] + list(split.notes)
    reasons = [f"Linear layer: the batch split is {split.status}: {reason}" for reason in split.reasons]
    if split.status != "ok" and not reasons:
        reasons.append(f"Linear layer: the batch split is {split.status}")
    if grads.local_steps > 1:
        reasons.append(f"Linear layer: the gradients average {grads.local_steps} local SGD steps, each taken at "
                       f"other weights: no batch of images gives them exactly, so its images are approximations")
    readings = [signals] + ([cautious] if any(a.noise != b.noise for a, b in zip(signals, cautious)) else [])
    trusted = split.status == "ok" and grads.local_steps == 1
    return BatchLinear(signals, readings, split.features.to(**wide), split.labels, trusted, reasons, notes)


def update_noise(grads, linear):
    """The RMS error a weight update's rounding left in the entries of [dL/dW, dL/db] (0 for shared gradients)."""
    features = linear.weight.shape[1]
    weight, bias = grads.rounding_of(linear.weight), grads.rounding_of(linear.bias)
    return math.sqrt((features * weight ** 2 + bias ** 2) / (features + 1))


def _zero_noise(activated, error_bar):
    """The noise on a split feature's zeros by its error bar, for the ReLU test (which reads units
    below 3x it as zero): the cautious reading, beside the one by its negative entries alone.

    A feature split off an ill-conditioned batch (two images of one label) errs by more than
    rounding and maybe to one side only (by a multiple of another member's features), so its
    negative entries understate the noise on its zeros, while its error bar may overstate it by
    far more than its smallest true activations (measured: either reading misreads some batches,
    never both). Above both the negative entries' noise and one error bar, the zeros' cluster
    ends at the widest gap (as a ratio) between consecutive entries.
    """
    negative = max(0.0, -float(activated.min()))
    scale = float(activated.abs().max())
    low = max(NOISE_MARGIN * negative, error_bar * scale)
    high = _SPLIT_ERROR_MARGIN * error_bar * scale
    if high <= low:
        return low / NOISE_MARGIN
    values = activated.flatten()
    between = torch.sort(values[(values > low) & (values <= high)]).values
    if len(between) == 0:
        return low / NOISE_MARGIN
    edges = torch.cat([torch.tensor([max(low, TINY)], dtype=values.dtype, device=values.device), between,
                       torch.tensor([high], dtype=values.dtype, device=values.device)])
    widest = int(torch.argmax(edges[1:] / edges[:-1]))
    return float(torch.sqrt(edges[widest] * edges[widest + 1])) / NOISE_MARGIN


def _joint_gradients(equations, rhs, dtype, memory_limit, label):
    """sum_n A_n x_n[c] = dL/dW[:, c] for every channel c: one dense (F*k*k, B*H*W) matrix for all channels."""
    rows, pixels = equations[0].gradients.shape
    check(2 * rows * pixels * len(equations) * _FLOAT64_BYTES,
          f"{label}: the batch's gradient-constraint matrix ({rows:,} x {pixels * len(equations):,}, dense)",
          memory_limit)
    matrix = torch.cat([e.gradients.matrix for e in equations], dim=1)
    system = System(tuple(matrix.shape), lambda x: matrix @ x, lambda y: matrix.T @ y, rhs, matrix=matrix)
    x, spectrum = solve(system, rank_rtol(dtype, system.shape))
    return x, spectrum, system.residual(x)  # x: (B*H*W, C)


def _joint_hybrid(equations, rhs, dtype, memory_limit, label):
    """Both kinds jointly: each image's known weight rows on its own block, the shared gradient rows on all."""
    batch, channels, pixels = len(equations), equations[0].channels, equations[0].pixels
    unknowns = batch * channels * pixels
    weight_rows = sum(int(e.known.sum()) for e in equations)
    gradient_rows = channels * equations[0].gradients.shape[0]
    check(3 * (weight_rows + gradient_rows) * unknowns * _FLOAT64_BYTES,
          f"{label}: the batch's joint constraint matrix ({weight_rows + gradient_rows:,} x {unknowns:,}, dense)",
          memory_limit)
    gradients = torch.cat([e.gradients.matrix for e in equations], dim=1)  # (F*k*k, B*H*W)
    matrix = gradients.new_zeros(weight_rows + gradient_rows, unknowns)
    # Columns run (image, channel, pixel). Rows: each image's known weight rows on its own block, then
    # per channel c the kernel rows, with A_n on the columns of (image n, channel c).
    row, size = 0, channels * pixels
    for n, e in enumerate(equations):
        block = e.weights.dense()[e.known]
        matrix[row:row + len(block), n * size:(n + 1) * size] = block
        row += len(block)
    kernel_rows = gradients.shape[0]
    for c in range(channels):
        for n in range(batch):
            matrix[weight_rows + c * kernel_rows:weight_rows + (c + 1) * kernel_rows,
                   n * size + c * pixels:n * size + (c + 1) * pixels] = gradients[:, n * pixels:(n + 1) * pixels]
    # Each kind scaled to unit Frobenius norm, as for one image, so that neither dominates.
    weight_scale = 1.0 / max(float(torch.linalg.norm(matrix[:weight_rows])), TINY)
    gradient_scale = 1.0 / max(float(torch.linalg.norm(gradients)) * math.sqrt(channels), TINY)
    matrix[:weight_rows] *= weight_scale
    matrix[weight_rows:] *= gradient_scale
    outputs = torch.cat([e.output for e in equations]) * weight_scale
    target = torch.cat([outputs, rhs.T.reshape(-1) * gradient_scale])[:, None]
    system = System(tuple(matrix.shape), lambda x: matrix @ x, lambda y: matrix.T @ y, target, matrix=matrix)
    x, spectrum = solve(system, rank_rtol(dtype, system.shape))
    return x.view(batch, channels, pixels), spectrum, system.residual(x)


def _joint_completion(equations, rhs, dtype, memory_limit, label):
    """Both kinds jointly, through the null space of the batch's gradient constraints [A_1 ... A_B] (see
    nullspace.complete): None when it leaves too many directions to solve densely."""
    batch, channels, pixels = len(equations), equations[0].channels, equations[0].pixels
    rows = equations[0].gradients.shape[0]
    weight_rows = sum(int(e.known.sum()) for e in equations)
    # no image's pre-activation known anywhere: no weight row to complete with (and no matrix to factorise)
    if weight_rows == 0 or channels * (batch * pixels - min(rows, batch * pixels)) > COMPLETION_MAX_DIRECTIONS:
        return None
    check(3 * rows * batch * pixels * _FLOAT64_BYTES, f"{label}: the batch's gradient-constraint matrix "
          f"({rows:,} x {batch * pixels:,}, dense)", memory_limit)
    matrix = torch.cat([e.gradients.matrix for e in equations], dim=1)  # (F*k*k, B*H*W)
    null = null_space(matrix, dtype)
    columns = channels * null.basis.shape[1]
    if columns > COMPLETION_MAX_DIRECTIONS:
        return None
    check(3 * weight_rows * columns * _FLOAT64_BYTES, f"{label}: the batch's weight constraints on the null space "
          f"of its gradient constraints ({weight_rows:,} x {columns:,}, dense)", memory_limit)
    # Image n's weight rows see only its own pixels: the n-th block of every null direction.
    images = torch.cat([null_images(e.weights, null.basis[n * pixels:(n + 1) * pixels], e.known)
                        for n, e in enumerate(equations)])

    def apply_weights(x):  # x (C, B*H*W): each image's known weight rows
        per_image = x.view(channels, batch, pixels).transpose(0, 1)
        return torch.cat([e.weights.apply(xn.reshape(-1, 1))[e.known] for e, xn in zip(equations, per_image)])

    outputs = torch.cat([e.output for e in equations]).reshape(-1, 1)
    completed = complete(null, (lambda x: matrix @ x.T, rhs), (apply_weights, outputs), images, dtype)
    x = completed.x.view(channels, batch, pixels).transpose(0, 1)
    return x, completed.spectrum, completed.residual


def _gradient_images(equations, basis):
    """A_n applied to every weak direction, for each image n: (rows * C, B*k), rows laid out as (row, channel)."""
    channels, pixels, directions = equations[0].channels, equations[0].pixels, basis.shape[1]
    columns = basis.view(channels, pixels, directions).permute(1, 0, 2).reshape(pixels, channels * directions)
    blocks = [e.gradients.apply(columns).view(-1, channels, directions).reshape(-1, directions) for e in equations]
    return torch.cat(blocks, dim=1)


def _joint_deflated(equations, rhs, dtype, memory_limit, label):
    """Each image from the model's cached factorisation of its weight constraints (all rows known), then
    corrected jointly: the batch's shared gradient constraints settle every image's coordinates along M's
    smallest singular directions, the only ones where the weights alone may be unreliable (rank deficient at
    the gradients' precision). A small dense system of B*k unknowns, whatever the layer's size."""
    batch, channels = len(equations), equations[0].channels
    weights = equations[0].weights
    # float64's tolerance: the factorisation solves every direction, the gradient constraints then correct the weak
    # ones (the single image's deflated hybrid shares it)
    factor = weights.factor(rank_rtol(torch.float64, weights.shape))
    subspace = factor.small_subspace(min(weights.shape[1], DEFLATION_SIZE))
    directions = subspace.basis.shape[1]
    rows = equations[0].gradients.shape[0] * channels
    check(2 * rows * batch * directions * _FLOAT64_BYTES, f"{label}: the batch's gradient constraints on its "
          f"images' weakest weight directions ({rows:,} x {batch * directions:,}, dense)", memory_limit)
    gradient_images = _gradient_images(equations, subspace.basis)
    shared = torch.cat([e.gradients.matrix for e in equations], dim=1)  # [A_1 ... A_B], the same for every channel
    # each kind scaled to unit Frobenius norm over the batch, as the single image's hybrid is
    weight_scale = _unit_scale(math.sqrt(batch * float(weights.row_norms.sum())))
    gradient_scale = _unit_scale(math.sqrt(channels) * float(torch.linalg.norm(shared)))
    scaled = gradient_scale * gradient_images
    normal = scaled.T @ scaled
    weak = (weight_scale * subspace.sigma) ** 2  # images^T images is diagonal: the directions are singular
    normal += torch.diag(weak.repeat(batch))
    eigenvalues, vectors = torch.linalg.eigh(normal)
    sigma = eigenvalues.clamp_min(0).sqrt()
    # the stacked system's norm is at most the hypotenuse of its blocks' (block-diagonal over images for the
    # weights, over channels for the gradients)
    top = math.hypot(weight_scale * factor.sigma_max, gradient_scale * norm_2(shared))
    top = max(top, float(sigma.max()))
    unknowns = batch * weights.shape[1]
    rtol = rank_rtol(dtype, (batch * weights.shape[0] + gradient_images.shape[0], unknowns))
    keep = sigma > rtol * top
    inverse = torch.where(keep, 1.0 / eigenvalues.clamp_min(TINY), torch.zeros_like(eigenvalues))
    # Directions outside the subspace keep at least the weights' k-th smallest singular value.
    outside = weight_scale * float(subspace.sigma.max()) if directions < weights.shape[1] else math.inf
    floor = min(float(sigma[keep].min()) if bool(keep.any()) else 0.0, outside)
    outputs = torch.stack([e.output for e in equations], dim=1)  # (rows of M, B): every row known

    def misfits(x):  # of both kinds, each scaled
        return weight_scale * (outputs - weights.apply(x)), gradient_scale * (rhs - _batch_gradients(equations, x))

    x = factor.least_squares(outputs)  # (C*H*W, B)
    for _ in range(DEFLATION_STEPS):
        weight_misfit, gradient_misfit = misfits(x)
        reduced = weight_scale * (subspace.images.T @ weight_misfit).T.reshape(-1)
        reduced = reduced + gradient_scale * (gradient_images.T @ gradient_misfit.reshape(-1))
        coefficients = vectors @ (inverse * (vectors.T @ reduced))
        x = x + subspace.basis @ coefficients.view(batch, directions).T
    weight_misfit, gradient_misfit = misfits(x)
    residual = math.hypot(float(torch.linalg.norm(weight_misfit)), float(torch.linalg.norm(gradient_misfit))) / \
        max(math.hypot(float(torch.linalg.norm(weight_scale * outputs)), float(torch.linalg.norm(gradient_scale * rhs))),
            TINY)
    spectrum = Spectrum(unknowns - int((~keep).sum()), top / floor if floor > 0 else math.inf)
    return x.T.reshape(batch, channels, -1), spectrum, residual


def _unit_scale(norm):
    """The factor that scales a kind of constraint to unit Frobenius norm; 1 for a kind that is all zeros (a
    batch whose gradients vanish), whose scale would overflow instead of reporting rank 0."""
    return 1.0 / norm if norm > 0 else 1.0


def _batch_gradients(equations, x):
    """sum_n A_n x_n[c] for x (C*H*W, B): the batch's weight gradient its inputs give, (rows, C)."""
    channels, pixels = equations[0].channels, equations[0].pixels
    return sum(e.gradients.apply(x[:, n].view(channels, pixels).T) for n, e in enumerate(equations))


def _methods(equations, unknowns):
    """The methods to try on a batch layer, in order, or ["estimate"] with the reason when none can determine it.

    Per-image weight constraints go first where every image has enough of them (their
    factorisation is cached per model), then the batch's gradient constraints where they are enough,
    then both jointly: dense up to JOINT_DENSE_MAX_UNKNOWNS, beyond it reduced to each image's weakest
    weight directions (_joint_deflated, where every image's weight rows are all known). A layer below
    one that was not determined is still solved (unlike one image's): a batch's layer is untrusted as
    soon as one image's precision falls short, while its images may still be close, and the verdict
    already says so.
    """
    rows, pixels = equations[0].gradients.shape
    batch = len(equations)
    order = ["weights"] if all(int(e.known.sum()) >= e.unknowns for e in equations) else []
    if rows >= batch * pixels:
        order.append("gradients")
    weight_rows = sum(int(e.known.sum()) for e in equations)
    counted = equations[0].channels * min(rows, batch * pixels) + weight_rows
    if counted < unknowns and not order:
        return ["estimate"], f"{unknowns:,} unknowns over the batch and at most {counted:,} equations"
    if unknowns <= JOINT_DENSE_MAX_UNKNOWNS and weight_rows:  # without weight rows it is "gradients" again
        order.append("gradients+weights")
    elif all(bool(e.known.all()) for e in equations) and equations[0].weights.shape[0] >= equations[0].unknowns:
        # Beyond the dense joint solve's size: the weights, with the batch's gradients along their weakest
        # directions. Below it the dense solve stays, as it is the more accurate (measured: the paper's LeNet,
        # float32, B = 2: 91 dB against the reduced solve's 87 dB, though in 52 s against 7 s).
        order.append("hybrid")
    if not order:
        return ["estimate"], (f"its joint system over the batch has {unknowns:,} unknowns, more than the "
                              f"{JOINT_DENSE_MAX_UNKNOWNS:,} this version solves jointly")
    return order, ""


def _trusted(spectrum, residual, unknowns, tolerances):
    """Full rank, a small residual, and a condition number the gradients' precision can bear."""
    return (spectrum.rank == unknowns and residual <= tolerances.residual
            # cond * eps within the error an exact image may have (the precision's rounding, amplified)
            and spectrum.cond * eps(tolerances.dtype) <= tolerances.image_error)


class _Solved(NamedTuple):
    """A batch layer's inputs as one method found them."""

    x: torch.Tensor  # (B, C, H, W)
    spectra: list  # Spectrum per image (the joint one, repeated, for joint systems)
    rank: int
    cond: float
    residual: float
    determined: list  # bool per image
    method: str  # "gradients", "weights", "gradients+weights" or "estimate"
    notes: tuple = ()


def _solve_joint(method, equations, weight_grad, options, label):
    batch, channels = len(equations), equations[0].channels
    height, width = equations[0].gradients.input_size
    dtype = options.tolerances.dtype
    if method == "gradients":
        x, spectrum, residual = _joint_gradients(equations, weight_grad, dtype, options.memory_limit, label)
        x = x.T.reshape(channels, batch, height, width).transpose(0, 1)
        # One matrix serves every channel: its rank counts once per channel.
        ok = _trusted(spectrum, residual, batch * height * width, options.tolerances)
        return _Solved(x, [spectrum] * batch, spectrum.rank * channels, spectrum.cond, residual, [ok] * batch,
                       method)
    if method == "hybrid":
        x, spectrum, residual = _joint_deflated(equations, weight_grad, dtype, options.memory_limit, label)
    else:
        completed = _joint_completion(equations, weight_grad, dtype, options.memory_limit, label)
        x, spectrum, residual = completed or _joint_hybrid(equations, weight_grad, dtype, options.memory_limit, label)
    ok = _trusted(spectrum, residual, batch * channels * height * width, options.tolerances)
    return _Solved(x.view(batch, channels, height, width), [spectrum] * batch, spectrum.rank, spectrum.cond,
                   residual, [ok] * batch, method)


def _solve_per_image(equations, options, label, why):
    """Each image from its own weight constraints, or (why given) only a minimum-norm estimate of each."""
    channels = equations[0].channels
    height, width = equations[0].gradients.input_size
    if why:
        solved = [estimate_layer(e, "weights", label, why) for e in equations]
        rank_bound = sum(counted_equations(e, "weights") for e in equations) + \
            channels * min(equations[0].gradients.shape[0], len(equations) * height * width)
        rank = min(rank_bound, sum(e.unknowns for e in equations))
        determined = [False] * len(equations)
        notes = (f"{label}: not determined ({why}); each image's input is a minimum-norm estimate from its own "
                 f"weight constraints",)
    else:
        solved = [solve_layer(e, "weights", options.tolerances.dtype, memory_limit=options.memory_limit,
                              label=label) for e in equations]
        rank = sum(s.spectrum.rank for s in solved)
        determined = [_trusted(s.spectrum, s.residual, e.unknowns, options.tolerances)
                      for s, e in zip(solved, equations)]
        notes = tuple(note for s in solved for note in s.notes)
    return _Solved(torch.stack([s.x.reshape(channels, height, width) for s in solved]),
                   [s.spectrum for s in solved], rank, max(s.spectrum.cond for s in solved),
                   max(s.residual for s in solved), determined, "estimate" if why else "weights", notes)


def _solve_batch_layer(methods, why, equations, weight_grad, options, label):
    """The layer's inputs by the first method that determines every image, else by the one that determined most."""
    if methods == ["estimate"]:
        return _solve_per_image(equations, options, label, why)
    best = None
    for method in methods:
        if method == "gradients+weights" and best is not None and best.rank == sum(e.unknowns for e in equations):
            break  # more rows cannot settle an inconsistency that a full-rank solve met (and the dense one is slow)
        if method == "weights":
            solved = _solve_per_image(equations, options, label, "")
        else:
            solved = _solve_joint(method, equations, weight_grad, options, label)
        if best is None or sum(solved.determined) > sum(best.determined):
            best = solved
        if all(best.determined):
            break
    return best


def batch_conv_step(step, signals, grads, input_shape, options, cache, previous_activation, frozen=None,
                    covered=None):
    """Recover one conv layer's inputs for every image of the batch; report the layer; pass the gradients below.

    frozen: the ActivationRead per image of an earlier run to read the activation by (the error bound's probe).
    covered: steps.covered_input's shape, to solve for that part of every input alone (None: all of it).
    """
    start = time.perf_counter()
    channels, height, width = input_shape
    batch, label = len(signals), step.label
    if frozen is None:
        bias = grads.maybe(step.conv.bias)
        bias = bias.to(device=options.device, dtype=torch.float64) if bias is not None else None
        reads = batch_branches(step, signals, bias, options.tolerances, options.relu_test)
        frozen = [None] * batch
    else:
        reads = [None] * batch
    built = [layer_equations(step, s, grads, input_shape, options, cache, repair=False, frozen=f, read=r)
             for s, f, r in zip(signals, frozen, reads)]
    shape = covered or input_shape
    equations = [cropped(step, b[0], shape, cache) if covered else b[0] for b in built]
    output_grads = torch.stack([b[1] for b in built])
    bias_grad = built[0][2]  # the batch's: the same for every image
    weight_grad = equations[0].gradients.rhs  # the batch's dL/dW, (F*k*k, C)
    unknowns = batch * math.prod(shape)
    methods, why = _methods(equations, unknowns)
    solved = _solve_batch_layer(methods, why, equations, weight_grad, options, label)
    # The batch's gradient constraints check what per-image solves never used.
    shared = _gradient_misfit(equations, solved.x, weight_grad)
    x = torch.stack([padded(xn, input_shape) for xn in solved.x])
    noises = [noise_of(spectrum.cond, xn, options.tolerances.dtype) for spectrum, xn in zip(solved.spectra, x)]
    projected = [project_input(xn, previous_activation, options) for xn in x]
    x = torch.stack([p[0] for p in projected])
    weight_rows = sum(int(e.known.sum()) for e in equations)
    gradient_rows = channels * weight_grad.shape[0]
    report = LayerReport(
        layer=step.number, method=f"{solved.method} (batch of {batch})",
        equations={"gradients": gradient_rows, "weights": weight_rows}.get(solved.method,
                                                                           gradient_rows + weight_rows),
        unknowns=unknowns, rank=solved.rank, cond=solved.cond, residual=max(solved.residual, shared),
        bias_residual=bias_misfit(output_grads, bias_grad),
        known_outputs=float(torch.stack([e.known.double().mean() for e in equations]).mean()),
        seconds=time.perf_counter() - start, estimated=solved.method == "estimate",
        clipped=max(p[1] for p in projected))
    weight = step.conv.weight.detach().to(device=options.device, dtype=torch.float64)
    input_grads = torch.nn.grad.conv2d_input((batch, channels, height, width), weight, output_grads,
                                             stride=step.conv.stride, padding=step.padding)
    reached = covered_mask(shape, input_shape).to(x.device) if covered else None
    below = [Signal(xn, gn, noise, s.determined and ok, covered=reached)
             for xn, gn, noise, s, ok in zip(x, input_grads, noises, signals, solved.determined)]
    notes = solved.notes + ((unread_note(step, shape, input_shape),) if covered else ())
    return BatchLayer(x, report, below, solved.determined, notes, [b[3] for b in built])


def _gradient_misfit(equations, x, weight_grad):
    """|sum_n A_n x_n - dL/dW| / |dL/dW|: do the batch's inputs reproduce its shared weight gradient?"""
    total = _batch_gradients(equations, x.reshape(len(x), -1).T)
    return float(torch.linalg.norm(total - weight_grad) / torch.linalg.norm(weight_grad).clamp_min(TINY))


