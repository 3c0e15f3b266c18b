"""The attack: R-CONV from the Linear layer down to the image (rconv.steps holds the steps).

reconstruct() checks its arguments, reads the Linear layer's input off its gradients, recovers
each conv layer's input from the last layer to the first, and decides whether the image can be
trusted, and if not, why. reconstruct_batch() runs it for many clients on one model.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch

from ..common.checks import as_whole, whole_number
from ..common.errors import RConvError
from ..common.progress import progress_bar
from ..linalg.memory import default_limit, ran_out
from ..split.linear import gradient_rank
from .activations import RELU_TESTS
from .batch_steps import batch_conv_step, batch_linear_step, update_noise
from .bounds import (
    UNMEASURED,
    Measured,
    SourceLevels,
    bound_reasons,
    features_bound,
    keep_rank,
    linearised_bound,
    noise_directions,
    noise_level,
    perturbed,
    probe_bound,
    probe_level,
    unbounded,
)
from .estimate import SEEDING_MISFIT, can_estimate, estimate_image, step_inputs
from .network import check_gradients, check_input_shape, parse_network
from .pooling import pattern_of
from .steps import (
    FIRST_LAYER_METHODS,
    LayerReport,
    Options,
    Reconstruction,
    conv_step,
    covered_input,
    fc_features,
    linear_step,
    rank_one,
    verdict,
)
from .tangents import features_tangents, propagate
from .tolerances import Tolerances

# Guards the division by a gradient's norm, which is zero only for a layer that learnt nothing.
_TINY_NORM = 1e-300

__all__ = ["FIRST_LAYER_METHODS", "LayerReport", "Reconstruction", "reconstruct", "reconstruct_batch"]


def _check_methods(first_layer, relu_test, methods):
    if first_layer not in FIRST_LAYER_METHODS:
        raise RConvError(f"first_layer must be one of {', '.join(FIRST_LAYER_METHODS)}; got {first_layer!r}")
    if relu_test not in RELU_TESTS:
        raise RConvError(f"relu_test must be one of {', '.join(RELU_TESTS)}; got {relu_test!r}")
    if not isinstance(methods, dict):
        raise RConvError(f"methods must be a dict conv layer number -> method, e.g. {{2: 'weights'}}; got {methods!r}")
    for layer, method in methods.items():
        if method not in FIRST_LAYER_METHODS:
            raise RConvError(f"methods[{layer!r}] must be one of {', '.join(FIRST_LAYER_METHODS)}; got {method!r}")


def _check_arguments(grads, input_shape, relu_tol, image_range, device):
    """Refuse reconstruct()'s arguments of the wrong kind, each by name, before any work."""
    def number(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)

    def sequence(value):
        return not isinstance(value, (str, bytes, torch.Tensor)) and isinstance(value, Iterable)

    if grads is None or not sequence(grads):
        raise RConvError(f"grads must be a list of gradient tensors in model.parameters() order, or a dict by "
                         f"parameter name; got {type(grads).__name__}")
    if not sequence(input_shape) or not all(as_whole(s) is not None for s in input_shape):
        raise RConvError(f"input_shape must be (C, H, W) of whole numbers; got {input_shape!r}")
    if relu_tol is not None and not (number(relu_tol) and math.isfinite(relu_tol) and relu_tol >= 0):
        raise RConvError(f"relu_tol must be a finite number >= 0, or None for the dtype's default; got {relu_tol!r}")
    bounds = tuple(image_range) if sequence(image_range) else ()
    if len(bounds) != 2 or not all(number(v) for v in bounds) or not bounds[0] < bounds[1]:
        raise RConvError(f"image_range must be two numbers (low, high) with low < high; got {image_range!r}")
    if device is None:
        return
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise RConvError(f"unknown device {device!r}; use 'cpu', 'cuda' or None (the gradients' device)") from error
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RConvError(f"device={device!r} asks for a GPU, but torch finds none on this machine; use "
                         f"device='cpu' or None (the gradients' device)")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # a GPU index that does not exist, a backend not built
        raise RConvError(f"device={device!r} cannot be used here: {str(error).splitlines()[0]}") from error


def _options(network, grads, settings):
    """The Options of a call, checked against the network and its gradients."""
    if not grads.dtype.is_floating_point:
        raise RConvError(f"gradients must be floating point; got {grads.dtype}")
    layers = len(network.steps)
    wrong = [layer for layer in settings["methods"] if not (isinstance(layer, int) and 1 <= layer <= layers)]
    if wrong:
        raise RConvError(f"methods names conv layers {wrong}; this network's conv layers are 1..{layers}")
    device = torch.device(settings["device"]) if settings["device"] is not None else grads.device
    memory_limit = settings["memory_limit"] if settings["memory_limit"] is not None else default_limit()
    return Options(settings["first_layer"], dict(settings["methods"]), settings["relu_test"], settings["project"],
                    settings["image_range"], Tolerances.for_dtype(grads.dtype, settings["relu_tol"]), device,
                    memory_limit)


def reconstruct(model, grads, input_shape, *, first_layer="hybrid", methods=None, relu_tol=None,
                relu_test="relative", project=False, image_range=(0.0, 1.0), device=None, check_batch=True,
                cache=None, memory_limit=None, batch_size=None):
    """Recover the training image behind one client's gradients with R-CONV.

    Args:
        model: the network the client trained: any nn.Module whose forward torch.fx traces into a chain
            of Conv2d (eval-mode BatchNorm2d folded in; train-mode for one image only, rconv.attack.train_norm),
            activations, reshapes and eval-mode Dropout up to a first Linear layer; whatever follows that
            layer is never inverted.
        grads: gradients in model.parameters() order (list) or by parameter name (dict).
        input_shape: (C, H, W) of the image.
        first_layer: how to recover the first conv layer's input: "weights" (the paper: O = conv(x) + b),
            "gradients" (gradient constraints only) or "hybrid" (both, each scaled to unit norm).
        methods: a dict conv layer number (1 = first) -> "weights", "gradients" or "hybrid", forcing a
            method on that layer. Layers not named choose for themselves: gradient constraints, then
            (large layers) weight constraints where the counting allows, then both, until the
            layer's input is determined (full numerical rank).
        relu_tol: the ReLU test's floor: outputs at or below relu_tol * (the layer's largest output), or
            three times the layer's noise floor if that is larger, count as inactive; None picks
            default_relu_tol for the gradients' dtype. Ignored by relu_test="absolute".
        relu_test: "relative" (relu_tol, the layer's noise floor, and the bias gradient to settle
            near-zero units) or "absolute" (the published code: outputs rounded to 7 decimals).
        project: clip every recovered layer input to the values it can take (the image to
            image_range, ReLU outputs to >= 0, Sigmoid to [0, 1], Tanh to [-1, 1]). The truth
            lies in that box, so clipping never moves an estimate away from it: a regularisation
            for noisy or defended gradients. Off by default, so exactness is judged unaided; a
            layer input that clipping moves beyond the residual tolerance is not exact.
        image_range: (low, high) with low < high, the values of the image's pixels, for project.
        device: where to solve ("cpu", "cuda"); None means the gradients' device.
        check_batch: refuse gradients whose Linear layer is not rank one (a batch of several images)
            as one image's (batch_size=1), or attack them as a batch (batch_size=None); False
            attacks any gradients as one image's (defended gradients are never quite rank one).
        cache: a dict shared between calls on the same model, holding what depends only on the weights.
        memory_limit: bytes the solves may take (None: three quarters of the memory available); a
            solve that would need more raises RConvError naming the layer before allocating it.
        batch_size: the number of images B behind the (mean) gradients; None infers it from the rank of
            the Linear layer's weight gradient (the notes say so). A batch is split at its Linear layer
            (split_linear), then every conv layer is solved for all its images (rconv.batch).
    Returns a Reconstruction; for a batch its image is (B, C, H, W) in no particular order, with
    labels and image_exact per image.
    """
    start = time.perf_counter()
    _check_arguments(grads, input_shape, relu_tol, image_range, device)
    methods = {} if methods is None else methods
    _check_methods(first_layer, relu_test, methods)
    _check_batch_size(batch_size)
    network = parse_network(model, cache)
    # what a weight update's reading said (cases.updates), and what the model's layers change
    update_notes = list(getattr(grads, "notes", [])) + network.notes
    grads = check_gradients(model, network, grads)
    sizes = check_input_shape(network, input_shape)
    options = _options(network, grads, dict(first_layer=first_layer, methods=methods, relu_test=relu_test,
                                            relu_tol=relu_tol, project=project, image_range=image_range,
                                            device=device, memory_limit=memory_limit))
    if (batch_size or 1) > 1 or (batch_size is None and check_batch and not _one_image(network, grads, options)):
        _check_batch_network(network)
        result = _reconstruct_batch_members(model, network, grads, sizes, options, cache, batch_size, start)
        result.notes[:0] = update_notes
        return result
    chain = _single_image(network, grads, sizes, options, cache, check_batch)
    estimated = None
    if verdict([result.report for result in chain.results], options.tolerances):
        chain, estimated = _estimate_below(network, grads, sizes, options, cache, chain)
    reports = [result.report for result in chain.results]
    reasons = verdict(reports, options.tolerances) + _local_steps_reasons(grads)
    # Only an image that passes every other check is worth bounding.
    bound_start = time.perf_counter()
    if reasons:
        bound = unbounded(len(reports))
    elif any(step.norm is not None or step.pool is not None for step in network.steps):
        bound = _probe_single(network, grads, sizes, options, cache, chain)
    else:
        bound = _error_bound(network, grads, options, cache, chain)
    bound_seconds = time.perf_counter() - bound_start
    for report, layer_bound in zip(reports, bound.layers):
        report.error_bound = layer_bound
    reasons += bound_reasons(bound, options.tolerances)
    notes = update_notes + chain.top.notes + [note for result in reversed(chain.results) for note in result.notes]
    image = chain.image
    if estimated is not None and reasons:
        image = estimated.image
        notes.append(f"below the last determined layer the image is an estimate: the image in image_range whose "
                     f"forward pass and gradients fit that layer's exact data (misfit {estimated.misfit:.2g} after "
                     f"{estimated.iterations} L-BFGS steps, {estimated.seconds:.1f} s)")
    label = _label(network, grads)
    return Reconstruction(image=image.detach().cpu()[None], layers=reports, exact=not reasons,
                          reasons=reasons, seconds=time.perf_counter() - start,
                          features=chain.top.features.cpu(), linear_misfit=chain.top.misfit, notes=notes,
                          inputs=[result.input.cpu() for result in chain.results],
                          labels=torch.tensor([label]), image_exact=torch.tensor([not reasons]),
                          error_bound=bound.image, noise=bound.noise, bound_seconds=bound_seconds)


class _Chain(NamedTuple):
    """One image's attack: the Linear step, each conv layer's result (first to last), and the image."""

    top: object  # steps._LinearStep
    results: list  # steps._ConvResult per conv layer, first to last
    image: torch.Tensor  # (C, H, W)


def _single_image(network, grads, sizes, options, cache, check_batch, like=None, patterns=None):
    """The Linear layer's input, then every conv layer's from the last to the first.

    like: a _Chain whose activations are read the same way (the probe: its change must come from the
    noise, not from a near-zero unit read differently).
    patterns: conv layer number -> the pattern its pool's search starts from (rconv.attack.pooling).
    """
    top = linear_step(network, grads, sizes[-1], options, check_batch)
    signal, results = top.signal, []
    for step in reversed(network.steps):
        below = network.steps[step.number - 2] if step.number > 1 else None
        frozen = like.results[step.number - 1].activation_read if like is not None else None
        results.insert(0, conv_step(step, signal, grads, sizes[step.number - 1], options, cache,
                                    below.activation if below else None, frozen, (patterns or {}).get(step.number),
                                    covered_input(step, below, sizes[step.number - 1])))
        signal = results[0].signal
    return _Chain(top, results, signal.activated)


def _estimate_below(network, grads, sizes, options, cache, chain):
    """Where a layer was not determined: the image estimated from the data of the deepest determined layer
    (rconv.attack.estimate), and the chain rerun with each pooled layer's search started from the pattern that
    estimate implies. Returns the rerun chain if it determines every layer, else the first; and the estimate
    (None where the layers below cannot be replayed)."""
    below = next((k for k in range(len(chain.results), 0, -1) if not chain.results[k - 1].report.full_rank), None)
    # Below unpooled layers the solves' own minimum-norm estimates stay as they were, so that the presets' results
    # and times do not change; a pooled layer's failed search leaves no estimate worth keeping.
    if below is None or not can_estimate(network.steps[:below]) or all(
            step.pool is None for step in network.steps[:below]):
        return chain, None
    signal = chain.results[below].signal if below < len(chain.results) else chain.top.signal
    estimated = estimate_image(network.steps[:below], grads, signal.activated, signal.activated_grad,
                               chain.image.clamp(*options.image_range), options.image_range)
    if estimated.misfit > SEEDING_MISFIT:
        return chain, estimated
    inputs = step_inputs(network.steps[:below], estimated.image)
    patterns = {step.number: pattern_of(step.conv, step.activation, step.pool, x, slope=step.slope)
                for step, x in zip(network.steps[:below], inputs) if step.pool is not None}
    rerun = _single_image(network, grads, sizes, options, cache, check_batch=False, patterns=patterns)
    if verdict([result.report for result in rerun.results], options.tolerances):
        return chain, estimated
    return rerun, None


def _error_bound(network, grads, options, cache, chain):
    """The ErrorBound of an image whose every layer was determined: the attack's chain, linearised, applied to
    noise directions scaled to what the gradients' residuals show (rconv.bounds, rconv.tangents)."""
    parameters = [network.linear.weight, network.linear.bias] + [step.conv.weight for step in network.steps]
    # sources, in the order the tangents meet them: the Linear layer, then the conv layers from the last
    sources = [[network.linear.weight, network.linear.bias]] + [[s.conv.weight] for s in reversed(network.steps)]
    levels = SourceLevels(options.tolerances.dtype, [max(_rounding_level(grads, p) for p in source)
                                                     for source in sources])
    try:
        directions = noise_directions(parameters, grads, cache=cache)
        if not network.steps:  # the Linear layer's input is the image
            moved = features_tangents(network, grads, chain.top.features, directions, levels)
            return features_bound(moved, chain.top.features, moved.level)
        layers = propagate(network, grads, chain.top.features, [r.linearisation for r in chain.results],
                           directions, levels)
    except (MemoryError, RuntimeError) as error:  # a factorisation applied to the noise directions ran out
        if not ran_out(error):
            raise
        raise RConvError(f"the error bound: an allocation failed while carrying noise through the layers' solves "
                         f"({error}); give the reconstruction more memory") from error
    return linearised_bound(layers, _measured(chain), max(levels.levels), options.tolerances.dtype)


def _probe_single(network, grads, sizes, options, cache, chain):
    """The ErrorBound of one image through a train-mode BatchNorm or pooled layer, whose solve has no
    Linearisation: the attack rerun on noisier gradients with the activations read as before, as a batch's bound
    is (probe_bound)."""
    residuals = [result.report.residual for result in chain.results]
    level = noise_level([chain.top.misfit] + [result.report.residual for result in chain.results
                                              if result.report.method == "gradients"], options.tolerances.dtype)
    probed = probe_level(level, residuals)
    noisy = perturbed(list(grads.parameters), grads, probed)
    try:
        probe = _single_image(network, noisy, sizes, options, cache, check_batch=False, like=chain)
    except RConvError:
        return unbounded(len(chain.results), level)
    return probe_bound(_measured(chain), _measured(probe), level, probed)


def _rounding_level(grads, parameter):
    """The relative noise a weight update's rounding left in a parameter's gradient (0 for gradients shared
    as such)."""
    rms = grads.rounding_of(parameter)
    if not rms:
        return 0.0
    grad = grads.of(parameter)
    return rms * math.sqrt(grad.numel()) / max(float(torch.linalg.norm(grad.to(torch.float64))), _TINY_NORM)


def _local_steps_reasons(grads):
    """Why gradients read off several local SGD steps cannot give an exact image."""
    if grads.local_steps <= 1:
        return []
    return [f"the gradients average {grads.local_steps} local SGD steps, each taken at other weights: no image "
            f"gives them exactly, so the recovered image is an approximation"]


def _measured(chain):
    """What the bound needs of every conv layer of a _Chain, first to last."""
    return [Measured(r.input, r.report.residual, r.report.cond) for r in chain.results]


def _label(network, grads):
    """One image's label: its dL/dlogits is negative at the label only. The logits' gradient is the last Linear
    layer's bias gradient; without one (a head ending otherwise), the first Linear layer's is the best guess."""
    logits = network.logits if network.logits is not None and network.logits.bias is not None else network.linear
    return int(grads.of(logits.bias).argmin())


def _check_batch_network(network):
    """Refuse a batch where the network admits one image only (Network.one_image_only says why)."""
    why = network.one_image_only()
    if why:
        raise RConvError(f"{why}; these gradients look like a batch's (or pass batch_size=1 and check_batch=False to "
                         f"try anyway)")


def _check_batch_size(batch_size):
    if batch_size is not None:
        whole_number(batch_size, "batch_size", hint=", or None to infer it")


def _one_image(network, grads, options):
    """Whether the Linear layer's weight gradient is rank one, as one image's is."""
    wide = dict(device=options.device, dtype=torch.float64)
    linear = network.linear
    bias_grad = grads.of(linear.bias).to(**wide)
    if float(bias_grad.abs().max()) == 0.0:
        return True  # the single-image path says why nothing can be recovered
    _, misfit = fc_features(grads.of(linear.weight).to(**wide), bias_grad)
    return rank_one(misfit, options.tolerances.dtype)


class _BatchChain(NamedTuple):
    """A batch's attack: the Linear split, each conv layer solved for every image (first to last), the images."""

    top: object  # batch.BatchLinear
    layers: list  # batch.BatchLayer per conv layer, first to last
    images: torch.Tensor  # (B, C, H, W)


def _batch_chain(network, grads, sizes, options, cache, batch_size, like=None):
    """The batch's Linear layer split into images, then every conv layer for all of them, last to first.

    like: an earlier _BatchChain: read every image's activations as it read its image with the nearest
    features (the probe); None comes back when the images do not pair up one to one.
    """
    zeros = ([(b.derivative == 0).flatten().cpu().numpy() for b in like.layers[-1].activation_reads]
             if like is not None and like.layers else None)
    top = batch_linear_step(network, grads, sizes[-1], options, batch_size, zeros)
    signals, layers = top.signals, []
    order = _match(like.top.features, top.features) if like is not None else None
    if like is not None and order is None:
        return None
    earlier_of = {m: n for n, m in enumerate(order or [])}  # this run's image m is the earlier run's image n
    for step in reversed(network.steps) if signals else ():
        below = network.steps[step.number - 2] if step.number > 1 else None
        frozen = None
        if like is not None:
            earlier = like.layers[step.number - 1].activation_reads
            frozen = [earlier[earlier_of[m]] for m in range(len(signals))]
        readings = top.readings if not layers and like is None else [signals]
        covered = covered_input(step, below, sizes[step.number - 1])
        solved = [batch_conv_step(step, reading, grads, sizes[step.number - 1], options, cache,
                                  below.activation if below else None, frozen, covered)
                  for reading in readings]
        # the reading of the features' zeros that the layer's data agree with
        layers.insert(0, min(solved, key=lambda layer: max(layer.report.residual, layer.report.bias_residual)))
        signals = layers[0].signals
    images = (torch.stack([s.activated for s in signals]) if signals else
              torch.zeros(0, *sizes[0], dtype=torch.float64, device=options.device))
    return _BatchChain(top, layers, images)


def _batch_verdict(chain, tolerances):
    """Which images every layer determined, and the reasons per layer (first to last) why some are not."""
    found = len(chain.top.signals)
    trusted, reasons = [chain.top.trusted] * found, []
    for layer in chain.layers:
        trusted = [a and b for a, b in zip(trusted, layer.determined)]
        undetermined = [n for n, ok in enumerate(layer.determined) if not ok]
        layer_reasons = verdict([layer.report], tolerances)
        if undetermined and not layer_reasons:
            layer_reasons = [f"conv layer {layer.report.layer} ({layer.report.method}): image(s) {undetermined} "
                             f"not determined at the gradients' precision (condition number up to "
                             f"{layer.report.cond:.2g})"]
        if layer_reasons and not layer.report.estimated and layer.report.full_rank:
            trusted = [False] * found  # a residual or the bias misfit: the batch's data disagree somewhere
        reasons.extend(layer_reasons)
    return trusted, reasons


def _batch_bounds(model, network, grads, sizes, options, cache, chain, trusted):
    """An ErrorBound per image of the batch (unbounded for images not trusted): the batch's attack rerun
    on noisier gradients, each image matched to its rerun by its features."""
    found = len(trusted)
    if not any(trusted):
        return [unbounded(len(network.steps))] * found
    residuals = [layer.report.residual for layer in chain.layers]
    level = noise_level([layer.report.residual for layer in chain.layers
                         if layer.report.method.split()[0] == "gradients"], options.tolerances.dtype)
    probed = probe_level(level, residuals)
    noisy = perturbed(list(grads.parameters), grads, probed)  # the stand-in layers' gradients too
    linear = network.linear
    if gradient_rank(noisy.of(linear.weight), noisy.of(linear.bias), linear.weight.detach().double(),
                     linear.bias.detach().double(), dtype=options.tolerances.dtype,
                     noise=update_noise(grads, linear)) != found:
        # noise that raises the rank reads as more images (and a long search for them): only the
        # part of it that keeps the rank, which is what moves the members' features to first order
        noisy = keep_rank(grads, noisy, linear, found)
    probe = _batch_probe(network, noisy, sizes, options, cache, chain)
    if probe is None:
        return [unbounded(len(network.steps), level)] * found
    order = _match(chain.top.features, probe.top.features)
    return [probe_bound(_batch_measured(chain, n), _batch_measured(probe, order[n]), level, probed)
            if ok else unbounded(len(network.steps)) for n, ok in enumerate(trusted)]


def _batch_probe(network, noisy, sizes, options, cache, chain):
    """The batch's attack rerun on `noisy` gradients, reading activations as `chain` did; None when
    it loses what the attack needs or its images do not pair with chain's."""
    try:
        probe = _batch_chain(network, noisy, sizes, options, cache, batch_size=len(chain.top.signals), like=chain)
    except RConvError:
        return None
    return probe if probe is not None and len(probe.layers) == len(chain.layers) else None


def _batch_measured(chain, n):
    """What the bound needs of every conv layer of a _BatchChain, first to last, for its image n; without conv
    layers, of the image itself (the Linear layer's input, no residual of its own)."""
    if not chain.layers:
        return [Measured(chain.images[n], 0.0, 1.0)]
    return [Measured(layer.inputs[n], layer.report.residual, layer.report.cond) for layer in chain.layers]


def _match(features, probed_features):
    """For every image, the rerun's image whose features are nearest; None unless that pairs them one to one."""
    if len(features) != len(probed_features):
        return None
    order = torch.cdist(features, probed_features).argmin(dim=1).tolist()
    return order if len(set(order)) == len(order) else None


def _reconstruct_batch_members(model, network, grads, sizes, options, cache, batch_size, start):
    """The attack on a mini-batch's mean gradients: its Linear layer split, then every conv layer for all images."""
    cache = {} if cache is None else cache  # the batch's images share the factorisations of the weights
    chain = _batch_chain(network, grads, sizes, options, cache, batch_size)
    found = len(chain.top.signals)
    notes = ([f"batch size inferred from the Linear layer's gradients: {found} image(s) found"]
             if batch_size is None else []) + chain.top.notes
    notes += [note for layer in reversed(chain.layers) for note in layer.notes]
    trusted, layer_reasons = _batch_verdict(chain, options.tolerances)
    reasons = chain.top.reasons + layer_reasons
    if not found:
        reasons = reasons or ["Linear layer: no image was found in the batch's gradients"]
    bound_start = time.perf_counter()
    bounds = _batch_bounds(model, network, grads, sizes, options, cache, chain, trusted)
    bound_seconds = time.perf_counter() - bound_start
    within = [ok and bound.image <= options.tolerances.image_error for ok, bound in zip(trusted, bounds)]
    beyond = [n for n, (ok, fits) in enumerate(zip(trusted, within)) if ok and not fits]
    unmeasured = [n for n in beyond if math.isinf(bounds[n].image)]
    if unmeasured:
        reasons.append(f"image(s) {unmeasured}: {UNMEASURED}")
    beyond = [n for n in beyond if n not in unmeasured]
    if beyond:
        worst = max(bounds[n].image for n in beyond)
        reasons.append(f"error bound: image(s) {beyond} may be off by up to {worst:.2g} (max abs), above the "
                       f"{options.tolerances.image_error:g} that exact allows for "
                       f"{str(options.tolerances.dtype).replace('torch.', '')} gradients")
    reports = [layer.report for layer in chain.layers]
    for number, report in enumerate(reports):
        report.error_bound = max((bound.layers[number] for bound in bounds), default=math.inf)
    return Reconstruction(image=chain.images.cpu(), layers=reports, exact=not reasons and all(within),
                          reasons=reasons, seconds=time.perf_counter() - start, features=chain.top.features.cpu(),
                          notes=notes, inputs=[layer.inputs.cpu() for layer in chain.layers],
                          labels=chain.top.labels.cpu(), image_exact=torch.tensor(within, dtype=torch.bool),
                          batch_size=found, error_bound=max((b.image for b in bounds), default=math.inf),
                          noise=max((b.noise for b in bounds if not math.isnan(b.noise)), default=math.nan),
                          bound_seconds=bound_seconds)


def reconstruct_clients(model, grads_list, input_shape, *, progress=False, **options):
    """reconstruct() for many clients' gradients on one model, sharing what depends only on the weights.

    Each entry of grads_list is one client's update (itself one image, or a mini-batch with
    `batch_size`). Returns one Reconstruction per entry; options are reconstruct()'s keywords.
    """
    cache = options.pop("cache", None)
    cache = {} if cache is None else cache
    return [reconstruct(model, grads, input_shape, cache=cache, **options)
            for grads in progress_bar(grads_list, desc="R-CONV", unit="image", enabled=progress)]


# The name this function had before mini-batches existed; kept so that existing scripts still run.
reconstruct_batch = reconstruct_clients
