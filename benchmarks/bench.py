"""How fast R-CONV recovers images, per setting: python benchmarks/bench.py (or `make bench`).

Each row runs in a fresh process, so that its peak memory is its own. Within it the
client's gradients are computed first (not timed: that is the client's work), PyTorch is
warmed up on another network, and then:
  cold start  one image with an empty cache, so every per-model factorisation is included
              (median of several runs);
  total       all the images through reconstruct_clients with an empty cache, cold start
              included (median of several runs).
  warm        the median time of the images after the first in that batch: a further image on
              the same model, its factorisations cached.
  bound       the part of total that the error bound took (bound_seconds, and bound_share of
              total): the attack without its certificate takes total - bound_seconds.
Peak memory is the process's peak resident set (getrusage), which includes PyTorch itself;
added_mb is the growth over the process's size just before the attack.

The "Size ..." rows are the high-resolution size sweep: the sample photos at 32, 64, 128 and 224 px
on the network recoverable at each size (the lenet_hr presets from 64 px on), and the paper's
LeNet at 96 px, which is not recoverable there and must say so quickly.

The "... / plain net" rows attack networks that are not presets (PLAIN_NETWORKS: plain nn.Sequential,
PyTorch's initialisation, shapes chosen by counting), as a user's own model would be: a batch of 8,
the sample photos at 128 px (3x3 kernels) and at 128 and 224 px (5x5 kernels, a cold and a warm photo),
and one photo at 128 px through ReLU layers with enough filters for the units that are off.

The "Success_rates ..." rows (only on request: --only workers; they need dask.distributed) time
the Success_rates notebook's sweep, reduced (WORKER_SWEEP), run serially, on a Dask LocalCluster
of 1 worker and on one of 2 workers (one thread each), as the notebook's `scheduler` None, 1 and 2
run it: a fresh cluster per run, its start-up included. The three runs take turns in every repeat,
so that other jobs on a shared machine slow them alike, and their tables must be identical but for
`seconds`. images counts the attacks (preset x image x seed x dtype); there is no cold start,
and no peak memory (the work runs in the workers' processes). The ratio 1 worker / 2 workers is
printed at the end.

Writes results/benchmark.csv (or --out) and prints the table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Setting(NamedTuple):
    """A benchmark setting. dataset or preset None: picked from rc.TESTING_PRESETS or rc.PRESET_DATASETS."""

    dataset: str | None
    preset: str | None
    images: int  # images per row unless --images says otherwise
    size: int | None = None  # image side; None: the preset's own
    warm_up: str | None = None  # preset PyTorch is warmed up on; None: the setting's own (seed 1)
    batch: int = 1  # images per client gradient: the images come as mean gradients of this many
    network: str | None = None  # a key of PLAIN_NETWORKS: a network that is not a preset, instead of `preset`


def _plain_batch(channels, classes, side, seed):
    """Conv 16 / 64 / 32 filters (5x5, strides 2, 2, 1), Tanh, Tanh, ReLU, then Linear: within the counting bound
    for a batch of 8 at 32 px, and its second layer's weight constraints square."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    after = side // 4
    return nn.Sequential(nn.Conv2d(channels, 16, 5, 2, 2), nn.Tanh(), nn.Conv2d(16, 64, 5, 2, 2), nn.Tanh(),
                         nn.Conv2d(64, 32, 5, 1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * after * after, classes))


def _plain_high_resolution(channels, classes, side, seed):
    """Conv 16 / 20 filters (3x3, strides 2, 1), Tanh, Sigmoid, then Linear: recoverable at any side by counting."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    after = (side + 1) // 2
    return nn.Sequential(nn.Conv2d(channels, 16, 3, 2, 1), nn.Tanh(), nn.Conv2d(16, 20, 3, 1, 1), nn.Sigmoid(),
                         nn.Flatten(), nn.Linear(20 * after * after, classes))


def _plain_5x5(channels, classes, side, seed):
    """Conv 16 / 20 filters (5x5, strides 2, 1), LeakyReLU twice, then Linear: its stride-1 second layer takes
    the Krylov solve from 128 px on."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    after = (side + 1) // 2
    return nn.Sequential(nn.Conv2d(channels, 16, 5, 2, 2), nn.LeakyReLU(0.2), nn.Conv2d(16, 20, 5, 1, 2),
                         nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(20 * after * after, classes))


def _plain_relu(channels, classes, side, seed):
    """Conv 32 / 72 filters (5x5, strides 2, 1), ReLU twice, then Linear: recoverable by counting with about half
    the units on; its second layer's partial weight constraints take the Krylov solve from 96 px on."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    after = (side + 1) // 2
    return nn.Sequential(nn.Conv2d(channels, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 72, 5, 1, 2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(72 * after * after, classes))


# Networks that are not presets, by name: (channels, classes, side, seed) -> nn.Module.
PLAIN_NETWORKS = {"plain_batch": _plain_batch, "plain_high_resolution": _plain_high_resolution,
                  "plain_5x5": _plain_5x5, "plain_relu": _plain_relu}
# Seed of a plain network's weights (the warm-up network takes another).
PLAIN_SEED = 50

# The size sweep's images per row: the first is the cold start, the others show a further image's cost.
SIZE_IMAGES = 4
# Warming up on lenet_hr64 loads the sparse solver's library too, without paying a 224-px factorisation.
SIZE_WARM_UP = "lenet_hr64"
# The batch rows' batch size: a mini-batch of 8 at 32 px, the size the suite's batch target is set for.
BATCH_IMAGES = 8
SETTINGS = {
    "Testing MNIST": Setting("mnist", None, 100),
    "Testing CIFAR10": Setting("cifar10", None, 100),
    "Testing CIFAR100 / LeNet": Setting("cifar100", None, 100),
    "LeNet_O": Setting(None, "lenet_o", 100),
    "O_CNN6": Setting(None, "o_cnn6", 100),
    "LeNet_4_ReLU": Setting(None, "lenet_4_relu", 100),
    "LeNet_All_ReLU": Setting(None, "lenet_all_relu", 20),
    "Size 32 / LeNet": Setting("samples", "lenet", SIZE_IMAGES, 32, SIZE_WARM_UP),
    "Size 64 / lenet_hr64": Setting(None, "lenet_hr64", SIZE_IMAGES, None, SIZE_WARM_UP),
    "Size 128 / lenet_hr128": Setting(None, "lenet_hr128", SIZE_IMAGES, None, SIZE_WARM_UP),
    "Size 224 / lenet_hr224": Setting(None, "lenet_hr224", SIZE_IMAGES, None, SIZE_WARM_UP),
    "Size 96 / LeNet (not recoverable)": Setting("samples", "lenet", SIZE_IMAGES, 96, SIZE_WARM_UP),
    # Target: a batch of 8 at 32 px in at most 5 s (two batches: the second is warm).
    "Batch 8 / lenet_batch": Setting("cifar100", "lenet_batch", 2 * BATCH_IMAGES, batch=BATCH_IMAGES),
    "Batch 8 / plain net": Setting("cifar100", None, 2 * BATCH_IMAGES, batch=BATCH_IMAGES, network="plain_batch"),
    "Size 128 / plain net": Setting("samples", None, SIZE_IMAGES, 128, network="plain_high_resolution"),
    # Targets: exact, at most 20 s (128 px) and 60 s (224 px) cold, 6 GB. Two photos: a cold and a warm one.
    "Size 128 / plain 5x5 net": Setting("samples", None, 2, 128, network="plain_5x5"),
    "Size 224 / plain 5x5 net": Setting("samples", None, 2, 224, network="plain_5x5"),
    # One photo: no factorisation is kept for a warm one under ReLU (the units on differ by photo).
    "Size 128 / plain ReLU net": Setting("samples", None, 1, 128, network="plain_relu"),
}


class WorkerSweep(NamedTuple):
    """The Success_rates notebook's sweep, reduced to a benchmark's size."""

    presets: tuple  # (preset, images) pairs, each preset on its dataset (rc.PRESET_DATASETS)
    seeds: int  # seeds 50, 51, ...
    dtypes: tuple
    first_layer: str


# lenet_all_relu takes about a second per attack and the notebook's whole run about 60 % of its time (on
# fewer images); LeNet, quick, about a fifth. Both here make about 40 s of serial work, in tasks of
# every size the notebook has (each attack_grid call is a barrier, as it is in the notebook).
WORKER_SWEEP = WorkerSweep((("lenet", 20), ("lenet_all_relu", 10)), 2, ("float64", "float32"), "hybrid")
# setting -> the notebook's `scheduler` (executor_for's argument): None serial, n a LocalCluster of n workers
WORKER_SETTINGS = {"Success_rates / serial": None, "Success_rates / 1 worker": 1, "Success_rates / 2 workers": 2}
WORKERS_GROUP = "workers"  # --only's name for the WORKER_SETTINGS rows
TASK_THREADS = 1  # a sweep's tasks run on one torch thread, serial or not (rconv/studies/executors.py)
# (gradient precision, first layer): the paper's setting and the suite's default for real clients
MODES = [("float64", "weights"), ("float32", "hybrid")]
# The published implementation on this project's machine (2 cores), float64, Testing settings:
# about 1.5 s per image, measured once on it. Used only for the speedup column.
PUBLISHED_SECONDS_PER_IMAGE = 1.5
PUBLISHED_SIDE = 32  # the image side of that measurement


def _rss_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def _warm_up(setting, preset, info, pictures, labels, dtype, options):
    """One untimed attack on another network (seed 1), so that the timed runs pay no one-time start-up."""
    import torch
    import rconv_core as rc
    if setting.network is not None:
        model = PLAIN_NETWORKS[setting.network](info["channels"], info["num_classes"], pictures.shape[-1], 1)
        image, label = pictures[0], int(labels[0])
        if setting.batch > 1:  # the warm-up takes the batch path too
            image, label = pictures[:setting.batch], labels[:setting.batch]
    elif setting.warm_up is None:
        model = rc.build_model(preset, info["channels"], info["num_classes"], seed=1, input_size=pictures.shape[-1])
        image, label = pictures[0], int(labels[0])
    else:
        side = rc.MODELS[setting.warm_up].get("input_size", 32)
        model = rc.build_model(setting.warm_up, info["channels"], info["num_classes"], seed=1)
        image, label = torch.rand(info["channels"], side, side, generator=torch.Generator().manual_seed(1)), 0
    rc.reconstruct(model, rc.client_gradients(model, image, label, dtype=rc.as_dtype(dtype)), tuple(image.shape[-3:]),
                   **options)


def measure(setting, dtype, first_layer, images, repeats, device, data_root):
    """One benchmark row, measured in this process."""
    import torch
    import rconv_core as rc
    chosen = SETTINGS[setting]
    dataset = chosen.dataset
    count = images or chosen.images
    if chosen.network is not None:
        preset, info = chosen.network, rc.dataset_info(dataset)
        pictures, labels = rc.load_images(dataset, range(count), root=data_root, size=chosen.size or 32)
        model = PLAIN_NETWORKS[preset](info["channels"], info["num_classes"], pictures.shape[-1], PLAIN_SEED)
    else:
        preset = chosen.preset or rc.TESTING_PRESETS[dataset]
        pictures, labels, model, info = rc.setup(dataset, preset, range(count), data_root=data_root, size=chosen.size)
    dataset = info["name"]
    size = chosen.batch
    batches = [(pictures[k:k + size], labels[k:k + size]) for k in range(0, count, size)]
    grads = [[g.to(device) for g in rc.client_gradients(model, p if size > 1 else p[0], l if size > 1 else int(l[0]),
                                                        dtype=rc.as_dtype(dtype))]
             for p, l in batches]
    shape = tuple(pictures.shape[1:])
    options = dict(first_layer=first_layer, device=device)
    _warm_up(chosen, preset, info, pictures, labels, dtype, options)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    before = _rss_mb()
    colds = []
    for _ in range(max(3, repeats)):
        # The last run's caches hold reference cycles (a factorisation refers to its weight system): collected
        # now, untimed, they do not add to this run's peak memory.
        gc.collect()
        sync()
        start = time.perf_counter()
        rc.reconstruct(model, grads[0], shape, cache={}, **options)
        sync()
        colds.append(time.perf_counter() - start)
    totals, bounds, results = [], [], None
    for _ in range(repeats):
        results = None
        gc.collect()
        sync()
        start = time.perf_counter()
        results = rc.reconstruct_clients(model, grads, shape, **options)
        sync()
        totals.append(time.perf_counter() - start)
        bounds.append(sum(r.bound_seconds for r in results))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    matched = [rc.match_batch(p, l, r).table for (p, l), r in zip(batches, results)]
    psnr = statistics.median(v for table in matched for v in table.psnr)
    total = statistics.median(totals)
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else f"cpu ({_machine()})"
    side = int(pictures.shape[-1])
    # the published code's time is for 32-px images; it has none for larger ones
    speedup = round(PUBLISHED_SECONDS_PER_IMAGE * count / total, 1) if side == PUBLISHED_SIDE else None
    warm = round(statistics.median(r.seconds for r in results[1:]), 4) if len(results) > 1 else None
    return dict(setting=setting, dataset=dataset, model=preset, dtype=dtype, first_layer=first_layer, images=count,
                total_seconds=round(total, 4), ms_per_image=round(1000 * total / count, 2),
                bound_seconds=round(statistics.median(bounds), 4),
                bound_share=round(statistics.median(b / t for b, t in zip(bounds, totals)), 3),
                cold_start_seconds=round(statistics.median(colds), 4), peak_mb=round(peak, 1),
                added_mb=round(peak - before, 1), exact=int(sum(t.image_exact.sum() for t in matched)),
                median_psnr=round(psnr, 1), batch=size,
                speedup_vs_published=speedup, repeats=repeats, device=name, threads=torch.get_num_threads(),
                torch=torch.__version__, size=side, warm_seconds=warm)


def _success_rates(images, scheduler, data_root):
    """The Success_rates notebook's table on WORKER_SWEEP (images per preset: `images`, or each preset's own)."""
    import pandas as pd
    import rconv_core as rc
    with rc.executor_for(scheduler) as executor:
        return pd.concat([rc.attack_grid(rc.PRESET_DATASETS[preset], preset, range(images or count),
                                         dtypes=WORKER_SWEEP.dtypes, first_layers=[WORKER_SWEEP.first_layer],
                                         seeds=range(50, 50 + WORKER_SWEEP.seeds), data_root=data_root,
                                         executor=executor, progress=False)
                          for preset, count in WORKER_SWEEP.presets], ignore_index=True)


def measure_workers(images, repeats, data_root):
    """The WORKER_SETTINGS rows, measured from this process (the work runs in the clusters' workers)."""
    import torch
    _success_rates(1, None, data_root)  # untimed: this process's start-up, as the other rows' warm-up
    totals, tables = {setting: [] for setting in WORKER_SETTINGS}, {}
    for _ in range(repeats):
        for setting, scheduler in WORKER_SETTINGS.items():
            gc.collect()
            start = time.perf_counter()
            table = _success_rates(images, scheduler, data_root)
            totals[setting].append(time.perf_counter() - start)
            tables[setting] = table
    serial = tables["Success_rates / serial"].drop(columns="seconds")
    differ = [setting for setting, table in tables.items() if not table.drop(columns="seconds").equals(serial)]
    if differ:
        raise RuntimeError(f"the tables of {differ} differ from the serial one (every column but seconds)")
    rows = []
    for setting, table in tables.items():
        total = statistics.median(totals[setting])
        rows.append(dict(setting=setting, dataset="+".join(dict.fromkeys(table.dataset)),
                         model="+".join(dict.fromkeys(table.model)), dtype="+".join(WORKER_SWEEP.dtypes),
                         first_layer=WORKER_SWEEP.first_layer, images=len(table), total_seconds=round(total, 4),
                         ms_per_image=round(1000 * total / len(table), 2), bound_seconds=None, bound_share=None,
                         cold_start_seconds=None, peak_mb=None,
                         added_mb=None, exact=int(table.exact.sum()), median_psnr=round(table.psnr.median(), 1),
                         speedup_vs_published=None, repeats=repeats, device=f"cpu ({_machine()})",
                         threads=TASK_THREADS, torch=torch.__version__, size=None, warm_seconds=None))
    return rows


def _worker_rows(args):
    """The WORKER_SETTINGS rows, measured in a fresh process and printed; [] if it failed."""
    command = [sys.executable, __file__, "--worker-rows", "--repeats", str(args.repeats)]
    if args.images:
        command += ["--images", str(args.images)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        print(f"FAILED: {WORKERS_GROUP}\n{done.stderr[-2000:]}", file=sys.stderr)
        return []
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for row in rows:
        print(f"{row['setting']:32} {row['dtype']:16} {row['images']:4d} attacks  total {row['total_seconds']:7.3f} s"
              f"  {row['ms_per_image']:8.2f} ms/attack  exact {row['exact']}/{row['images']}", flush=True)
    by_setting = {row["setting"]: row["total_seconds"] for row in rows}
    two = by_setting["Success_rates / 2 workers"]
    print(f"Success_rates on 2 workers: {by_setting['Success_rates / 1 worker'] / two:.2f}x as fast as on 1 worker, "
          f"{by_setting['Success_rates / serial'] / two:.2f}x as fast as serial", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="SETTING",
                        help=f"one of: {', '.join(SETTINGS)}; or {WORKERS_GROUP} (the Success_rates rows, only on "
                             f"request)")
    parser.add_argument("--images", type=int, help="images per row (default: the setting's own)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is kept")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA)")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmark.csv"), help="CSV to write")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row as JSON
    parser.add_argument("--worker-rows", action="store_true", help=argparse.SUPPRESS)  # internal: those rows as JSON
    args = parser.parse_args(argv)

    if args.worker_rows:
        print(json.dumps(measure_workers(args.images, args.repeats, args.data_root)))
        return 0
    if args.row:
        setting, dtype, first_layer, device = json.loads(args.row)
        print(json.dumps(measure(setting, dtype, first_layer, args.images, args.repeats, device, args.data_root)))
        return 0

    import pandas as pd
    import torch
    settings = args.only or list(SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS and s != WORKERS_GROUP]
    if unknown:
        parser.error(f"unknown setting {unknown}; choose from {list(SETTINGS) + [WORKERS_GROUP]}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    workers = WORKERS_GROUP in settings and "cpu" in devices  # those rows are measured on the CPU only
    settings = [s for s in settings if s != WORKERS_GROUP] + (list(WORKER_SETTINGS) if workers else [])
    print(f"machine: {platform.node()}, {_machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    rows, failed = [], []
    for device in devices:
        for setting in [s for s in settings if s in SETTINGS]:
            for dtype, first_layer in MODES:
                command = [sys.executable, __file__, "--row", json.dumps([setting, dtype, first_layer, device]),
                           "--repeats", str(args.repeats)]
                if args.images:
                    command += ["--images", str(args.images)]
                if args.data_root:
                    command += ["--data-root", args.data_root]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:  # one failing row (a GPU path, say) must not cost the others
                    print(f"FAILED: {setting} {dtype} {first_layer} {device}\n{done.stderr[-2000:]}", file=sys.stderr)
                    failed.append(f"{setting} {dtype} {device}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                warm = f"  warm {row['warm_seconds']:.3f} s" if row["warm_seconds"] is not None else ""
                print(f"{setting:32} {dtype:8} {first_layer:8} {row['images']:4d} images  total {row['total_seconds']:7.3f} s"
                      f"  {row['ms_per_image']:8.2f} ms/image  bound {100 * row['bound_share']:4.1f} %  cold {row['cold_start_seconds']:.3f} s{warm}  "
                      f"peak {row['peak_mb']:7.0f} MB  exact {row['exact']}/{row['images']}  {device}", flush=True)
    if workers:
        measured = _worker_rows(args)
        rows += measured
        failed += [] if measured else [WORKERS_GROUP]
    if not rows:
        return 1
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:  # keep the other settings' rows
        previous = pd.read_csv(out)
        keep = ~(previous.setting.isin(settings) & previous.device.str.startswith(tuple(devices)))
        table = pd.concat([previous[keep], table], ignore_index=True)
    table.to_csv(out, index=False)
    columns = ["setting", "dtype", "first_layer", "images", "total_seconds", "ms_per_image", "cold_start_seconds",
               "warm_seconds", "peak_mb", "exact", "speedup_vs_published", "device"]
    print()
    print(table[[c for c in columns if c in table.columns]].to_string(index=False))
    print(f"\nwrote {out}")
    if failed:
        print(f"FAILED rows, not written: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
