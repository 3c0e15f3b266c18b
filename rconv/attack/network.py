"""Reading a model as R-CONV sees it: conv steps, the first Linear layer, and checked gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from ..cases.updates import Update
from ..common.errors import RConvError
from ..common.geometry import conv_output_size, pool_spec
from .bias_free import logit_gradient
from .folding import Folded, fold_batchnorm, fold_gradients
from .graph import trace_chain

# Operations that change no values in eval mode: after them a Linear layer's output is still the logits.
_NO_OPS = ("reshape", "dropout", "identity")


@dataclass
class ConvStep:
    """One conv layer with the activation after it (and the eval-mode BatchNorm before that, folded in)."""

    number: int  # 1 for the first conv layer, as LayerReport.layer
    name: str  # where it sits in the model, e.g. "model[0]"
    conv: nn.Conv2d  # the layer the attack inverts: the model's own, or the folded one
    activation: str = "identity"
    slope: float = 0.0  # LeakyReLU's negative slope
    padding: tuple = (0, 0)
    folded: Folded | None = None  # the BatchNorm folded into conv, and the model's own layers
    norm: TrainNorm | None = None  # a train-mode BatchNorm between conv and activation (rconv.attack.train_norm)
    pool: nn.Module | None = None  # the MaxPool2d / AvgPool2d / AdaptiveAvgPool2d after the activation

    @property
    def label(self):
        return f"conv layer {self.number} ({self.name})"

    @property
    def module(self):
        """The model's own conv layer (its input is this step's input)."""
        return self.folded.source if self.folded is not None else self.conv

    @property
    def blind_to_shifts(self):
        """A train-mode BatchNorm after an unpadded conv: a constant added to an input channel moves every output of
        a filter alike, and the BatchNorm's mean takes it away, so none of the layer's equations sees it."""
        return self.norm is not None and tuple(self.padding) == (0, 0)

    @property
    def output_module(self):
        """The model's own module whose output is this step's pre-activation output."""
        if self.norm is not None:
            return self.norm.module
        return self.folded.norm if self.folded is not None else self.conv


class TrainNorm(NamedTuple):
    """A train-mode BatchNorm2d after a conv layer: y = gamma (O - mu) / sigma + beta with the image's own mean
    mu and sigma = sqrt(biased variance + eps) per channel, float64."""

    module: nn.BatchNorm2d  # the model's own layer (its gamma and beta gradients check the recovered data)
    gamma: torch.Tensor  # (F,), ones without affine parameters
    beta: torch.Tensor  # (F,), zeros without affine parameters
    eps: float


@dataclass
class Network:
    """The conv steps, first to last, and the first Linear layer of a model R-CONV can invert."""

    steps: list
    linear: nn.Linear  # the Linear layer the attack reads; a bias-free one's stand-in carries a zero bias
    parameter_names: list
    linear_name: str = "the Linear layer"
    source_linear: nn.Linear | None = None  # the model's own first Linear layer (its input is the features)
    logits: nn.Linear | None = None  # the layer whose output is the logits, when a Linear layer is the last layer
    notes: list = field(default_factory=list)  # what the model's layers change about the attack, in words

    @property
    def bias_free(self):
        """Whether the model's Linear layer has no bias, so that its output gradient is read off dL/dW alone."""
        return self.source_linear is not None and self.source_linear is not self.linear

    def one_image_only(self):
        """Why R-CONV attacks this network one image at a time, in words ("" where it splits a batch)."""
        if self.logits is not self.linear:
            return (f"the Linear layer {self.linear_name} is followed by more layers: a batch's split reads each "
                    f"image's softmax gradient at the logits, so through a head R-CONV recovers one image, not a batch")
        if self.bias_free:
            return (f"the Linear layer {self.linear_name} has no bias: R-CONV reads its output gradient off a "
                    f"rank-one weight gradient, so it recovers one image, not a batch")
        for step in self.steps:
            if step.pool is not None:
                return (f"{step.label}: its activation is pooled, and R-CONV searches a pooled layer's pattern of "
                        f"units for one image only")
            if step.norm is not None:
                return (f"{step.label}: its train-mode BatchNorm normalises by the batch's statistics, which couple "
                        f"the images: R-CONV inverts it for one image only")
        return ""


def _conv_padding(conv, label):
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if all(k % 2 == 1 for k in conv.kernel_size):
            return tuple(k // 2 for k in conv.kernel_size)
        raise RConvError(f"{label}: padding='same' with an even kernel pads unevenly; use an explicit padding")
    return tuple(conv.padding)


def _conv_step(name, conv, number):
    label = f"conv layer {number} ({name})"
    if conv.groups != 1 or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        raise RConvError(f"{label}: only groups=1, dilation=1 and zero padding are supported; got "
                         f"groups={conv.groups}, dilation={conv.dilation}, padding_mode={conv.padding_mode!r}")
    return ConvStep(number, name, conv, padding=_conv_padding(conv, label))


def _attach_activation(steps, operation):
    where = operation.where
    if not steps or steps[-1].activation != "identity":
        raise RConvError(f"{where} must directly follow a Conv2d layer")
    if steps[-1].pool is not None and not isinstance(steps[-1].pool, nn.MaxPool2d):
        raise RConvError(f"{where} follows an average pool of {steps[-1].label}'s output; R-CONV inverts a pool "
                         f"after the activation (a max pool before it is the same, and is read so)")
    if operation.activation == "leaky_relu" and operation.slope <= 0:
        raise RConvError(f"{where}: negative_slope must be positive to be invertible; got {operation.slope}")
    steps[-1].activation = operation.activation
    steps[-1].slope = operation.slope if operation.activation == "leaky_relu" else 0.0


def _attach_pool(steps, operation):
    """Keep a pool on the conv step it follows (after its activation; a max pool before the activation commutes
    with it, as every supported activation increases)."""
    if not steps or steps[-1].pool is not None:
        raise RConvError(f"{operation.where} must follow a conv layer's activation (conv -> activation -> pool)")
    if not isinstance(operation.module, nn.AdaptiveAvgPool2d):  # an adaptive pool's window waits for the input
        try:
            pool_spec(operation.module)
        except RConvError as error:
            raise RConvError(f"{operation.where}: {error}") from error
    if steps[-1].norm is not None:
        raise RConvError(f"{operation.where}: a pool after a train-mode BatchNorm layer ({steps[-1].label}) is not "
                         f"inverted; R-CONV inverts that BatchNorm only when the Linear layer or a conv layer "
                         f"reads its activation directly")
    steps[-1].pool = operation.module


def _refuse_dropout(operation):
    """Refuse what would make the forward pass depend on more than the weights and the image (train-mode
    BatchNorm depends on the image's own statistics, which the attack recovers with it: rconv.attack.train_norm)."""
    if operation.kind == "dropout" and operation.training:
        raise RConvError(f"{operation.where}: Dropout in training mode drops random units, so the forward pass "
                         f"behind the gradients cannot be replayed; call model.eval() (or pass training=False)")


def _attach_norm(steps, operation):
    """Fold an eval-mode BatchNorm2d into the conv layer it directly follows; keep a train-mode one beside it."""
    if not isinstance(operation.module, nn.BatchNorm2d):
        raise RConvError(f"{operation.where}: BatchNorm before the Linear layer must be a BatchNorm2d directly "
                         f"after a Conv2d layer, to be folded into it")
    if not steps or steps[-1].activation != "identity" or steps[-1].folded is not None or steps[-1].norm is not None:
        raise RConvError(f"{operation.where} must directly follow a Conv2d layer (before its activation), to be "
                         f"folded into it or inverted with it")
    step = steps[-1]
    if operation.training:
        step.norm = _train_norm(step, operation.module)
        return
    step.folded = fold_batchnorm(step.conv, operation.module, step.label)
    step.conv = step.folded.conv


def _train_norm(step, norm):
    """The TrainNorm of a train-mode BatchNorm2d after step's conv layer, refusing a gamma of zero, which erases
    its channel."""
    if norm.num_features != step.conv.out_channels:
        raise RConvError(f"{step.label}: its BatchNorm has {norm.num_features} channels, the conv layer "
                         f"{step.conv.out_channels} filters")
    wide = dict(dtype=torch.float64, device=step.conv.weight.device)
    filters = step.conv.out_channels
    gamma = norm.weight.detach().to(**wide) if norm.affine else torch.ones(filters, **wide)
    beta = norm.bias.detach().to(**wide) if norm.affine else torch.zeros(filters, **wide)
    if not bool(torch.isfinite(gamma).all()) or bool((gamma == 0).any()):
        zero = [int(f) for f in torch.nonzero(~torch.isfinite(gamma) | (gamma == 0)).flatten()]
        raise RConvError(f"{step.label}: its train-mode BatchNorm has gamma = 0 (or non-finite) at filter(s) {zero}, "
                         f"which erases that channel, so the layer cannot be inverted")
    return TrainNorm(norm, gamma, beta, float(norm.eps))


def _bias_free_stand_in(linear, name, head):
    """A Linear layer sharing the bias-free `linear`'s weight, with a zero bias whose gradient check_gradients
    reads off the weight gradient (rconv.attack.bias_free); only a last Linear layer's output is the logits."""
    after = [operation for operation in head if operation.kind not in _NO_OPS]
    if after:
        raise RConvError(f"the Linear layer {name} has no bias and is followed by {after[0].where}; R-CONV reads a "
                         f"bias-free Linear layer only as the last layer, whose output is the logits")
    stand_in = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                         dtype=linear.weight.dtype)
    stand_in.weight = linear.weight
    stand_in.bias = nn.Parameter(torch.zeros_like(stand_in.bias), requires_grad=False)
    return stand_in


def parse_network(model, cache=None):
    """Check that R-CONV can invert `model` (any nn.Module torch.fx can trace into a chain of layers) and list
    its conv steps (eval-mode BatchNorm folded in) and the first Linear layer, whose input it recovers.
    cache: a dict kept per model, for its trace (rconv.attack.graph.trace_chain)."""
    steps, linear, head = [], None, []
    for operation in trace_chain(model, cache):
        _refuse_dropout(operation)
        if linear is not None:
            # the layers after the first Linear layer are never inverted (graph.py refused the unknown ones)
            head.append(operation)
        elif operation.kind == "conv":
            steps.append(_conv_step(operation.name, operation.module, len(steps) + 1))
        elif operation.kind == "batchnorm":
            _attach_norm(steps, operation)
        elif operation.kind == "activation":
            _attach_activation(steps, operation)
        elif operation.kind == "pool":
            _attach_pool(steps, operation)
        elif operation.kind == "linear":
            linear = operation
    if linear is None:
        raise RConvError("the model has no Linear layer; R-CONV starts from the Linear layer's gradients")
    names = [name for name, _ in model.named_parameters()]
    module = linear.module
    read = _bias_free_stand_in(module, linear.name, head) if module.bias is None else module
    return Network(steps, read, names, linear.name, module, _logits_layer(read, head),
                   _notes(steps, linear, head, module.bias is None))


def _notes(steps, linear, head, bias_free):
    """What the model's layers change about the attack, for the Reconstruction's notes."""
    notes = []
    for step in steps:
        if step.folded is not None:
            notes.append(f"{step.label}: its eval-mode BatchNorm is folded into it, and the layer's report is the "
                         f"folded layer's")
        if step.norm is not None:
            notes.append(f"{step.label}: its train-mode BatchNorm normalises by the image's own mean and variance, "
                         f"recovered with the layer's input; the conv bias cancels in it and is not recovered")
            if step.blind_to_shifts:
                notes.append(f"{step.label}: without padding, every output reads the same sum of a constant added "
                             f"to an input channel, which its BatchNorm's mean removes: {step.conv.in_channels} "
                             f"directions of its input (a constant per channel) are undetermined")
        elif step.module.bias is None and (step.folded is None or not step.folded.norm.affine):
            notes.append(f"{step.label} has no bias: its recovered output gradient is not checked against a bias "
                         f"gradient, nor are near-zero ReLU units settled by one")
    if bias_free:
        notes.append(f"the Linear layer {linear.name} has no bias: its output gradient was read off its rank-one "
                     f"weight gradient as softmax - onehot (one image's cross-entropy)")
    layers = [operation.name for operation in head if operation.kind not in _NO_OPS]
    if layers:
        notes.append(f"the layers after the Linear layer {linear.name} ({', '.join(layers)}) are not needed: its "
                     f"input and output gradient are read off its own gradients")
    return notes


def _logits_layer(read, head):
    """The last Linear layer when nothing but no-ops follows it (its bias gradient is dL/dlogits), else None."""
    while head and head[-1].kind in _NO_OPS:
        head = head[:-1]
    if not head:
        return read
    return head[-1].module if head[-1].kind == "linear" else None


class Gradients:
    """A client's gradients, checked against the model and looked up by parameter.

    rounding (per parameter) and local_steps: what an Update read off a weight update carries (the
    RMS error the weights' rounding left in each entry, and the SGD steps averaged); none for
    gradients a client shared as such.
    """

    def __init__(self, parameters, grads, rounding=None, local_steps=1):
        self.parameters = tuple(parameters)
        self._by_id = {id(p): g for p, g in zip(parameters, grads)}
        self._rounding = {id(p): r for p, r in zip(parameters, rounding or ())}
        self.dtype, self.device = grads[0].dtype, grads[0].device
        self.local_steps = local_steps

    def of(self, parameter):
        return self._by_id[id(parameter)]

    def maybe(self, parameter):
        """The gradient of `parameter`, or None for no parameter (a layer without a bias) or one whose gradient
        the model's gradients cannot give (a folded bias without BatchNorm's beta or a conv bias)."""
        return self._by_id.get(id(parameter)) if parameter is not None else None

    def rounding_of(self, parameter):
        """The RMS error a weight update's rounding left in the entries of this parameter's gradient (0 if none)."""
        return self._rounding.get(id(parameter), 0.0)


def check_gradients(model, network, grads):
    """The Gradients of `grads` (a list in model.parameters() order, or a dict by parameter name, or an
    Update, whose rounding and local steps they keep)."""
    parameters = list(model.parameters())
    update = grads if isinstance(grads, Update) else None
    if isinstance(grads, dict):
        missing = [name for name in network.parameter_names if name not in grads]
        extra = [name for name in grads if name not in network.parameter_names]
        if missing or extra:
            raise RConvError(f"gradients by name must match model.named_parameters(): missing {missing}, "
                             f"unexpected {extra}")
        grads = [grads[name] for name in network.parameter_names]
    grads = list(grads)
    if len(grads) != len(parameters):
        raise RConvError(f"expected {len(parameters)} gradient tensors (one per parameter of the model, in "
                         f"model.parameters() order); got {len(grads)}")
    for name, parameter, grad in zip(network.parameter_names, parameters, grads):
        if not isinstance(grad, torch.Tensor):
            raise RConvError(f"gradient of {name} is a {type(grad).__name__}, not a tensor")
        if tuple(grad.shape) != tuple(parameter.shape):
            raise RConvError(f"gradient of {name} has shape {tuple(grad.shape)}; the parameter has shape "
                             f"{tuple(parameter.shape)}")
        if not torch.isfinite(grad).all():
            raise RConvError(f"gradient of {name} holds NaN or infinite values")
    first = {}  # the first parameter whose gradient has each dtype
    for name, grad in zip(network.parameter_names, grads):
        first.setdefault(grad.dtype, name)
    if len(first) > 1:
        found = ", ".join(f"{name} is {str(dtype).replace('torch.', '')}" for dtype, name in first.items())
        raise RConvError(f"the gradients mix dtypes ({found}); pass every tensor in the one precision the client "
                         f"computed them in")
    rounding = list(update.rounding) if update is not None and update.rounding else [0.0] * len(parameters)
    given = Gradients(parameters, grads, rounding)
    derived = _derived(network, given)
    return Gradients(parameters + [d.parameter for d in derived], grads + [d.grad for d in derived],
                     rounding + [d.rounding for d in derived], update.local_steps if update is not None else 1)


def _pooled_size(step, out):
    """The (H, W) of a step's pooled output, given its conv output's."""
    try:
        _, window = pool_spec(step.pool, out)
    except RConvError as error:
        raise RConvError(f"{step.label}: its pool {error}") from error
    pooled = (out[0] // window, out[1] // window)
    if min(pooled) < 1:
        raise RConvError(f"{step.label}: its {window}x{window} pool leaves no output of its {out[0]}x{out[1]} map")
    return pooled


class _Derived(NamedTuple):
    """A gradient the attack's stand-in layers need, computed from the model's gradients."""

    parameter: torch.Tensor
    grad: torch.Tensor
    rounding: float


def _derived(network, given):
    """The gradients of the folded conv layers and of a bias-free Linear layer's stand-in bias."""
    derived = []
    for step in network.steps:
        if step.folded is None:
            continue
        source, norm = step.folded.source, step.folded.norm
        folded = fold_gradients(step.folded, given.of(source.weight), given.maybe(norm.bias if norm.affine else None),
                                given.maybe(source.bias), [given.rounding_of(p) for p in
                                                           (source.weight, norm.bias, source.bias)])
        derived.append(_Derived(step.conv.weight, folded.weight, folded.weight_rounding))
        if folded.bias is not None:
            derived.append(_Derived(step.conv.bias, folded.bias, folded.bias_rounding))
    if network.bias_free:
        weight = network.source_linear.weight
        read = logit_gradient(weight, given.of(weight), network.linear_name)
        derived.append(_Derived(network.linear.bias, read.grad, 0.0))
    return derived


def check_input_shape(network, input_shape):
    """The (C, H, W) of every conv layer's input, then of the last conv layer's output."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise RConvError(f"input_shape must be (C, H, W) or (1, C, H, W); got {tuple(input_shape)}")
    sizes = [shape]
    for step in network.steps:
        channels, height, width = sizes[-1]
        if channels != step.conv.in_channels:
            raise RConvError(f"{step.label} expects {step.conv.in_channels} input channels; input_shape {shape} "
                             f"gives {channels}")
        out = conv_output_size((height, width), step.conv.kernel_size, step.conv.stride, step.padding)
        if min(out) < 1:
            raise RConvError(f"{step.label} leaves no output for an input of {height}x{width}")
        if step.pool is not None:
            out = _pooled_size(step, out)
        sizes.append((step.conv.out_channels, *out))
    features = math.prod(sizes[-1])
    if features != network.linear.in_features:
        raise RConvError(f"input_shape {shape} gives {features} features at the Linear layer, which expects "
                         f"{network.linear.in_features}")
    return sizes
