"""The command line: python -m rconv_core -d CIFAR100 -i 92 -a ReLU."""

from __future__ import annotations

import argparse

from .attack import FIRST_LAYER_METHODS, reconstruct
from .cases import setup
from .client import as_dtype, client_gradients
from .errors import RConvError
from .models import MODELS, activation_name, preset_name
from .plotting import plot_reconstruction
from .reports import image_metrics


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
    parser.add_argument("--data-root", default=None, help="folder with datasets or sample packs "
                                                           "(default: $RCONV_DATA, then data/)")
    parser.add_argument("--out", default="reconstruction.png", help="where to save the figure")
    return parser


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


def main(argv=None):
    """python -m rconv_core -d CIFAR100 -i 92 -a ReLU: recover one image and save reconstruction.png."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        case = setup(args.dataset, args.model, [args.index], args.seed, data_root=args.data_root,
                     **_overrides(args))
        grads = client_gradients(case.model, case.images[0], case.labels[0], dtype=as_dtype(args.dtype))
        result = reconstruct(case.model, grads, case.images.shape[1:], first_layer=args.first_layer)
    except RConvError as error:
        parser.exit(2, f"error: {error}\n")
    _print_result(args, case, result)
    plot_reconstruction(case.images[0], result.image, path=args.out,
                        title=f"R-CONV on {case.info['name']} #{args.index} ({args.model}, {args.dtype})")
    print(f"saved {args.out}")
    return 0
