"""Eval-mode BatchNorm folded into the conv layer before it: the folded layer's weights and gradients.

In eval mode BatchNorm is an affine map per channel, y = s (z - running_mean) + beta with
s = gamma / sqrt(running_var + eps), so conv then BatchNorm is one conv layer with W' = s W and
b' = s (b - running_mean) + beta. Its gradients follow from the chain rule: dL/dW = s dL/dW' per
output channel, and dL/db' = dL/dbeta (or dL/db / s when BatchNorm has no affine parameters), so
the attack can run on the folded layer unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from ..common.errors import RConvError


class Folded(NamedTuple):
    """A conv layer with the BatchNorm after it folded in, and what folding its gradients needs."""

    conv: nn.Conv2d  # the folded layer (float64), with a bias
    scale: torch.Tensor  # (F,) float64: s = gamma / sqrt(running_var + eps)
    source: nn.Conv2d  # the model's own conv layer
    norm: nn.BatchNorm2d  # the model's own BatchNorm


class FoldedGradients(NamedTuple):
    """The folded layer's gradients (bias None when the model's gradients cannot give it) and the RMS
    rounding error each carries."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_rounding: float
    bias_rounding: float


def fold_batchnorm(conv, norm, label):
    """The Folded conv layer of `conv` followed by the eval-mode BatchNorm2d `norm`; label names it in errors."""
    if norm.num_features != conv.out_channels:
        raise RConvError(f"{label}: its BatchNorm has {norm.num_features} channels, the conv layer "
                         f"{conv.out_channels} filters")
    wide = dict(dtype=torch.float64, device=conv.weight.device)
    gamma = norm.weight.detach().to(**wide) if norm.affine else torch.ones(conv.out_channels, **wide)
    beta = norm.bias.detach().to(**wide) if norm.affine else torch.zeros(conv.out_channels, **wide)
    scale = gamma / torch.sqrt(norm.running_var.detach().to(**wide) + norm.eps)
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        zero = [int(f) for f in torch.nonzero(~torch.isfinite(scale) | (scale == 0)).flatten()]
        raise RConvError(f"{label}: its BatchNorm scales filter(s) {zero} by zero (gamma = 0) or a non-finite "
                         f"factor, which erases that channel, so the folded layer cannot be inverted")
    bias = conv.bias.detach().to(**wide) if conv.bias is not None else torch.zeros(conv.out_channels, **wide)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                       padding=conv.padding, bias=True, **wide)
    with torch.no_grad():
        folded.weight.copy_(scale.view(-1, 1, 1, 1) * conv.weight.detach().to(**wide))
        folded.bias.copy_(scale * (bias - norm.running_mean.detach().to(**wide)) + beta)
    folded.requires_grad_(False)
    return Folded(folded, scale, conv, norm)


def fold_gradients(folded, weight_grad, beta_grad, bias_grad, roundings):
    """The FoldedGradients of a Folded layer from the model's gradients of its conv weight, of its BatchNorm's
    beta (None without affine parameters) and of its conv bias (None without one), computed in float64.

    roundings: the RMS rounding error in (weight, beta, bias) gradients (zeros for gradients shared as such).
    """
    scale = folded.scale.to(weight_grad.device)
    weight = weight_grad.to(torch.float64) / scale.view(-1, 1, 1, 1)
    # the rounding of dL/dW divided per filter: its RMS over all entries
    weight_rounding = roundings[0] * float(torch.sqrt((scale ** -2).mean()))
    if beta_grad is not None:
        return FoldedGradients(weight, beta_grad.to(torch.float64), weight_rounding, roundings[1])
    if bias_grad is not None:
        return FoldedGradients(weight, bias_grad.to(torch.float64) / scale, weight_rounding,
                               roundings[2] * float(torch.sqrt((scale ** -2).mean())))
    return FoldedGradients(weight, None, weight_rounding, 0.0)
