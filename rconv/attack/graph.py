"""Reading any nn.Module as R-CONV sees it: torch.fx's trace, as the chain of operations it runs.

trace_chain() traces a model symbolically and lists its operations in execution order, each an
Operation of a known kind (a conv or Linear layer, an activation, a reshape, Dropout, BatchNorm or
a no-op), or refuses, naming the graph node: an operation R-CONV cannot invert, or a node that
does not take the previous node's output alone (a residual add, a concatenation). Whether the
chain's order and modes can be inverted is for rconv.attack.network to judge.
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from ..common.errors import RConvError

KINDS = ("conv", "linear", "activation", "reshape", "dropout", "batchnorm", "identity", "pool")
_MODULE_KINDS = {nn.Conv2d: "conv", nn.Linear: "linear", nn.ReLU: "activation", nn.LeakyReLU: "activation",
                 nn.Sigmoid: "activation", nn.Tanh: "activation", nn.Flatten: "reshape", nn.Dropout: "dropout",
                 nn.Dropout1d: "dropout", nn.Dropout2d: "dropout", nn.Dropout3d: "dropout",
                 nn.BatchNorm2d: "batchnorm", nn.BatchNorm1d: "batchnorm", nn.Identity: "identity",
                 nn.MaxPool2d: "pool", nn.AvgPool2d: "pool", nn.AdaptiveAvgPool2d: "pool"}
_MODULE_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_FUNCTION_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                         F.leaky_relu: "leaky_relu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
                         torch.tanh: "tanh", F.tanh: "tanh"}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}
_FUNCTION_RESHAPES = (torch.flatten, torch.reshape)
_METHOD_RESHAPES = ("view", "reshape", "flatten", "contiguous")
_METHOD_SHAPES = ("size", "dim")  # queries whose answers only size a reshape
_LEAKY_DEFAULT_SLOPE = 0.01  # F.leaky_relu's default negative_slope
_DROPOUT_DEFAULT_TRAINING = True  # F.dropout's default: a call that does not say trains
# F.max_pool2d / F.avg_pool2d as the modules that do the same: (module, its arguments in call order)
_FUNCTION_POOLS = {F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
                   F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode")),
                   F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",))}
_COMBINING = {operator.add: "residual connections are not supported", torch.add: "residual connections are not "
              "supported", operator.iadd: "residual connections are not supported",
              torch.cat: "concatenated branches are not supported", torch.stack: "stacked branches are not supported"}
_SUPPORTED = ("Conv2d, Linear, ReLU, LeakyReLU, Sigmoid, Tanh, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten (or "
              "view/reshape), Dropout, BatchNorm and Identity")


@dataclass(frozen=True)
class Operation:
    """One operation of a model's chain, first to last as the forward runs it."""

    name: str  # the module's place in the model ("model[0]", "model.features[2]"), or the graph node's name
    kind: str  # one of KINDS
    where: str  # how an error names it: "model[2] (ReLU, after conv layer 1)", "graph node relu (torch.relu)"
    module: nn.Module | None = None  # the layer, for call_module nodes (and the module an F.*_pool2d call equals)
    activation: str = ""  # "relu", "leaky_relu", "sigmoid" or "tanh" for an activation
    slope: float = 0.0  # LeakyReLU's negative slope
    training: bool = False  # Dropout that drops units, BatchNorm that normalises by the batch's statistics


def readable_name(qualified):
    """A module's qualified name ("features.0") as Python indexes it from the model ("model.features[0]")."""
    name = "model"
    for part in qualified.split(".") if qualified else ():
        name += f"[{part}]" if part.isdigit() else f".{part}"
    return name


def trace_chain(model, cache=None):
    """The Operations of `model`'s forward, in execution order, or an RConvError naming the graph node
    that is not one of them or does not continue the chain.

    cache: a dict kept per model (reconstruct's); it keeps the symbolic trace, which costs more than a
    small network's whole attack (8 ms on a LeNet), for as long as the model has the same modules.
    """
    if not isinstance(model, nn.Module):
        raise RConvError(f"R-CONV reads a torch nn.Module; got {type(model).__name__}")
    modules = dict(model.named_modules())
    graph = _cached_trace(model, modules, cache)
    operations, previous, convs = [], None, 0
    shapes = set()  # nodes that only query sizes, for reshapes
    called = set()  # modules already in the chain
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise RConvError(f"graph node {node.name} (a second input): R-CONV reads models with one input")
            previous = node
            continue
        if _is_shape_query(node, shapes):
            shapes.add(node)
            continue
        data = [n for n in node.all_input_nodes if n not in shapes]
        if node.op == "output":
            if data != [previous]:
                raise RConvError(f"the model's output is not its last operation's ({previous.name}); R-CONV reads "
                                 f"a single chain of layers")
            break
        where = _describe(node, modules, convs)
        if node.op == "get_attr":
            raise RConvError(f"{where}: the forward reads the parameter {node.target} itself (as F.conv2d(x, "
                             f"self.{node.target}) or F.linear do); R-CONV reads conv and Linear layers as "
                             f"nn.Conv2d and nn.Linear modules")
        if len(data) > 1:
            reason = _COMBINING.get(node.target, "it combines several tensors") if node.op == "call_function" \
                else "it combines several tensors"
            raise RConvError(f"{where}: {reason}; R-CONV reads a single chain of layers")
        if data != [previous]:
            taken = data[0].name if data else "no tensor"
            raise RConvError(f"{where} takes {taken} instead of the previous operation's output ({previous.name}); "
                             f"R-CONV reads a single chain of layers, each taking the one before it")
        weighted = node.op == "call_module" and next(modules[node.target].parameters(), None) is not None
        if weighted and node.target in called:
            # its gradient sums every use's, which no one layer's equations describe
            raise RConvError(f"{where}: the same layer is used twice, so its weights are shared and its gradient "
                             f"is the sum of both uses'; R-CONV reads a chain whose layers each have their own weights")
        if node.op == "call_module":
            called.add(node.target)
        operation = _operation(node, modules, where)
        convs += operation.kind == "conv"
        operations.append(operation)
        previous = node
    return operations


def _cached_trace(model, modules, cache):
    # the trace follows the model's code and its modules; a module replaced or added retraces it
    key = ("traced graph", id(model), tuple((name, id(module)) for name, module in modules.items()))
    graph = cache.get(key) if cache is not None else None
    if graph is None:
        graph = _trace(model)
        if cache is not None:
            cache[key] = graph
    return graph


# torch.fx patches nn.Module's __call__ and __getattr__ for the whole process while it traces. One trace at a
# time: two patches undone out of order would leave one behind for good.
_TRACING = threading.Lock()


class _ThreadTracer(torch.fx.Tracer):
    """torch.fx's Tracer, recording only the calls of the thread it traces in: another thread's model (a
    thread-pool sweep's other task) runs as if nothing were traced, instead of failing inside the tracer."""

    def trace(self, root, concrete_args=None):
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def call_module(self, m, forward, args, kwargs):
        if threading.get_ident() != self._thread:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _trace(model):
    try:
        with _TRACING:
            return _ThreadTracer().trace(model)
    except Exception as error:  # tracing runs the model's own Python, which may raise anything
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RConvError(f"torch.fx cannot trace {type(model).__name__} ({first}); R-CONV reads models whose "
                         f"forward is a fixed chain of layers, without branching on tensor values") from error


def _is_shape_query(node, shapes):
    """Whether a node computes only sizes (x.size(0), x.shape[1], their arithmetic), for a reshape to use."""
    if node.op == "call_method" and node.target in _METHOD_SHAPES:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",):
        return True
    inputs = node.all_input_nodes
    return node.op == "call_function" and bool(inputs) and all(n in shapes for n in inputs)


def _function_name(target):
    module = getattr(target, "__module__", None) or ""
    module = "operator" if module == "_operator" else module
    return f"{module}.{target.__name__}" if module else target.__name__


def _describe(node, modules, convs):
    after = f", after conv layer {convs}" if convs else ""
    if node.op == "call_module":
        return f"{readable_name(node.target)} ({type(modules[node.target]).__name__}{after})"
    if node.op == "call_function":
        return f"graph node {node.name} ({_function_name(node.target)}{after})"
    if node.op == "call_method":
        return f"graph node {node.name} (Tensor.{node.target}{after})"
    return f"graph node {node.name} ({node.op} {node.target}{after})"


def _argument(node, position, keyword, default):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def _operation(node, modules, where):
    if node.op == "call_module":
        return _module_operation(node.target, modules[node.target], where)
    if node.op == "call_function":
        return _function_operation(node, where)
    if node.op == "call_method":
        if node.target in _METHOD_ACTIVATIONS:
            return Operation(node.name, "activation", where, activation=_METHOD_ACTIVATIONS[node.target])
        if node.target in _METHOD_RESHAPES:
            return Operation(node.name, "reshape", where)
        raise RConvError(f"{where} cannot be inverted by R-CONV; supported operations are {_SUPPORTED}")
    if node.op == "get_attr":
        raise RConvError(f"{where}: the forward uses a parameter or buffer directly (a functional layer); R-CONV "
                         f"reads layers as modules (nn.Conv2d, nn.Linear)")
    raise RConvError(f"{where} cannot be inverted by R-CONV; supported operations are {_SUPPORTED}")


def _module_operation(target, module, where):
    name = readable_name(target)
    kind = next((k for cls, k in _MODULE_KINDS.items() if type(module) is cls), None)
    if kind is None:
        raise RConvError(f"{where} cannot be inverted by R-CONV; supported layers are {_SUPPORTED}")
    if kind == "activation":
        return Operation(name, kind, where, module, _MODULE_ACTIVATIONS[type(module)],
                         float(getattr(module, "negative_slope", 0.0)))
    if kind == "dropout":
        return Operation(name, kind, where, module, training=module.training and module.p > 0)
    if kind == "batchnorm":
        batch_statistics = module.training or not module.track_running_stats or module.running_mean is None
        return Operation(name, kind, where, module, training=batch_statistics)
    return Operation(name, kind, where, module)


def _function_operation(node, where):
    target = node.target
    if target in _FUNCTION_ACTIVATIONS:
        activation = _FUNCTION_ACTIVATIONS[target]
        slope = float(_argument(node, 1, "negative_slope", _LEAKY_DEFAULT_SLOPE)) if activation == "leaky_relu" else 0.0
        return Operation(node.name, "activation", where, activation=activation, slope=slope)
    if target in _FUNCTION_RESHAPES:
        return Operation(node.name, "reshape", where)
    if target is F.dropout:
        drops = bool(_argument(node, 2, "training", _DROPOUT_DEFAULT_TRAINING)) and _argument(node, 1, "p", 0.5) > 0
        return Operation(node.name, "dropout", where, training=drops)
    if target in _FUNCTION_POOLS:
        return Operation(node.name, "pool", where, _pool_module(node, where))
    if target in _COMBINING:
        raise RConvError(f"{where}: {_COMBINING[target]}; R-CONV reads a single chain of layers")
    raise RConvError(f"{where} cannot be inverted by R-CONV; supported operations are {_SUPPORTED}")


def _pool_module(node, where):
    """The pooling module an F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d call equals (its sizes must be
    numbers written in the code, not computed from the data)."""
    module, names = _FUNCTION_POOLS[node.target]
    given = {name: _argument(node, position + 1, name, None) for position, name in enumerate(names)}
    given = {name: value for name, value in given.items() if value is not None}
    if any(isinstance(value, torch.fx.Node) for value in given.values()):
        raise RConvError(f"{where}: its window is computed in the forward; R-CONV reads pools whose sizes are fixed")
    try:
        return module(**given)
    except (TypeError, ValueError) as error:
        raise RConvError(f"{where}: arguments R-CONV cannot read ({error})") from error
