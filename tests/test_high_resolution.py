"""The attack on high-resolution inputs (the lenet_hr presets and rconv.studies.experiments.size_sweep): the presets
exact at 64, 128 and 224 px, the paper's LeNet honestly not, per-layer methods, memory limits, the SuperLU fallback,
large rank-deficient layers, and the size sweep's table."""
import math

import pytest
import torch

import rconv.linalg.solvers
import rconv.linalg.sparse
import rconv_core as rc
from conftest import max_error

# What the presets must reach: exact from float64 gradients, and at least this PSNR from float32 ones.
EXACT_ERROR, FLOAT32_PSNR = 1e-6, 60.0
# The paper's LeNet at 64 px, by counting: layer 2's 12 x 32 x 32 inputs against its 12 * 16 * 5 * 5 gradient
# constraints per channel (400 per channel at most, 4,800 in all) plus its 16 * 16 * 16 weight constraints.
PAPER_LENET_64_VERDICT = (
    "not: exact at best down to conv layer 3's input; conv layer 2 has 12,288 unknowns and at most 8,896 equations")


def case_of(model, indices=(0, 1), **overrides):
    return rc.setup(None if model.startswith("lenet_hr") else "samples", model, list(indices), **overrides)


def attack(case, k, dtype, **options):
    grads = rc.client_gradients(case.model, case.images[k], int(case.labels[k]), dtype=dtype)
    return rc.reconstruct(case.model, grads, tuple(case.images.shape[1:]), **options)


@pytest.fixture(scope="module")
def hr64():
    return case_of("lenet_hr64")


def check_preset(case, fresh=True):
    """Exact from float64 and >= 60 dB from float32; a further image on a shared cache as exact as a fresh one
    (fresh=False leaves that comparison to the smaller presets: a cold 224-px attack takes 8 s)."""
    cache = {}
    first = attack(case, 0, torch.float64, cache=cache)
    assert first.exact, first.reasons
    assert max_error(first, case.images[0]) <= EXACT_ERROR
    assert [layer.method for layer in first.layers] == ["weights", "gradients", "gradients", "gradients"]
    further = attack(case, 1, torch.float64, cache=cache)
    assert further.exact and max_error(further, case.images[1]) <= EXACT_ERROR, further.reasons
    assert len(cache) > 0, "the cache holds what depends only on the weights"
    if fresh:
        assert torch.allclose(further.image, attack(case, 1, torch.float64).image, rtol=0, atol=1e-10)
    single = attack(case, 0, torch.float32, cache=cache)
    assert single.exact, single.reasons
    assert rc.image_metrics(case.images[0], single.image)["psnr"] >= FLOAT32_PSNR


def test_lenet_hr64_is_exact_from_float64_and_float32(hr64):
    check_preset(hr64)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["lenet_hr128", "lenet_hr224"])
def test_larger_presets_are_exact_from_float64_and_float32(model):
    check_preset(case_of(model), fresh=model != "lenet_hr224")


@pytest.mark.parametrize("model", ["lenet_hr64", "lenet_hr128", "lenet_hr224"])
def test_presets_are_recoverable_by_counting(model):
    size = rc.MODELS[model]["input_size"]
    report = rc.constraint_report(rc.build_model(model), (3, size, size))
    assert report.attrs["recoverable"] and report.attrs["verdict"] == "recoverable"
    assert list(report.determined_by) == ["weights", "gradients", "gradients", "gradients"]


@pytest.mark.parametrize("size", [64, pytest.param(96, marks=pytest.mark.slow)])
def test_the_paper_s_lenet_at_high_resolution_is_never_exact_and_says_why(size):
    case = case_of("lenet", (0,), input_size=size)
    report = rc.constraint_report(case.model, (3, size, size))
    assert not report.attrs["recoverable"]
    if size == 64:
        assert report.attrs["verdict"] == PAPER_LENET_64_VERDICT
    for dtype in (torch.float64, torch.float32):
        result = attack(case, 0, dtype)
        assert not result.exact
        assert bool(torch.isfinite(result.image).all())
        assert result.reasons and all(reason.startswith("conv layer") for reason in result.reasons)
        assert result.notes, "an estimated layer says why it was only estimated"


def test_a_forced_method_is_used_and_judged(hr64):
    forced = attack(hr64, 0, torch.float64, methods={3: "hybrid"})
    assert forced.layers[2].method == "hybrid" and forced.exact, forced.reasons
    too_few = attack(hr64, 0, torch.float64, methods={2: "weights"})
    assert too_few.layers[1].method == "weights" and not too_few.exact
    assert any(reason.startswith("conv layer 2 (weights)") for reason in too_few.reasons), too_few.reasons


@pytest.mark.parametrize("methods, message", [
    ({2: "nope"}, r"methods\[2\] must be one of weights, gradients, hybrid"),
    ({5: "weights"}, r"methods names conv layers \[5\]; this network's conv layers are 1..4"),
    ({0: "weights"}, r"conv layers are 1..4"),
    ("weights", "methods must be a dict"),
])
def test_wrong_methods_are_refused_by_name(hr64, methods, message):
    with pytest.raises(rc.RConvError, match=message):
        attack(hr64, 0, torch.float64, methods=methods)


@pytest.mark.parametrize("limit", [10 ** 6, 10 ** 7])
def test_a_memory_limit_too_small_stops_before_allocating(hr64, limit):
    with pytest.raises(rc.RConvError, match=r"conv layer \d.*memory_limit.*before allocating"):
        attack(hr64, 0, torch.float64, memory_limit=limit)


@pytest.mark.slow  # tests/test_sparse.py checks SuperLU itself quickly
def test_superlu_takes_over_without_pardiso(hr64, monkeypatch):
    reference = attack(hr64, 0, torch.float64)
    factorised = []

    class CountedSuperLU(rconv.linalg.sparse._SuperLU):
        def __init__(self, *args, **kwargs):
            factorised.append(args[0].shape)
            super().__init__(*args, **kwargs)

    # _mkl_pardiso is lru_cached: replacing the module's attribute is what every caller sees.
    monkeypatch.setattr(rconv.linalg.sparse, "_mkl_pardiso", lambda: None)
    monkeypatch.setattr(rconv.linalg.sparse, "_SuperLU", CountedSuperLU)
    assert rconv.linalg.sparse.backend() == "superlu"
    result = attack(hr64, 0, torch.float64)
    assert factorised, "the sparse solves went through SuperLU"
    assert result.exact and max_error(result, hr64.images[0]) <= EXACT_ERROR, result.reasons
    assert torch.allclose(result.image, reference.image, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_size_sweep_rows_say_size_start_memory_verdict_and_methods():
    networks = [("lenet_hr64", 64), ("lenet", 64), ("lenet", 8, {"kernel_size": 9, "padding": 0})]
    table = rc.size_sweep(networks, [0, 1], dtypes=["float64"], progress=False)
    assert len(table) == 6
    hr = table[table.model == "lenet_hr64"]
    assert list(hr.start) == ["cold", "warm"] and hr.exact.all() and (hr.max_abs_err <= EXACT_ERROR).all()
    assert set(hr.methods) == {"weights,gradients,gradients,gradients"}
    assert set(hr.verdict) == {"recoverable"} and set(hr.channels) == {"64-24-16-12"}
    assert (hr.peak_mb > 0).all() and (hr.added_mb >= 0).all() and (hr.seconds > 0).all()
    paper = table[(table.model == "lenet") & (table["size"] == 64)]
    assert not paper.exact.any() and (paper.reason.str.len() > 0).all()
    assert set(paper.verdict) == {PAPER_LENET_64_VERDICT}
    refused = table[table["size"] == 8]
    assert not refused.exact.any() and refused.reason.str.contains("conv layer 1 leaves no output pixels").all()
    summary = rc.size_summary(table)
    assert list(summary.exact) == [2, 0, 0] and summary.cold_seconds.iloc[0] > 0


def test_size_sweep_keeps_going_past_a_refused_attack():
    table, kept = rc.size_sweep([("lenet_hr64", 64), ("lenet", 32)], [0], dtypes=["float64"], memory_limit=10 ** 7,
                                keep=True, progress=False)
    refused, small = table.iloc[0], table.iloc[1]
    assert not refused.exact and "conv layer" in refused.reason and "memory_limit" in refused.reason
    assert math.isnan(refused.seconds) and kept[0] is None
    assert small.exact and kept[1] is not None and kept[1].exact, "the 32-px network needs no large solve"


@pytest.mark.parametrize("networks, message", [
    ([("nope", 64)], "unknown model 'nope'"),
    ([("lenet_hr64",)], r"\(model, size\)"),
    ([("lenet", 64, "wide")], "must be a dict"),
    ([("lenet", 0)], "whole number >= 1"),
    ([], "at least one"),
])
def test_size_sweep_refuses_malformed_networks_before_any_work(networks, message):
    with pytest.raises(rc.RConvError, match=message):
        rc.size_sweep(networks, [0], progress=False)


def test_a_large_layer_s_rank_deficient_gradients_are_completed_quickly():
    """LeNet_All_ReLU's second layer (19,712 unknowns) with rank-deficient gradient constraints: completed in
    their null space (not by minutes of a sparse factorisation of the stacked system), and honestly not exact."""
    case = rc.setup(None, "lenet_all_relu", [7], seed=59)
    result = attack(case, 0, torch.float64)
    layer = result.layers[1]
    assert layer.method == "gradients+weights" and layer.rank < layer.unknowns
    assert any("its gradient constraints left 231 directions undetermined" in note for note in result.notes)
    assert not result.exact and "conv layer 2 (gradients+weights): rank" in result.reasons[0]


def non_preset(size, kernel=3):
    """The two-layer networks of no preset that high resolution once broke: a stride-2 layer into 16 channels,
    then a stride-1 layer of 20 filters with no padding, whose input only its weight constraints determine."""
    activations = ("tanh", "sigmoid") if kernel == 3 else ("leaky_relu", "leaky_relu")
    return rc.build_model("lenet_hr64", channels=(16, 20), strides=(2, 1), activations=activations, kernel_size=kernel,
                          padding=(kernel // 2, 0), input_size=size, init="default")


def attack_non_preset(size, dtype, kernel=3, **options):
    images, labels = rc.load_images("samples", [0], size=size)
    model = non_preset(size, kernel)
    grads = rc.client_gradients(model, images[0], int(labels[0]), dtype=dtype)
    return rc.reconstruct(model, grads, tuple(images.shape[1:]), **options), images[0]


def test_a_non_preset_layer_beyond_its_memory_limit_is_refused_by_name():
    with pytest.raises(rc.RConvError, match=r"^conv layer 2 \(model\[2\]\): .* would need .*\(memory_limit\)"):
        attack_non_preset(64, torch.float64, memory_limit=2 ** 20)


# What a reconstruction may map beyond what the interpreter and its libraries map after import: enough for the
# 64-px network's direct solve to be refused or to fit, never to run out.
_ADDRESS_SPACE_HEADROOM = 600 * 2 ** 20
_UNDER_LIMIT = """
import torch
import rconv_core as rc
images, labels = rc.load_images("samples", [0], size=64)
model = rc.build_model("lenet_hr64", channels=(16, 20), strides=(2, 1), activations=("tanh", "sigmoid"),
                       kernel_size=3, padding=(1, 0), input_size=64, init="default")
grads = rc.client_gradients(model, images[0], int(labels[0]), dtype=torch.float64)
try:
    result = rc.reconstruct(model, grads, (3, 64, 64))
    print("exact", result.exact)
except rc.RConvError as error:
    print("RConvError:", error)
"""


@pytest.mark.slow
def test_under_an_address_space_limit_a_reconstruction_succeeds_or_refuses_never_runs_out():
    import os
    import subprocess
    import sys

    from conftest import REPO
    mapped = subprocess.run([sys.executable, "-c", "import rconv_core, scipy.sparse.linalg; "
                             "print(open('/proc/self/status').read().split('VmSize:')[1].split()[0])"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    limit_kb = int(mapped.stdout) + _ADDRESS_SPACE_HEADROOM // 1024
    done = subprocess.run(["bash", "-c", f'ulimit -v {limit_kb}; exec "$0" -c "$1"', sys.executable, _UNDER_LIMIT],
                          cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MemoryError" not in done.stderr
    assert done.stdout.startswith(("exact True", "RConvError: conv layer", "RConvError: the error bound")), done.stdout


@pytest.mark.slow
def test_the_128_px_non_preset_network_is_exact_from_float64():
    result, image = attack_non_preset(128, torch.float64)
    assert result.exact, result.reasons
    assert max_error(result, image) <= EXACT_ERROR
    assert [layer.solver for layer in result.layers] == ["direct", "direct"]


def relu_non_preset(size, seed=50):
    """Conv 32 / 72 filters (5x5, strides 2, 1), ReLU twice: enough filters for the units that are off."""
    torch.manual_seed(seed)
    after = (size + 1) // 2
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 5, 2, 2), torch.nn.ReLU(), torch.nn.Conv2d(32, 72, 5, 1, 2),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72 * after * after, 10))


@pytest.mark.slow
def test_a_large_relu_first_layer_from_float32_is_factorised_once_and_corrected_by_its_gradients(monkeypatch):
    """Its gradient constraints' Gram blocks made too large to factorise here (as at 128 px), the hybrid first
    layer factorises its units that are on and corrects their weakest directions with the gradient constraints,
    without a weights-alone attempt first; the photo comes back above 60 dB, certified."""
    import rconv.attack.systems as systems
    monkeypatch.setattr(systems, "DIRECT_MAX_GRAM_ENTRIES", 5_000_000)
    images, labels = rc.load_images("samples", [0], size=64)
    model = relu_non_preset(64)
    grads = rc.client_gradients(model, images[0], int(labels[0]), dtype=torch.float32)
    result = rc.reconstruct(model, grads, (3, 64, 64))
    first = result.layers[0]
    assert (first.method, first.solver) == ("hybrid", "direct"), result.reasons
    assert result.exact, result.reasons
    assert 10 * math.log10(1.0 / float(((result.image[0] - images[0].double()) ** 2).mean())) >= FLOAT32_PSNR
