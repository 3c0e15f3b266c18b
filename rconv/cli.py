"""The command line: python -m rconv_core -d CIFAR100 -i 92 -a ReLU."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from .analysis.plotting import plot_grid, plot_reconstruction
from .analysis.reports import image_metrics, match_batch
from .attack.reconstruct import FIRST_LAYER_METHODS, reconstruct
from .cases.client import as_dtype, client_gradients
from .cases.models import MODELS, activation_name, preset_name
from .cases.setup import setup
from .common.errors import RConvError


def _parser():
    parser = argparse.ArgumentParser(prog="python -m rconv_core",
                                     description="recover one image and save reconstruction.png")
    parser.add_argument("-d", "--dataset", default="CIFAR100", help="MNIST, CIFAR10, CIFAR100 or samples")
    parser.add_argument("-i", "--index", type=int, default=25, help="index of the training image")
    parser.add_argument("-a", "--activation", default=None,
                        help="activation of the last two conv layers (ReLU, LeakyReLU, Sigmoid, Tanh); "
                             "default: the model's own")
    parser.add_argument("--model", default="lenet_c10", help=f"preset: {', '.join(MODELS)}")
    parser.add_argument("--dtype", default="float32", help="precision of the client's gradients")
    parser.add_argument("--first-layer", default="hybrid", choices=FIRST_LAYER_METHODS)
    parser.add_argument("--seed", type=int, default=50, help="seed of the model's initialisation")
    parser.add_argument("--batch", type=int, default=1, metavar="N",
                        help="reconstruct N consecutive images (from --index on) from one mean gradient")
    parser.add_argument("--data-root", default=None, help="folder with datasets or sample packs "
                                                           "(default: $RCONV_DATA, then data/)")
    parser.add_argument("--out", default=_DEFAULT_OUT, help="where to save the figure (a file, or an existing "
                                                             "folder to hold reconstruction.png)")
    return parser


_DEFAULT_OUT = "reconstruction.png"


def _figure_path(out):
    """Where the figure will go, checked before the attack: its folder must exist and take a new file."""
    path = Path(out).expanduser()
    if path.is_dir():
        path = path / _DEFAULT_OUT
    if not path.suffix:
        path = path.with_suffix(".png")  # matplotlib would add it; say so up front
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise RConvError(f"--out {out}: matplotlib cannot write {path.suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise RConvError(f"--out {out}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise RConvError(f"--out {out}: the folder {folder} does not exist (it is not created for you)")
    if path.exists() and not path.is_file():
        raise RConvError(f"--out {out}: {path} exists and is not a file")
    try:  # a real write: permissions alone miss read-only file systems, /proc and the like
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RConvError(f"--out {out}: cannot create files in {folder} ({error.strerror or error})") from error
    return path


def _overrides(args):
    if args.activation is None:
        return {}
    activations = list(MODELS[preset_name(args.model)]["activations"])
    activations[-2:] = [activation_name(args.activation)] * 2
    return dict(activations=tuple(activations))


def _print_result(args, case, result):
    import pandas as pd
    image, label = case.images[0], int(case.labels[0])
    metrics = image_metrics(image, result.image)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.report().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\n{case.info['name']} image {args.index} (label {label}), model {args.model} "
          f"({'-'.join(case.model.config['activations'])}), {args.dtype} gradients, first layer {args.first_layer}")
    print(f"MSE {metrics['mse']:.3e}  PSNR {metrics['psnr']:.2f} dB  SSIM {metrics['ssim']:.6f}  "
          f"max |error| {metrics['max_abs_err']:.3e}  exact: {result.exact}  time {result.seconds:.2f} s")
    for note in result.notes:
        print(f"note: {note}")


def _run_batch(args, case, out):
    """--batch N: one mean gradient of N images, the batch attack, a table per image and a grid figure."""
    import pandas as pd
    grads = client_gradients(case.model, case.images, case.labels, dtype=as_dtype(args.dtype))
    result = reconstruct(case.model, grads, case.images.shape[1:], first_layer=args.first_layer)
    matched = match_batch(case.images, case.labels, result)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(result.report().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        print()
        print(matched.table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\n{case.info['name']} images {args.index}..{args.index + args.batch - 1}, model {args.model}, "
          f"{args.dtype} mean gradients: {len(result.image)} image(s) found, "
          f"{int(result.image_exact.sum())} exact, exact: {result.exact}, time {result.seconds:.2f} s")
    for line in result.reasons + result.notes:
        print(f"note: {line}")
    shown = [result.image[j] if j is not None else torch.full_like(case.images[i], float("nan"))
             for i, j in enumerate(matched.order)]
    try:
        plot_grid(list(case.images), shown, path=out, indices=list(range(args.index, args.index + args.batch)),
                  title=f"R-CONV on a batch of {args.batch} ({args.model}, {args.dtype})")
    except OSError as error:
        raise RConvError(f"could not save {out}: {error}") from error
    print(f"saved {out}")
    return 0


def main(argv=None):
    """python -m rconv_core -d CIFAR100 -i 92 -a ReLU: recover one image and save reconstruction.png."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        out = _figure_path(args.out)
        if args.batch < 1:
            raise RConvError(f"--batch must be at least 1; got {args.batch}")
        case = setup(args.dataset, args.model, list(range(args.index, args.index + args.batch)), args.seed,
                     data_root=args.data_root, **_overrides(args))
        if args.batch > 1:
            return _run_batch(args, case, out)
        grads = client_gradients(case.model, case.images[0], case.labels[0], dtype=as_dtype(args.dtype))
        result = reconstruct(case.model, grads, case.images.shape[1:], first_layer=args.first_layer)
    except RConvError as error:
        parser.exit(2, f"error: {error}\n")
    _print_result(args, case, result)
    try:
        plot_reconstruction(case.images[0], result.image, path=out,
                            title=f"R-CONV on {case.info['name']} #{args.index} ({args.model}, {args.dtype})")
    except OSError as error:  # the folder changed since the check (removed, disk full)
        parser.exit(1, f"error: could not save {out}: {error}\n")
    print(f"saved {out}")
    return 0
