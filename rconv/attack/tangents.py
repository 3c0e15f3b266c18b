"""The attack's chain, linearised: how noise on the gradients moves every layer's recovered input.

Once the activations are read, R-CONV is a chain of linear solves: the Linear layer's input
from its gradients, then each conv layer's input from equations whose data come from the layer
above. Noise on the gradients therefore reaches each layer's input through that chain's
Jacobian. propagate() applies the Jacobian to many noise directions at once, reusing every
factorisation the attack made (LayerSolve.resolve), and reports for each direction how far it
moves every layer's input and how much residual it leaves in every layer's equations: the
error bound compares those residuals with the ones the gradients really left (rconv.bounds).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..linalg.solvers import TINY

# Fixed seed: the same gradients always get the same bound.
_OUTPUT_NOISE_SEED = 20240606


class Linearisation(NamedTuple):
    """What a solved conv layer keeps for the tangents: its equations, the data they were built from, and
    the factorisations that solved them."""

    equations: object  # equations.LayerEquations
    activated: torch.Tensor  # (F, P, Q): the layer's activation output, recovered from the layer above
    activated_grad: torch.Tensor  # (F, P, Q): its gradient
    derivative: torch.Tensor  # (F, P, Q): the activation's derivative as read
    x: torch.Tensor  # (C, H, W): the layer's recovered input, as solved (before any clipping)
    resolve: object  # systems.LayerSolve.resolve
    cheap: bool  # resolve costs little (gradient constraints alone): the layer's own noise is measured apart
    # a solve that read the layer's outputs: the scale of each known output's rounding (refined.output_scale)
    output_scale: torch.Tensor = None


class LayerTangents(NamedTuple):
    """The chain's response, at one layer, to r noise directions on all the gradients above and at it."""

    moves: torch.Tensor  # (C*H*W, r): how each direction moves the layer's input
    level: float  # the relative noise level given to the layer's own weight gradient
    rescaled: float  # the factor its residual rescaled all the noise so far by


def propagate(network, grads, features, linearisations, directions, levels):
    """The chain's response to r noise directions on the gradients, each source at its own level.

    The levels are fixed from the top down: the Linear layer's from its rank-one misfit, then each
    conv layer's from the residual its equations show, given the noise already fixed above it.
    grads: the attacked Gradients; features: the Linear layer's recovered input; linearisations: a
    Linearisation per conv layer, first to last; directions(parameter) -> (*its shape, r) unit
    relative noise directions on that parameter's gradient; levels: a bounds.SourceLevels, which
    fixes each source's level from the residual energies its directions leave (own), assumes one
    (assumed), or scales all the noise up to explain a residual (explain). Returns a LayerTangents
    per conv layer, first to last.
    """
    linear = network.linear
    features_moved = features_tangents(network, grads, features, directions, levels)
    level = features_moved.level
    bias_noise = directions(linear.bias)
    shape = linearisations[-1].activated.shape
    columns = features_moved.moves.shape[1]
    activated = features_moved.moves.reshape(*shape, columns)
    # (noise^T W)^T: MKL multiplies a transposed W by two columns several times slower
    activated_grad = level * (bias_noise.T @ linear.weight.detach().to(bias_noise)).T.reshape(*shape, columns)
    layers = []
    for step, linearisation in zip(reversed(network.steps), reversed(linearisations)):
        layer, activated, activated_grad = _conv_tangents(step, linearisation, directions(step.conv.weight),
                                                          activated, activated_grad, levels)
        layers.insert(0, layer)
    return layers


def features_tangents(network, grads, features, directions, levels):
    """The LayerTangents of the Linear layer's input (features, recovered): how the directions on the Linear
    layer's gradients, at the level its rank-one misfit shows, move it. Without conv layers it is the image."""
    linear = network.linear
    weight_grad = grads.of(linear.weight).to(torch.float64)
    bias_grad = grads.of(linear.bias).to(torch.float64)
    moved, misfits, measured = _linear_tangents(weight_grad, bias_grad, features, directions(linear.weight),
                                                directions(linear.bias))
    level = levels.own(misfits, measured)
    return LayerTangents(level * moved, level, 1.0)


def _linear_tangents(weight_grad, bias_grad, features, weight_noise, bias_noise):
    """How the directions move the features x = dL/db^T dL/dW / |dL/db|^2, and the misfit energy they leave
    in dL/dW - dL/db x^T (relative to |dL/dW|^2), with the misfit energy the gradients leave."""
    energy = float(bias_grad @ bias_grad)
    # Each product passes over the weight noise once (400 MB per direction on a 224-px net), direction by
    # direction: NoiseDirections keeps each one contiguous.
    rows = weight_noise.permute(2, 0, 1)
    bias_side = (bias_grad @ rows).T  # dL/db^T (dL/dW noise), (n, r)
    noise_side = torch.bmm(bias_noise.T[:, None, :], rows)[:, 0, :].T  # (dL/db noise)^T (dL/dW noise)
    along = bias_grad @ bias_noise
    moved = ((bias_noise.T @ weight_grad).T + bias_side
             - 2.0 * along[None, :] * features[:, None]) / energy
    scale = float(torch.linalg.norm(weight_grad)) ** 2 + TINY
    # |dL/dW noise - dL/db noise x^T - dL/db x'^T|^2 expanded into the products above, never formed: a random
    # direction leaves most of itself off the rank-one matrices, so the expansion cancels nothing
    misfit = (torch.linalg.vector_norm(rows, dim=(1, 2)) ** 2
              + (bias_noise ** 2).sum(0) * float(features @ features) + energy * (moved ** 2).sum(0)
              - 2.0 * (features @ noise_side) - 2.0 * (moved * bias_side).sum(0)
              + 2.0 * along * (features @ moved))
    measured = weight_grad - torch.outer(bias_grad, features)
    return moved, misfit / scale, float((measured ** 2).sum()) / scale


def _derivative_tangent(step, activated, moved):
    """How the activation's derivative, written through its output a, moves when a moves (ReLU's branches
    are read, so theirs does not)."""
    if step.activation == "sigmoid":  # d = a (1 - a)
        return (1.0 - 2.0 * activated)[..., None] * moved
    if step.activation == "tanh":  # d = 1 - a^2
        return -2.0 * activated[..., None] * moved
    return None


def _conv_tangents(step, linearisation, weight_noise, activated, activated_grad, levels):
    """One conv layer's LayerTangents, and the tangents of the activation output and its gradient it hands
    the layer below. activated, activated_grad: (F, P, Q, r), the noise fixed above, at its levels."""
    equations, conv = linearisation.equations, step.conv
    gradients, known = equations.gradients, equations.known
    derivative, x = linearisation.derivative, linearisation.x.to(torch.float64)
    columns = activated.shape[-1]
    channels, pixels = equations.channels, equations.pixels
    filters, _, kh, kw = conv.weight.shape
    output_grad = activated_grad * derivative[..., None]
    moved_derivative = _derivative_tangent(step, linearisation.activated, activated)
    if moved_derivative is not None:
        output_grad = output_grad + linearisation.activated_grad[..., None] * moved_derivative
    # The pre-activation at a known output moves by da / (its derivative) for every activation.
    moved_output = activated.reshape(-1, columns)[known] / derivative.reshape(-1)[known][:, None]
    above_rhs = -_weight_gradient(x, output_grad, conv.kernel_size, conv.stride, step.padding)
    own_rhs = weight_noise.permute(0, 2, 3, 1, 4).reshape(filters * kh * kw, channels, -1)
    if linearisation.cheap:
        # The noise above and the layer's own directions apart, so that its own level can be measured.
        gradient_rhs = torch.cat([above_rhs, own_rhs], dim=2)
        weight_rhs = torch.cat([moved_output + _output_rounding(linearisation, columns, levels.output_rounding),
                                moved_output.new_zeros(moved_output.shape[0], own_rhs.shape[2])], 1)
        moves = linearisation.resolve(gradient_rhs, weight_rhs)  # (C, H*W, 2r)
        energies = _residual_energy(equations, moves, x, gradient_rhs, gradients.rhs)
        level = levels.own(energies[columns:-1], float(energies[-1]), energies[:columns])
        combined = moves[:, :, :columns] + level * moves[:, :, columns:]
        # independent noises: their residual energies add
        combined_energies = energies[:columns] + level * level * energies[columns:-1]
    else:
        # An expensive solve: the layer's own noise at the largest level found above, in the same directions.
        level = levels.assumed()
        gradient_rhs = above_rhs + level * own_rhs
        combined = linearisation.resolve(gradient_rhs, moved_output + _output_rounding(linearisation, columns,
                                                                                      levels.output_rounding))
        energies = _residual_energy(equations, combined, x, gradient_rhs, gradients.rhs)
        combined_energies = energies[:columns]
    # The residual the data show rescales all the noise so far: up where it is more than the noise explains,
    # down where less (the layers above overestimated it, e.g. by taking their solves' rounding for noise).
    factor = levels.explain(combined_energies, float(energies[-1]))
    combined = factor * combined
    weight = conv.weight.detach().to(torch.float64)
    height, width = x.shape[1:]
    below_grad = factor * torch.nn.grad.conv2d_input((columns, channels, height, width), weight,
                                                     output_grad.permute(3, 0, 1, 2), stride=conv.stride,
                                                     padding=step.padding).permute(1, 2, 3, 0)
    layer = LayerTangents(combined.reshape(channels * pixels, columns), level, factor)
    return layer, combined.reshape(channels, height, width, columns), below_grad


def _output_rounding(linearisation, columns, rounding):
    """Random directions of the rounding the client's forward pass left in the layer's known outputs, `rounding`
    times each one's refined.output_scale, added to the noise fixed above (`columns` directions): none where the
    layer's solve did not read its outputs."""
    scale = linearisation.output_scale
    if scale is None:
        return 0.0
    generator = torch.Generator().manual_seed(_OUTPUT_NOISE_SEED)
    draws = torch.randn(scale.shape[0], columns, generator=generator, dtype=torch.float64).to(scale)
    draws = draws * (scale.shape[0] ** 0.5 / draws.norm(dim=0).clamp_min(TINY))  # unit variance per entry
    return rounding * scale[:, None] * draws


def _weight_gradient(x, output_grad, kernel_size, stride, padding):
    """sum_pq dO[f, p, q, r] x[c, s p + i, s q + j] for every column r, laid out as the gradient constraints'
    rows (F*k*k, C, r): what the constraints' matrix, built from the output-gradient tangent, does to x."""
    patches = F.unfold(x[None], kernel_size, padding=padding, stride=stride)[0]  # (C*kh*kw, P*Q)
    channels = x.shape[0]
    kh, kw = kernel_size
    filters, columns = output_grad.shape[0], output_grad.shape[-1]
    product = torch.einsum("fpr,kp->fkr", output_grad.reshape(filters, -1, columns), patches)
    return product.reshape(filters, channels, kh, kw, columns).permute(0, 2, 3, 1, 4).reshape(-1, channels, columns)


def _residual_energy(equations, moves, x, rhs, data):
    """|A v[c] - gradient rhs|^2 / |dL/dW|^2 for every column v of moves (C, H*W, r), then for x itself.

    The gradient constraints see the noise whichever constraints the layer was solved with (the
    weight constraints of a first layer are often square, and leave no residual at all).
    rhs: the moves' gradient right-hand sides (F*k*k, C, r); data: x's (F*k*k, C).
    """
    gradients = equations.gradients
    channels, pixels = equations.channels, equations.pixels
    v = torch.cat([moves, x.reshape(channels, pixels, 1)], dim=2)
    columns = v.shape[2]
    flat = v.permute(1, 0, 2).reshape(pixels, channels * columns)
    misfit = gradients.apply(flat).reshape(-1, channels, columns) - torch.cat([rhs, data[:, :, None]], dim=2)
    return (misfit ** 2).sum((0, 1)) / (float((gradients.rhs ** 2).sum()) + TINY)
