"""The experiment loops and their tidy tables: one row per image and setting, parameters in every row."""

from __future__ import annotations

import functools
import gc
import itertools
import math
import sys
from typing import NamedTuple

import torch

from ..analysis.reports import constraint_report, image_metrics, output_gradients
from ..attack.activations import RELU_TESTS
from ..attack.constraints import grad_constraints, min_filters
from ..attack.network import check_input_shape, parse_network
from ..attack.reconstruct import FIRST_LAYER_METHODS, reconstruct
from ..cases.client import DEFENCES, as_dtype, client_gradients, defend, dtype_name
from ..cases.data import check_indices, dataset_info
from ..cases.models import build_model, convnet_settings, preset_input_size, preset_name
from ..cases.setup import setup
from ..common.checks import whole_number, whole_numbers
from ..common.errors import RConvError
from ..common.progress import progress_bar
from ..linalg.solvers import rank_rtol
from .executors import ATTACKS_PER_TASK, chunked, path_text, run_tasks


def _check_choices(name, values, valid):
    unknown = [value for value in values if value not in valid]
    if unknown or not len(values):
        raise RConvError(f"{name} must be a non-empty list drawn from {', '.join(map(str, valid))}; "
                         f"got {list(values)}")


def _attack_row(model, image, grads, setting, options):
    """One attack's metrics for the table, and its Reconstruction (None where R-CONV refused)."""
    try:
        result = reconstruct(model, grads, image.shape, **options)
    except RConvError as error:  # e.g. top-k leaves no bias gradient: a row, not a crash
        return dict(setting, mse=math.nan, psnr=math.nan, ssim=math.nan, max_abs_err=math.nan, error_bound=math.nan,
                    exact=False, rank_deficient=False, seconds=math.nan, reason=str(error), notes=""), None
    return dict(setting, **image_metrics(image, result.image), error_bound=result.error_bound, exact=result.exact,
                rank_deficient=not all(r.full_rank for r in result.layers), seconds=result.seconds,
                reason="; ".join(result.reasons), notes="; ".join(result.notes)), result


class _GridTask(NamedTuple):
    """One task of attack_grid: some images of one model (seed) and gradient dtype, in every setting."""

    dataset: str
    model: str
    seed: int
    dtype: str
    indices: tuple
    defences: tuple  # (name, strength) pairs
    variants: tuple  # (first_layer, relu_test, project) triples
    data_root: str | None
    overrides: tuple  # build_model's overrides as (name, value) pairs
    keep: bool


def _grid_task(task, cache):
    """attack_grid's (row, Reconstruction or None) pairs of one task, in the grid's order."""
    case = setup(task.dataset, task.model, list(task.indices), task.seed, data_root=task.data_root,
                 **dict(task.overrides))
    setting = dict(dataset=case.info["name"], model=task.model,
                   activations="-".join(case.model.config["activations"]), seed=task.seed)
    weights = cache((case.info["name"], task.model, task.seed, repr(task.overrides)))
    pairs = []
    for index, image, label in zip(task.indices, case.images, case.labels):
        grads = client_gradients(case.model, image, label, dtype=as_dtype(task.dtype))
        for (defence, strength), (first_layer, relu_test, project) in itertools.product(task.defences,
                                                                                         task.variants):
            row, result = _attack_row(
                case.model, image, defend(grads, defence, strength, seed=index),
                dict(setting, index=index, label=int(label), dtype=task.dtype, first_layer=first_layer,
                     relu_test=relu_test, defence=defence, strength=strength, project=project),
                dict(first_layer=first_layer, relu_test=relu_test, project=project, cache=weights,
                     check_batch=defence == "none", batch_size=1))  # one image's gradients, by construction
            pairs.append((row, result if task.keep else None))
    return pairs


def _grid_table(results, keep):
    import pandas as pd
    pairs = [pair for result in results for pair in result]
    table = pd.DataFrame([row for row, _ in pairs])
    return (table, [result for _, result in pairs]) if keep else table


def attack_grid(dataset, model_name, indices, *, dtypes=("float32",), first_layers=("hybrid",),
                relu_tests=("relative",), defences=(("none", 0),), projects=(False,), seeds=(50,), data_root=None,
                keep=False, progress=True, executor=None, **model_overrides):
    """R-CONV on dataset images over every combination of settings; the suite's tidy results.

    Every image is attacked as a client of the preset would leak it, for each seed (of the
    model's initialisation), gradient dtype, defence (name, strength) as in defend(), first
    layer method, ReLU test and projection. Returns a pandas DataFrame with one row per image
    and setting: dataset, model, activations, seed, index, label, dtype, first_layer,
    relu_test, defence, strength, project, mse, psnr, ssim, max_abs_err, error_bound (the attack's
    bound on max_abs_err; exact needs it within 1e-6 from float64, 1e-3 from float32), exact,
    rank_deficient, seconds, reason (why not exact: which layer, what broke; empty when exact),
    notes. With keep=True also the list of Reconstructions, one per row. A setting R-CONV
    refuses (RConvError: say, top-k leaves no bias gradient) gets a row with its error as
    the reason and NaN metrics; settings that could never run (an unknown first
    layer, ReLU test, defence or dtype) raise RConvError before any work.
    executor: None runs here; a Dask Client or a concurrent.futures.Executor spreads the work
    (tasks of one seed, dtype and a few images) over its workers, with the same rows in the same
    order (run_tasks; a task that fails with another error than RConvError raises SweepFailed,
    which holds the other tasks' rows).
    """
    dataset_info(dataset)
    indices = check_indices(indices)
    _check_choices("first_layers", first_layers, FIRST_LAYER_METHODS)
    _check_choices("relu_tests", relu_tests, RELU_TESTS)
    _check_choices("defences", [d for d, _ in defences], DEFENCES)
    dtypes = [dtype_name(as_dtype(dtype)) for dtype in dtypes]
    for defence, strength in defences:
        defend([torch.zeros(1)], defence, strength)  # refuses impossible strengths before any work
    variants = tuple(itertools.product(first_layers, relu_tests, projects))
    defences = tuple((defence, strength) for defence, strength in defences)
    per_image = len(defences) * len(variants)
    tasks = [_GridTask(dataset, model_name, seed, dtype, chunk, defences, variants, path_text(data_root),
                       tuple(sorted(model_overrides.items())), keep)
             for seed in seeds for dtype in dtypes for chunk in chunked(indices, ATTACKS_PER_TASK // per_image)]
    return run_tasks(_grid_task, tasks, functools.partial(_grid_table, keep=keep), executor=executor,
                     desc=f"{dataset_info(dataset)['name']} {model_name}", unit="attack",
                     sizes=[len(task.indices) * per_image for task in tasks], progress=progress)


def attack_images(dataset, model_name, indices, *, dtypes=("float64", "float32"), first_layer="hybrid", seed=50,
                  data_root=None, progress=True, **model_overrides):
    """attack_grid() for one first layer method and seed, keeping the reconstructions.

    Returns (table, reconstructions), reconstructions a dict dtype name -> list of
    Reconstruction (None where the attack raised) in the order of indices. The first image of each dtype pays the
    one-time factorisations (see seconds).
    """
    table, results = attack_grid(dataset, model_name, indices, dtypes=dtypes, first_layers=(first_layer,),
                                 seeds=(seed,), data_root=data_root, keep=True, progress=progress, **model_overrides)
    reconstructions = {}
    for dtype, result in zip(table["dtype"], results):
        reconstructions.setdefault(dtype, []).append(result)
    return table, reconstructions


def _gradient_rank(model, step, image, label, input_size):
    """The numerical rank (float64) of a conv step's gradient-constraint matrix for one image."""
    grad = output_gradients(model, image, label)[step.number - 1]
    matrix = grad_constraints(grad, input_size, step.conv.kernel_size, step.conv.stride, step.padding)
    sigma = torch.linalg.svdvals(matrix)
    return int((sigma > rank_rtol(torch.float64, matrix.shape) * sigma.max()).sum())


class _FilterTask(NamedTuple):
    """One task of filter_sweep: some images of one filter count and seed."""

    dataset: str
    model: str
    position: int
    channels: tuple  # the preset's filters, with the swept count at `position`
    seed: int
    indices: tuple
    data_root: str | None


def _filter_task(task, cache):
    """filter_sweep's rows of one task (the rank needs no weight cache)."""
    case = setup(task.dataset, task.model, list(task.indices), task.seed, data_root=task.data_root,
                 channels=list(task.channels))
    network = parse_network(case.model)
    sizes = check_input_shape(network, case.images.shape[1:])
    step = network.steps[task.position - 1]
    c_in, height, width = sizes[task.position - 1]
    _, out_h, out_w = sizes[task.position]
    setting = dict(dataset=case.info["name"], model=task.model, activation=step.activation, position=task.position,
                   filters=task.channels[task.position - 1], seed=task.seed)
    bound = dict(unknowns=height * width,
                 min_filters=min_filters((height, width), step.conv.kernel_size, step.conv.stride, step.padding),
                 rgap_filters=math.ceil(c_in * height * width / (out_h * out_w)))
    rows = []
    for index, image, label in zip(task.indices, case.images, case.labels):
        rank = _gradient_rank(case.model, step, image, label, (height, width))
        rows.append(dict(setting, index=index, unknowns=bound["unknowns"], rank=rank,
                         full_rank=rank == height * width, min_filters=bound["min_filters"],
                         rgap_filters=bound["rgap_filters"]))
    return rows


def _rows_table(results):
    import pandas as pd
    return pd.DataFrame([row for rows in results for row in rows])


def filter_sweep(dataset, model_name, position, counts, indices, *, seeds=(50,), data_root=None, progress=True,
                 executor=None):
    """How many filters conv layer `position` (1 = first) needs for its gradient constraints alone.

    For each filter count, seed and image, the layer's true output gradient (float64) gives its
    gradient-constraint matrix; the row says whether it is full rank at float64 precision.
    Columns: dataset, model, activation, position, filters, seed, index, unknowns (pixels per
    channel), rank, full_rank, min_filters (the counting bound), rgap_filters (the filters a
    count of weight constraints, as R-GAP's rank analysis, asks for: C*H*W / (P*Q)).
    executor: as attack_grid's (None: here; a Dask Client or concurrent.futures.Executor: there).
    """
    base = convnet_settings(model_name)
    if not 1 <= position <= len(base["channels"]):
        raise RConvError(f"position must be 1..{len(base['channels'])} for {model_name}; got {position}")
    indices = check_indices(indices)
    whole_numbers(counts, "counts", what="filter counts")
    tasks = []
    for filters in counts:
        channels = list(base["channels"])
        channels[position - 1] = int(filters)
        tasks += [_FilterTask(dataset, model_name, position, tuple(channels), seed, chunk, path_text(data_root))
                  for seed in seeds for chunk in chunked(indices, ATTACKS_PER_TASK)]
    return run_tasks(_filter_task, tasks, _rows_table, executor=executor, desc=f"{model_name} layer {position}",
                     unit="image", sizes=[len(task.indices) for task in tasks], progress=progress)


# Linux resets a process's peak resident set (VmHWM) when "5" is written here, so that each
# attack's own peak can be read; elsewhere the peak is the process's lifetime peak (getrusage).
_CLEAR_REFS, _STATUS = "/proc/self/clear_refs", "/proc/self/status"
_MB = 2 ** 20
# An untimed attack on this preset first loads what every process loads once (PyTorch's kernels,
# the sparse solver's library), so that the first timed cold start pays only for its own model.
_WARM_UP_MODEL = "lenet_hr64"


class _SweepNetwork(NamedTuple):
    """One network of size_sweep: a preset, the image side, and build_model overrides."""

    model: str
    size: int | None  # None: the preset's own input size
    overrides: dict


class _Memory(NamedTuple):
    """The process's resident memory during one attack, in MB."""

    peak_mb: float  # the peak (only this attack's where the system can reset it, else the process's)
    added_mb: float  # the peak's growth over the resident size just before the attack


def _sweep_network(entry):
    """A (model, size) or (model, size, overrides) entry as a _SweepNetwork, or an error naming it."""
    if isinstance(entry, (str, bytes)) or not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise RConvError(f"networks must be (model, size) or (model, size, overrides) entries, e.g. "
                         f"('lenet_hr64', 64); got {entry!r}")
    model, size = preset_name(entry[0]), entry[1]
    overrides = dict(entry[2]) if len(entry) == 3 and isinstance(entry[2], dict) else None
    if len(entry) == 3 and overrides is None:
        raise RConvError(f"the overrides of {entry!r} must be a dict of build_model arguments, e.g. "
                         f"{{'channels': [12, 48, 16, 12]}}")
    if size is not None:
        size = whole_number(size, f"the size of {entry!r}", hint=" (the image side), or None for the preset's own")
    return _SweepNetwork(model, size, overrides or {})


def _status_mb(field):
    """A size from /proc/self/status (VmRSS, VmHWM) in MB, or None where there is none."""
    try:
        with open(_STATUS) as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024 / _MB
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the process's peak resident set; False where the system does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def _lifetime_peak_mb():
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak * 1024 / _MB  # bytes on macOS, KB elsewhere


def _with_memory(attack):
    """attack()'s result and the _Memory the process took while it ran."""
    own_peak = _reset_peak()
    before = _status_mb("VmRSS")
    result = attack()
    peak = _status_mb("VmHWM") if own_peak else _lifetime_peak_mb()
    added = max(0.0, peak - before) if before is not None else math.nan
    return result, _Memory(round(peak, 1), round(added, 1))


def _warm_up():
    """One untimed attack on a throwaway network, so that no timed attack pays the process's start-up."""
    model = build_model(_WARM_UP_MODEL, seed=0)
    image = torch.rand(3, preset_input_size(_WARM_UP_MODEL), preset_input_size(_WARM_UP_MODEL),
                       generator=torch.Generator().manual_seed(0))
    reconstruct(model, client_gradients(model, image, 0), tuple(image.shape), batch_size=1)


def _sweep_row(model, image, label, dtype, cache, memory_limit, setting):
    """One attack of the size sweep as a table row, and its Reconstruction (None where R-CONV refused)."""
    failed = dict(mse=math.nan, psnr=math.nan, ssim=math.nan, max_abs_err=math.nan, error_bound=math.nan, exact=False,
                  rank_deficient=False, seconds=math.nan, peak_mb=math.nan, added_mb=math.nan, methods="", notes="")
    try:
        grads = client_gradients(model, image, label, dtype=dtype)
        result, memory = _with_memory(lambda: reconstruct(model, grads, tuple(image.shape), batch_size=1, cache=cache,
                                                          memory_limit=memory_limit))
    except RConvError as error:  # a setting R-CONV refuses (too little memory, say) is a row, not a crash
        return dict(setting, **failed, reason=str(error)), None
    return dict(setting, **image_metrics(image, result.image), error_bound=result.error_bound, exact=result.exact,
                rank_deficient=not all(r.full_rank for r in result.layers), seconds=result.seconds,
                peak_mb=memory.peak_mb, added_mb=memory.added_mb,
                methods=",".join(r.method for r in result.layers), reason="; ".join(result.reasons),
                notes="; ".join(result.notes)), result


def size_sweep(networks, indices, *, dtypes=("float64", "float32"), dataset="samples", seed=50, data_root=None,
               memory_limit=None, keep=False, progress=True):
    """R-CONV against image size: each network on the same images at its size, timed and weighed.

    Args:
        networks: (model, size) entries, e.g. [("lenet", 32), ("lenet_hr224", 224), ("lenet", 96)], or
            (model, size, overrides) with build_model overrides, e.g. ("lenet", 64, {"channels": [12, 48, 16, 12]});
            size None means the preset's own.
        indices: images of `dataset`, resized to each network's size.
        memory_limit: reconstruct()'s, for every attack.
    Returns a pandas DataFrame with one row per network, dtype and image: dataset, model, size,
    channels, seed, verdict and recoverable (constraint_report's counting verdict, before any
    gradient), index, label, dtype, start ("cold": the first image of the network and dtype, with an
    empty cache, so every per-model factorisation is included; "warm": a further image, sharing
    the cache), mse, psnr, ssim, max_abs_err, error_bound, exact, rank_deficient, seconds, peak_mb (the process's
    peak resident memory during the attack; its lifetime peak where the system cannot reset it),
    added_mb (that peak's growth over the size before the attack), methods (each conv layer's,
    first to last), reason, notes. With keep=True also the list of Reconstructions, one per row.
    A network or image R-CONV refuses (RConvError) gets rows with the error as the reason; unknown
    presets, dtypes or datasets raise before any work. On Linux each attack resets the process's
    peak-memory counter (VmHWM, /proc/self/clear_refs) so that peak_mb is that attack's own.
    """
    import pandas as pd
    name = dataset_info(dataset)["name"]
    indices = check_indices(indices)
    dtypes = [as_dtype(dtype) for dtype in dtypes]
    entries = [_sweep_network(entry) for entry in networks]
    if not entries:
        raise RConvError("size_sweep needs at least one (model, size) network")
    _warm_up()
    rows, kept = [], []
    bar = progress_bar(total=len(entries) * len(dtypes) * len(indices), desc="size sweep", unit="attack",
                       enabled=progress)
    for entry in entries:
        setting = dict(dataset=name, model=entry.model, size=entry.size or preset_input_size(entry.model),
                       channels="", seed=seed, verdict="", recoverable=math.nan)
        try:
            case = setup(name, entry.model, indices, seed, data_root=data_root, size=entry.size, **entry.overrides)
            report = constraint_report(case.model, tuple(case.images.shape[1:]))
        except RConvError as error:  # say, a network that leaves no output pixels at this size
            for dtype, index in itertools.product(dtypes, indices):
                rows.append(dict(setting, index=index, dtype=dtype_name(dtype), exact=False, reason=str(error)))
                kept.append(None)
                bar.update(1)
            continue
        setting.update(size=int(case.images.shape[-1]), channels="-".join(map(str, case.model.config["channels"])),
                       verdict=report.attrs["verdict"], recoverable=report.attrs["recoverable"])
        for dtype in dtypes:
            cache = {}  # per network and dtype, so that each one's first image is a cold start
            # The cache just dropped holds reference cycles (a weight system's factorisation refers back to
            # it): freed now, not at some later garbage collection, this cold start's memory is its own.
            gc.collect()
            for position, (index, image, label) in enumerate(zip(indices, case.images, case.labels)):
                row, result = _sweep_row(case.model, image, int(label), dtype, cache, memory_limit,
                                         dict(setting, index=index, label=int(label), dtype=dtype_name(dtype),
                                              start="cold" if position == 0 else "warm"))
                rows.append(row)
                kept.append(result if keep else None)
                bar.update(1)
    bar.close()
    table = pd.DataFrame(rows)
    return (table, kept) if keep else table

