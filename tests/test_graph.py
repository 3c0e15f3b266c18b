"""Real networks: any nn.Module read through torch.fx (rconv.attack.graph), eval-mode BatchNorm folded into its
conv layer (rconv.attack.folding), a bias-free last Linear layer read off its weight gradient
(rconv.attack.bias_free), and the attack on each of them, each refusal one RConvError naming the node or layer."""
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rconv_core as rc
from rconv.attack.bias_free import logit_gradient
from rconv.attack.folding import fold_batchnorm, fold_gradients
from rconv.attack.graph import readable_name, trace_chain
from rconv.attack.network import parse_network

SIDE = 16  # 3x16x16 images keep every attack to a few seconds
SHAPE = (3, SIDE, SIDE)
# A LeNet-like body: a stride-2 first layer of 12 filters, square in its weight constraints (12 * 8 * 8 = 3 * 16 * 16),
# then 8 filters of 5x5 on 8x8 inputs, above the counting bound min_filters (3) for the gradient constraints.
FIRST, SECOND = 12, 8
FEATURES = SECOND * 8 * 8
CLASSES = 10
EXACT = 1e-6  # float64 gradients: the image to this max abs error, as `exact` promises
# Without the tracer's thread check, every one of these traces broke the other thread's forward within a few.
TRACES_BESIDE_A_FORWARD = 100


def body(bias=True):
    return [nn.Conv2d(3, FIRST, 5, stride=2, padding=2, bias=bias), nn.LeakyReLU(0.2),
            nn.Conv2d(FIRST, SECOND, 5, padding=2, bias=bias), nn.ReLU(), nn.Flatten()]


class Functional(nn.Module):
    """A forward written with torch.nn.functional and a view, as many models are."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, FIRST, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(FIRST, SECOND, 5, padding=2)
        self.fc = nn.Linear(FEATURES, CLASSES)

    def forward(self, x):
        x = F.leaky_relu(self.conv1(x), 0.2)
        x = torch.relu(self.conv2(x))
        x = F.dropout(x, 0.5, training=False)
        return self.fc(x.view(x.size(0), -1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = x + F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def attack(model, label=3, seed=1):
    """reconstruct() on float64 client gradients of a random image; the result and the image."""
    torch.manual_seed(seed)
    image = torch.rand(SHAPE)
    grads = rc.client_gradients(model, image, label, dtype=torch.float64)
    return rc.reconstruct(model, grads, SHAPE), image


def assert_exact(result, image, label=3):
    assert result.exact, result.reasons
    assert float((result.image[0] - image.double()).abs().max()) <= EXACT
    assert int(result.labels[0]) == label


def with_batchnorm(bias=True, affine=True):
    torch.manual_seed(0)
    layers = body(bias)
    model = nn.Sequential(layers[0], nn.BatchNorm2d(FIRST, affine=affine), *layers[1:], nn.Linear(FEATURES, CLASSES))
    norm = model[1]
    with torch.no_grad():  # statistics and affine parameters far from the identity
        norm.running_mean.uniform_(-0.3, 0.3)
        norm.running_var.uniform_(0.5, 2.0)
        if affine:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return model.eval()


# graph: the chain torch.fx reads

def test_readable_names():
    assert readable_name("0") == "model[0]"
    assert readable_name("features.0") == "model.features[0]"
    assert readable_name("") == "model"


def test_a_functional_forward_reads_as_a_chain():
    chain = trace_chain(Functional())
    assert [op.kind for op in chain] == ["conv", "activation", "conv", "activation", "dropout", "reshape", "linear"]
    assert [op.name for op in chain][::2] == ["model.conv1", "model.conv2", "dropout", "model.fc"]
    leaky = chain[1]
    assert (leaky.activation, leaky.slope, leaky.where) == ("leaky_relu", 0.2,
                                                           "graph node leaky_relu (torch.nn.functional.leaky_relu, "
                                                           "after conv layer 1)")
    assert not chain[4].training


def test_a_cached_trace_is_reused_until_a_module_is_replaced():
    model, cache = Functional(), {}
    first = trace_chain(model, cache)
    assert [op.kind for op in trace_chain(model, cache)] == [op.kind for op in first] and len(cache) == 1
    model.conv2 = nn.Conv2d(FIRST, SECOND, 3, padding=1)  # a new module: the cached trace must not stand for it
    again = trace_chain(model, cache)
    assert again[2].module is model.conv2 and len(cache) == 2


def test_tracing_leaves_other_threads_models_alone():
    """torch.fx patches every module's __call__ while it traces; a thread-pool sweep's other task runs meanwhile."""
    other, image = Functional(), torch.randn(1, 3, 16, 16)
    expected, running, faults = other(image), threading.Event(), []

    def forward_until_done():
        while not running.is_set():
            try:
                assert torch.equal(other(image), expected)
            except Exception as error:
                faults.append(error)
                return

    thread = threading.Thread(target=forward_until_done)
    thread.start()
    try:
        chains = [trace_chain(Functional()) for _ in range(TRACES_BESIDE_A_FORWARD)]
    finally:
        running.set()
        thread.join()
    assert faults == [] and all(len(chain) == len(chains[0]) for chain in chains)
    assert nn.Module.__call__ is nn.Module._wrapped_call_impl, "the tracer's patch was undone"


def test_presets_keep_their_names():
    network = parse_network(rc.build_model("lenet", 3, 100))
    assert [step.name for step in network.steps] == ["model[0]", "model[2]", "model[4]", "model[6]"]
    assert network.linear_name == "model[9]" and not network.bias_free


def test_a_residual_add_is_refused():
    with pytest.raises(rc.RConvError, match=r"graph node add \(operator.add, after conv layer 2\): residual "
                                            r"connections are not supported"):
        trace_chain(Residual())


def test_a_concatenation_is_refused():
    class Cat(Residual):
        def forward(self, x):
            y = F.relu(self.conv1(x))
            return self.fc(torch.cat([y, self.conv2(y)], 1).flatten(1))

    with pytest.raises(rc.RConvError, match=r"graph node cat \(torch.cat, after conv layer 2\): concatenated"):
        trace_chain(Cat())


def test_pools_are_read_as_modules_or_calls():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))
    assert [operation.kind for operation in trace_chain(model)][:3] == ["conv", "activation", "pool"]

    class Functional(Residual):
        def forward(self, x):
            return self.fc(F.avg_pool2d(F.relu(self.conv1(x)), kernel_size=1).flatten(1))

    pool = trace_chain(Functional())[2]
    assert pool.kind == "pool" and isinstance(pool.module, nn.AvgPool2d) and pool.module.kernel_size == 1

    class Adaptive(Residual):
        def forward(self, x):
            return self.fc(F.adaptive_max_pool2d(F.relu(self.conv1(x)), 2).flatten(1))

    with pytest.raises(rc.RConvError, match=r"graph node adaptive_max_pool2d .*cannot be inverted by R-CONV"):
        trace_chain(Adaptive())


def test_an_unused_branch_breaks_the_chain():
    class Skipping(Residual):
        def forward(self, x):
            y = F.relu(self.conv1(x))
            self.conv2(y)
            return self.fc(y.flatten(1))

    with pytest.raises(rc.RConvError, match=r"graph node flatten \(Tensor.flatten, after conv layer 2\) takes relu "
                                            r"instead of the previous operation's output \(conv2\)"):
        trace_chain(Skipping())


# folding: eval-mode BatchNorm into its conv layer

@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False)])
def test_folding_keeps_the_forward_and_maps_the_gradients(bias, affine):
    model = with_batchnorm(bias, affine).double()
    conv, norm = model[0], model[1]
    folded = fold_batchnorm(conv, norm, "conv layer 1 (model[0])")
    x = torch.rand(1, *SHAPE, dtype=torch.float64)
    weights = torch.randn(1, FIRST, 8, 8, dtype=torch.float64)  # a loss linear in the layer's output
    out = norm(conv(x))
    assert torch.allclose(folded.conv(x), out, atol=1e-12)
    (out * weights).sum().backward()
    beta = norm.bias.grad if affine else None
    conv_bias = conv.bias.grad if bias else None
    mapped = fold_gradients(folded, conv.weight.grad, beta, conv_bias, (0.0, 0.0, 0.0))
    folded_conv = folded.conv.requires_grad_(True)
    folded_conv.zero_grad()
    (folded_conv(x) * weights).sum().backward()
    assert torch.allclose(mapped.weight, folded_conv.weight.grad, atol=1e-10)
    if affine or bias:
        assert torch.allclose(mapped.bias, folded_conv.bias.grad, atol=1e-10)
    else:
        assert mapped.bias is None


def test_a_zero_gamma_is_refused():
    model = with_batchnorm()
    with torch.no_grad():
        model[1].weight[5] = 0.0
    with pytest.raises(rc.RConvError, match=r"conv layer 1 \(model\[0\]\): its BatchNorm scales filter\(s\) \[5\] "
                                            r"by zero"):
        parse_network(model)


# bias_free: dL/dlogits off a rank-one weight gradient

@pytest.mark.parametrize("classes,label", [(10, 3), (10, 0), (3, 1), (100, 42)])
def test_logit_gradient_recovers_the_softmax_gradient(classes, label):
    generator = torch.Generator().manual_seed(classes + label)
    weight = torch.randn(classes, 20, generator=generator, dtype=torch.float64) * 0.3
    x = torch.rand(20, generator=generator, dtype=torch.float64) * 2.0
    g = torch.softmax(weight @ x, 0) - F.one_hot(torch.tensor(label), classes).double()
    read = logit_gradient(weight, torch.outer(g, x), "model[5]")
    assert read.label == label
    assert torch.allclose(read.grad, g, rtol=1e-9, atol=1e-12)
    assert read.scale == pytest.approx(float(torch.linalg.norm(x)), rel=1e-9)


def test_two_classes_are_ambiguous():
    # dL/dlogits = (p, -p) or (-p', p'): both labels explain a rank-one dL/dW with their own scale of x
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 20, generator=generator, dtype=torch.float64)
    x = torch.rand(20, generator=generator, dtype=torch.float64)
    g = torch.softmax(weight @ x, 0) - torch.tensor([0.0, 1.0], dtype=torch.float64)
    with pytest.raises(rc.RConvError, match=r"model\[5\] has no bias, and its weight gradient fits two images' "
                                            r"cross-entropy gradients equally well .* with 2 classes"):
        logit_gradient(weight, torch.outer(g, x), "model[5]")


def test_logit_gradient_of_zero_is_refused():
    with pytest.raises(rc.RConvError, match=r"model\[5\] has no bias and a zero weight gradient"):
        logit_gradient(torch.ones(3, 4), torch.zeros(3, 4), "model[5]")


# the attack on each kind of network: exact from float64 gradients

def test_a_functional_forward():
    torch.manual_seed(0)
    result, image = attack(Functional())
    assert_exact(result, image)
    assert [report.layer for report in result.layers] == [1, 2]


def test_an_mlp_head_with_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(*body(), nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, CLASSES)).eval()
    grads_of = len(list(model.parameters()))
    result, image = attack(model)
    assert_exact(result, image)  # the label from the last Linear layer's bias gradient
    assert len(result.features) == FEATURES and grads_of == 8
    assert any("model[6], model[8]) are not needed" in note for note in result.notes)


def test_a_batch_through_a_head_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(*body(), nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))
    grads = rc.client_gradients(model, torch.rand(2, *SHAPE), torch.tensor([1, 4]), dtype=torch.float64)
    with pytest.raises(rc.RConvError, match=r"the Linear layer model\[5\] is followed by more layers: a batch's split"):
        rc.reconstruct(model, grads, SHAPE)


def test_batchnorm_in_eval_mode_is_folded():
    model = with_batchnorm()
    result, image = attack(model)
    assert_exact(result, image)
    assert "conv layer 1 (model[0]): its eval-mode BatchNorm is folded into it" in result.notes[0]
    table = rc.constraint_report(model, SHAPE)
    assert list(table.layer) == [1, 2] and table.attrs["recoverable"]
    truth, features = rc.layer_inputs(model, image)
    assert torch.allclose(truth[1].double(), result.inputs[1].double(), atol=EXACT)
    assert torch.allclose(features.double().flatten(), result.features.double(), atol=EXACT)


def test_batchnorm_without_affine_parameters_or_conv_bias():
    result, image = attack(with_batchnorm(bias=False, affine=False))
    assert_exact(result, image)


def test_batchnorm1d_in_the_head_is_not_needed():
    torch.manual_seed(0)
    model = nn.Sequential(*body(), nn.Linear(FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, CLASSES)).eval()
    result, image = attack(model)
    assert_exact(result, image)


def test_bias_free_layers():
    torch.manual_seed(0)
    model = nn.Sequential(*body(bias=False), nn.Linear(FEATURES, CLASSES, bias=False))
    result, image = attack(model, label=7)
    assert_exact(result, image, label=7)  # the label where the recovered dL/dlogits is negative
    assert all(report.bias_residual == 0.0 for report in result.layers)  # no bias gradient to check
    assert [note.split(":")[0] for note in result.notes[:3]] == [
        "conv layer 1 (model[0]) has no bias", "conv layer 2 (model[2]) has no bias",
        "the Linear layer model[5] has no bias"]
    assert list(rc.constraint_report(model, SHAPE).determined_by) == ["weights", "gradients"]


def test_a_bias_free_linear_layer_reads_one_image_only():
    torch.manual_seed(0)
    model = nn.Sequential(*body(bias=False), nn.Linear(FEATURES, CLASSES, bias=False))
    images = torch.rand(2, *SHAPE)
    grads = rc.client_gradients(model, images, torch.tensor([1, 4]), dtype=torch.float64)
    with pytest.raises(rc.RConvError, match=r"the Linear layer model\[5\] has no bias"):
        rc.reconstruct(model, grads, SHAPE)


# refusals that name the layer

def test_train_mode_dropout_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(*body(), nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, CLASSES))
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    with pytest.raises(rc.RConvError, match=r"model\[7\] \(Dropout, after conv layer 2\): Dropout in training mode"):
        rc.reconstruct(model, grads, SHAPE)

    class Dropping(Functional):
        def forward(self, x):
            return self.fc(F.dropout(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1))

    with pytest.raises(rc.RConvError, match=r"graph node dropout \(torch.nn.functional.dropout, after conv layer 2\): "
                                            r"Dropout in training mode"):
        parse_network(Dropping())


def test_train_mode_batchnorm_is_kept_beside_its_conv_layer():
    """Not folded: it normalises by the image's own statistics (tests/test_batchnorm.py attacks it)."""
    step = parse_network(with_batchnorm().train()).steps[0]
    assert step.folded is None and step.norm is not None and step.norm.module is step.output_module


class _SharedConv(nn.Module):
    """One conv layer applied twice: its gradient sums both uses'."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * SIDE * SIDE, CLASSES)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(torch.sigmoid(self.conv(x)))).flatten(1))


class _ParameterConv(nn.Module):
    """A conv written as F.conv2d on a bare parameter."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(FIRST, 3, 5, 5))
        self.fc = nn.Linear(FIRST * 8 * 8, CLASSES)

    def forward(self, x):
        return self.fc(torch.sigmoid(F.conv2d(x, self.kernel, stride=2, padding=2)).flatten(1))


def test_a_layer_used_twice_is_refused_naming_it():
    with pytest.raises(rc.RConvError, match=r"conv \(Conv2d, after conv layer 1\): the same layer is used twice"):
        trace_chain(_SharedConv())


def test_a_bare_parameter_in_the_forward_is_refused_naming_it():
    with pytest.raises(rc.RConvError, match=r"graph node kernel \(get_attr kernel\): the forward reads the parameter"):
        trace_chain(_ParameterConv())


class _WithUnused(nn.Module):
    """A LeNet-like chain beside a layer its forward never calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*body(), nn.Linear(FEATURES, CLASSES))
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


def test_a_parameter_the_forward_never_reaches_gets_a_zero_gradient_and_the_attack_runs():
    torch.manual_seed(5)
    model, image = _WithUnused(), torch.rand(*SHAPE)
    grads = rc.client_gradients(model, image, 3, dtype=torch.float64)
    assert all(float(g.abs().max()) == 0.0 for g in grads[-2:])
    result = rc.reconstruct(model, grads, SHAPE)
    assert result.exact and float((result.image[0] - image.double()).abs().max()) <= EXACT
