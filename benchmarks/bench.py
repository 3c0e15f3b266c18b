"""How fast R-CONV recovers images, per setting: python benchmarks/bench.py (or `make bench`).

Each row runs in a fresh process, so that its peak memory is its own. Within it the
client's gradients are computed first (not timed: that is the client's work), PyTorch is
warmed up on another network, and then:
  cold start  one image with an empty cache, so every per-model factorisation is included
              (median of several runs);
  total       all the images through reconstruct_batch with an empty cache, cold start
              included (median of several runs).
Peak memory is the process's peak resident set (getrusage), which includes PyTorch itself;
added_mb is the growth over the process's size just before the attack.

Writes results/benchmark.csv (or --out) and prints the table with the machine it ran on.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# setting -> (dataset, preset, images); None picks the other from rc.TESTING_PRESETS or rc.PRESET_DATASETS
SETTINGS = {
    "Testing MNIST": ("mnist", None, 100),
    "Testing CIFAR10": ("cifar10", None, 100),
    "Testing CIFAR100 / LeNet": ("cifar100", None, 100),
    "LeNet_O": (None, "lenet_o", 100),
    "O_CNN6": (None, "o_cnn6", 100),
    "LeNet_4_ReLU": (None, "lenet_4_relu", 100),
    "LeNet_All_ReLU": (None, "lenet_all_relu", 20),
}
# (gradient precision, first layer): the paper's setting and the suite's default for real clients
MODES = [("float64", "weights"), ("float32", "hybrid")]
# The published implementation on this project's machine (2 cores), float64, Testing settings:
# about 1.5 s per image (issue 4's measurement). Used only for the speedup column.
PUBLISHED_SECONDS_PER_IMAGE = 1.5


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


def measure(setting, dtype, first_layer, images, repeats, device, data_root):
    """One benchmark row, measured in this process."""
    import torch
    import rconv_core as rc
    dataset, preset, default_images = SETTINGS[setting]
    preset = preset or rc.TESTING_PRESETS[dataset]
    count = images or default_images
    pictures, labels, model, info = rc.setup(dataset, preset, range(count), data_root=data_root)
    dataset = info["name"]
    grads = [[g.to(device) for g in rc.client_gradients(model, p, int(l), dtype=rc.as_dtype(dtype))]
             for p, l in zip(pictures, labels)]
    shape = tuple(pictures.shape[1:])
    options = dict(first_layer=first_layer, device=device)
    warm = rc.build_model(preset, info["channels"], info["num_classes"], seed=1)
    rc.reconstruct(warm, rc.client_gradients(warm, pictures[0], int(labels[0]), dtype=rc.as_dtype(dtype)), shape,
                   **options)

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    before = _rss_mb()
    colds = []
    for _ in range(max(3, repeats)):
        sync()
        start = time.perf_counter()
        rc.reconstruct(model, grads[0], shape, cache={}, **options)
        sync()
        colds.append(time.perf_counter() - start)
    totals, results = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        results = rc.reconstruct_batch(model, grads, shape, **options)
        sync()
        totals.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    psnr = statistics.median(rc.image_metrics(p, r.image)["psnr"] for p, r in zip(pictures, results))
    total = statistics.median(totals)
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else f"cpu ({_machine()})"
    return dict(setting=setting, dataset=dataset, model=preset, dtype=dtype, first_layer=first_layer, images=count,
                total_seconds=round(total, 4), ms_per_image=round(1000 * total / count, 2),
                cold_start_seconds=round(statistics.median(colds), 4), peak_mb=round(peak, 1),
                added_mb=round(peak - before, 1), exact=sum(r.exact for r in results), median_psnr=round(psnr, 1),
                speedup_vs_published=round(PUBLISHED_SECONDS_PER_IMAGE * count / total, 1), repeats=repeats,
                device=name, threads=torch.get_num_threads(), torch=torch.__version__)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", metavar="SETTING", help=f"one of: {', '.join(SETTINGS)}")
    parser.add_argument("--images", type=int, help="images per row (default: the setting's own)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is kept")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA)")
    parser.add_argument("--out", default=str(ROOT / "results" / "benchmark.csv"), help="CSV to write")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row as JSON
    args = parser.parse_args(argv)

    if args.row:
        setting, dtype, first_layer, device = json.loads(args.row)
        print(json.dumps(measure(setting, dtype, first_layer, args.images, args.repeats, device, args.data_root)))
        return 0

    import pandas as pd
    import torch
    settings = args.only or list(SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting {unknown}; choose from {list(SETTINGS)}")
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(f"machine: {platform.node()}, {_machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    rows = []
    for device in devices:
        for setting in settings:
            for dtype, first_layer in MODES:
                command = [sys.executable, __file__, "--row", json.dumps([setting, dtype, first_layer, device]),
                           "--repeats", str(args.repeats)]
                if args.images:
                    command += ["--images", str(args.images)]
                if args.data_root:
                    command += ["--data-root", args.data_root]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{setting:26} {dtype:8} {first_layer:8} {row['images']:4d} images  total {row['total_seconds']:7.3f} s"
                      f"  {row['ms_per_image']:8.2f} ms/image  cold {row['cold_start_seconds']:.3f} s  "
                      f"peak {row['peak_mb']:7.0f} MB  exact {row['exact']}/{row['images']}  {device}", flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and args.only:  # keep the other settings' rows
        previous = pd.read_csv(out)
        keep = ~(previous.setting.isin(settings) & previous.device.str.startswith(tuple(devices)))
        table = pd.concat([previous[keep], table], ignore_index=True)
    table.to_csv(out, index=False)
    columns = ["setting", "dtype", "first_layer", "images", "total_seconds", "ms_per_image", "cold_start_seconds",
               "peak_mb", "exact", "speedup_vs_published", "device"]
    print()
    print(table[columns].to_string(index=False))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
