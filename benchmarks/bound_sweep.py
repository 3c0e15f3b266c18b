"""How tight and how safe the error bound is: python benchmarks/bound_sweep.py.

Attacks every Testing and Various_settings preset on the first images of its dataset, from float64
and float32 gradients, clean and under the defences a careful user tries (Gaussian noise, top-k,
quantisation), and compares each attack's true max error with its error bound. `exact` may only be
claimed where error <= bound <= the dtype's limit; the bound is useful where it is close to the error.

Writes results/bound_sweep.csv (or --out), one row per attack, and prints:
  claims            attacks claimed exact
  worst             the largest error / bound over the claims (must stay below 1)
  tight             the share of claims whose error is at least a tenth of their bound
  certified         float32 clean images with a true error <= 5e-4 that are claimed exact
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (preset, dataset): the Testing notebooks' networks and the Various_settings presets, each on its data.
PRESETS = [("lenet", "mnist"), ("lenet_c10", "cifar10"), ("lenet", "cifar100"), ("lenet_o", "cifar100"),
           ("o_cnn6", "cifar10"), ("lenet_4_relu", "cifar100"), ("lenet_all_relu", "cifar100"),
           ("dlg_net", "cifar10")]
# From barely there to ruinous (strengths as in rc.defend).
DEFENCES = [("none", 0)] + [("gaussian", s) for s in (1e-8, 1e-7, 3e-7, 1e-6, 1e-5, 1e-4, 1e-3)] + \
           [("topk", 0.999), ("topk", 0.9), ("quantize", 24), ("quantize", 16), ("quantize", 12)]
LIMITS = {"float64": 1e-6, "float32": 1e-3}  # what exact allows (rconv.attack.tolerances)
CERTIFIABLE = 5e-4  # float32 images this close to the truth should be certified
TIGHT = 0.1  # error / bound at least this is a tight claim


def sweep(images, data_root):
    """One row per attack: preset, dataset, image, dtype, defence, strength, max_abs_err, error_bound, exact."""
    import pandas as pd
    import torch

    import rconv_core as rc
    rows = []
    for preset, dataset in PRESETS:
        pictures, labels, model, _ = rc.setup(dataset, preset, range(images), data_root=data_root)
        cache = {}
        for index, (image, label) in enumerate(zip(pictures, labels)):
            for dtype in LIMITS:
                grads = rc.client_gradients(model, image, int(label), dtype=rc.as_dtype(dtype))
                for seed, (defence, strength) in enumerate(DEFENCES):
                    shared = rc.defend(grads, defence, strength, seed=seed)
                    try:
                        result = rc.reconstruct(model, shared, tuple(image.shape), check_batch=False, cache=cache)
                    except rc.RConvError:  # top-k can zero a whole bias gradient: refused, never claimed
                        continue
                    error = float((result.image[0] - image.to(torch.float64)).abs().max())
                    rows.append(dict(preset=preset, dataset=dataset, image=index, dtype=dtype, defence=defence,
                                     strength=strength, max_abs_err=error, error_bound=result.error_bound,
                                     exact=result.exact, seconds=result.seconds,
                                     bound_seconds=result.bound_seconds))
    return pd.DataFrame(rows)


def summary(table):
    """The sweep's headline numbers, as a dict."""
    claims = table[table.exact]
    ratio = claims.max_abs_err / claims.error_bound
    clean = table[(table.dtype == "float32") & (table.defence == "none") & (table.max_abs_err <= CERTIFIABLE)]
    return dict(attacks=len(table), claims=len(claims), worst=float(ratio.max()), tight=float((ratio >= TIGHT).mean()),
                median=float(ratio.median()), certified=int(clean.exact.sum()), certifiable=len(clean),
                beyond_limit=int((claims.max_abs_err > claims.dtype.map(LIMITS)).sum()),
                bound_share=float(table.bound_seconds.sum() / table.seconds.sum()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3, help="images per preset (default 3)")
    parser.add_argument("--data-root", help="folder with datasets or sample packs (default: $RCONV_DATA)")
    parser.add_argument("--out", default=str(ROOT / "results" / "bound_sweep.csv"), help="CSV to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = sweep(args.images, args.data_root)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    found = summary(table)
    print(f"{found['attacks']} attacks in {time.perf_counter() - start:.0f} s, {found['claims']} claimed exact; "
          f"error / bound: worst {found['worst']:.2f}, median {found['median']:.2f}, at least {TIGHT} on "
          f"{100 * found['tight']:.0f} % of claims; {found['beyond_limit']} claims beyond the limit")
    print(f"float32 clean images within {CERTIFIABLE:g} of the truth certified: {found['certified']} of "
          f"{found['certifiable']}; the bound took {100 * found['bound_share']:.1f} % of the attacks' time")
    print(f"wrote {args.out}")
    return 0 if found["worst"] <= 1.0 and found["beyond_limit"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
