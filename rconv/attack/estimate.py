"""The image below the last determined layer, estimated from what is known.

Where a conv layer's input cannot be determined (a pooled layer whose pattern was not found, too few
equations), the layer above it still hands over an exact output T and its gradient dL/dT. The
image x then satisfies two sets of equations that an optimisation can fit: the forward pass of the
layers below, F(x) = T, and their gradients, which for the true x are the gradients of <F(x), dL/dT>
with respect to their weights. `estimate_image` minimises both misfits over x in the image's range
(L-BFGS, time-limited): an optimisation attack, but one that knows the deeper layer's data exactly.
Behind ReLU and max pools each descent stalls in a kink of its own; where none fits the data, the
estimate is the mean of the descents' images, which errs less than any one of them.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .pooling import activate

# Seconds the estimate may take: a 32-px attack's budget is a minute, the pattern searches take part of it.
ESTIMATE_TIME_LIMIT = 15.0
# L-BFGS iterations per call between checks of the time limit.
_ITERATIONS_PER_CALL = 20
# L-BFGS calls that lower the misfit by less than this share of it end the estimate.
_STALLED = 1e-9
# Random restarts after the first descent: a fixed number, so that the estimate does not depend on the machine's
# speed (within the time limit); each stalls within a second on a 32-px ReLU net.
_RESTARTS = 8
# A restart image is uniform noise on this coarse grid, upsampled: smooth like a photo. Measured on 3 CIFAR10 images
# (tutorial CNN, VGG-style net), 8 beat per-pixel noise and a 4x4 grid; the mean of the descents gained 1-4 dB over
# the one of least misfit, and put both nets above Inverting Gradients on the same gradients.
_RESTART_GRID = 8
# The estimate starts this far inside its box, where the box's parametrisation has slope.
_INSIDE = 1e-3
# The box the descents run in reaches this share of the image's range past each end, and the estimate is clipped
# back: a sigmoid box never reaches its edge, where photos have some pixels and MNIST most (LeNet-5 on 3 MNIST
# images: 17-37 dB with the box at the range, 38-43 dB with this margin, 34-41 dB with 0.5).
_BOX_MARGIN = 0.05
# An estimate whose misfit is below this restarts the pooled layers' searches from the patterns it implies (a start
# with ~3.5 % of its units wrong was measured to converge; which misfit gives such a start was not); above it the
# rerun would only repeat the searches' cost.
SEEDING_MISFIT = 1e-3


class ImageEstimate(NamedTuple):
    """The estimated image, and how well it explains the known data."""

    image: torch.Tensor  # (C, H, W) float64, within the image's range
    # the relative misfit of the forward pass and of the gradients it leaves (0 for the truth), before the image is
    # clipped from the descents' wider box into the image's range
    misfit: float
    iterations: int  # L-BFGS iterations taken, over every descent
    seconds: float


def _forward(steps, weights, x):
    """The layers `steps` (first to last) applied to an image batch x, with the weights given."""
    for step, (weight, bias) in zip(steps, weights):
        x = activate(step, F.conv2d(x, weight, bias, step.conv.stride, step.padding))
        if step.pool is not None:
            x = step.pool(x)
    return x


def step_inputs(steps, image):
    """The input of each of `steps` (first to last) when `image` (C, H, W) goes through them, float64."""
    weights = [(step.conv.weight.detach().to(image), step.conv.bias.detach().to(image)
                if step.conv.bias is not None else None) for step in steps]
    inputs, x = [], image[None]
    with torch.no_grad():
        for k, step in enumerate(steps):
            inputs.append(x[0])
            x = _forward([step], weights[k:k + 1], x)
    return inputs


def can_estimate(steps):
    """Whether the layers below can be replayed by the estimate (a train-mode BatchNorm cannot: its
    statistics would be the estimate's own)."""
    return all(step.norm is None for step in steps)


def estimate_image(steps, grads, target, target_grad, start, image_range, *, time_limit=ESTIMATE_TIME_LIMIT):
    """The image x in image_range whose forward pass through `steps` (the conv steps below the last determined
    layer, first to last) gives `target` and whose gradient of <F(x), target_grad> gives the steps' gradients.

    start: the attack's own estimate of the image (clipped into range); the mid-range image is taken instead
    when it explains the data better. The first descent's image where it fits (misfit at most SEEDING_MISFIT),
    else the first restart's that does, else the mean of every descent's image.
    """
    began = time.perf_counter()
    wide = dict(dtype=torch.float64, device=target.device)
    weights = [(step.conv.weight.detach().to(**wide).requires_grad_(True),
                step.conv.bias.detach().to(**wide).requires_grad_(True) if step.conv.bias is not None else None)
               for step in steps]
    wanted = [(grads.of(step.conv.weight).to(**wide), grads.maybe(step.conv.bias)) for step in steps]
    wanted = [(w, b.to(**wide) if b is not None else None) for w, b in wanted]
    target, target_grad = target.to(**wide)[None], target_grad.to(**wide)[None]
    # the descent's box reaches past the image's range, so that pixels on its edge stay reachable
    margin = _BOX_MARGIN * (image_range[1] - image_range[0])
    low, high = image_range[0] - margin, image_range[1] + margin

    def misfit(z):
        x = low + (high - low) * torch.sigmoid(z)
        out = _forward(steps, weights, x)
        total = (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-300)
        parameters = [p for pair in weights for p in pair if p is not None]
        found = iter(torch.autograd.grad(out, parameters, target_grad, create_graph=True))
        for (weight_grad, bias_grad), (_, bias) in zip(wanted, weights):
            total = total + (next(found) - weight_grad).pow(2).sum() / weight_grad.pow(2).sum().clamp_min(1e-300)
            if bias is not None:
                got = next(found)
                if bias_grad is not None:
                    total = total + (got - bias_grad).pow(2).sum() / bias_grad.pow(2).sum().clamp_min(1e-300)
        return total

    def as_logit(image):
        share = ((image.to(**wide) - low) / (high - low)).clamp(_INSIDE, 1 - _INSIDE)
        return torch.logit(share)[None].contiguous()

    first = as_logit(start)
    with torch.enable_grad():
        scores = [float(misfit(z).detach()) for z in (first, torch.zeros_like(first))]
        best = _descend(misfit, first if scores[0] <= scores[1] else torch.zeros_like(first), began, time_limit)
        taken, descents = best.iterations, [best]
        # L-BFGS stalls in a ReLU net's kinks: random restarts, until one fits.
        generator = torch.Generator(device=first.device).manual_seed(0)
        for _ in range(_RESTARTS):
            if best.misfit <= SEEDING_MISFIT or time.perf_counter() - began >= time_limit:
                break
            found = _descend(misfit, as_logit(_smooth_noise(first.shape[1:], low, high, generator)), began,
                             time_limit)
            descents.append(found)
            taken += found.iterations
            best = found if found.misfit < best.misfit else best
        if best.misfit <= SEEDING_MISFIT:
            image, fit = _image_of(best, low, high), best.misfit
        else:
            image = torch.stack([_image_of(descent, low, high) for descent in descents]).mean(0)
            fit = float(misfit(as_logit(image)).detach())
    return ImageEstimate(image.clamp(*image_range), fit, taken, time.perf_counter() - began)


def _image_of(descent, low, high):
    """The (C, H, W) image a descent ended at."""
    return (low + (high - low) * torch.sigmoid(descent.z))[0].detach()


def _smooth_noise(shape, low, high, generator):
    """A random image of `shape` (C, H, W) in [low, high], smooth: uniform noise on a coarse grid, upsampled."""
    coarse = torch.rand((1, shape[0], _RESTART_GRID, _RESTART_GRID), generator=generator,
                        device=generator.device, dtype=torch.float64)
    fine = F.interpolate(coarse, size=tuple(shape[1:]), mode="bilinear", align_corners=False)[0]
    return low + (high - low) * fine


class _Descent(NamedTuple):
    z: torch.Tensor  # the image's logits in its range
    misfit: float
    iterations: int


def _descend(misfit, start, began, time_limit):
    """L-BFGS on misfit from the logits `start` until it converges, stalls or the time runs out."""
    z = start.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([z], max_iter=_ITERATIONS_PER_CALL, history_size=_ITERATIONS_PER_CALL,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = misfit(z)
        loss.backward()
        return loss

    iterations, previous = 0, float("inf")
    while time.perf_counter() - began < time_limit:
        loss = float(optimiser.step(closure).detach())
        taken = optimiser.state[z].get("n_iter", 0)
        if taken == iterations or loss >= previous * (1 - _STALLED):
            break  # converged, or no longer moving
        iterations, previous = taken, loss
    return _Descent(z.detach(), float(misfit(z).detach()), iterations)
