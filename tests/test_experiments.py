"""rconv.studies.experiments: the experiment loops (attack_grid, attack_images, filter_sweep): their rows, the
reason every attack that is not exact gives in them, and the settings they refuse before any work."""
import pandas as pd
import pytest
import torch

import rconv_core as rc


@pytest.mark.parametrize("counts", [[0], [4, -1], [], [2.5]])
def test_filter_sweep_refuses_counts_that_are_no_filters(counts):
    with pytest.raises(rc.RConvError, match="counts must be a non-empty list of filter counts"):
        rc.filter_sweep("samples", "lenet", 1, counts, [0], progress=False)


def test_experiment_loops_refuse_bad_settings_before_any_work():
    with pytest.raises(rc.RConvError, match="first_layers must be a non-empty list drawn from weights, gradients, "
                                         r"hybrid; got \['hybird'\]"):
        rc.attack_grid("samples", "lenet", [0], first_layers=["hybird"])
    with pytest.raises(rc.RConvError, match="relu_tests must be"):
        rc.attack_grid("samples", "lenet", [0], relu_tests=["relativ"])
    with pytest.raises(rc.RConvError, match="defences must be"):
        rc.attack_grid("samples", "lenet", [0], defences=[("dp", 1)])
    with pytest.raises(rc.RConvError, match="topk keeps a fraction"):
        rc.attack_grid("samples", "lenet", [0], defences=[("topk", 2)])
    with pytest.raises(rc.RConvError, match="no image indices given"):
        rc.attack_grid("samples", "lenet", [])
    with pytest.raises(rc.RConvError, match="missing \\['defence', 'strength'\\]"):
        rc.breaking_points(pd.DataFrame(dict(psnr=[1.0])))
    with pytest.raises(rc.RConvError, match="as many reconstructions as originals"):
        rc.plot_grid([torch.zeros(1, 4, 4)] * 2, [torch.zeros(1, 4, 4)])


def test_attack_images_table_and_figures(tmp_path, samples):
    table, reconstructions = rc.attack_images("samples", "lenet", [0, 1], dtypes=("float64", "float32"),
                                              progress=False)
    assert len(table) == 4 and set(reconstructions) == {"float64", "float32"}
    assert {"dataset", "model", "dtype", "first_layer", "index", "label", "mse", "psnr", "ssim",
            "max_abs_err", "exact", "seconds"} <= set(table.columns)
    assert (table.psnr > 60).all() and table[table.dtype == "float64"].exact.all()
    # a float32 image is exact only if its error bound certifies 1e-3; otherwise the bound is the reason
    doubtful = table[~table.exact]
    assert doubtful.reason.str.startswith("error bound").all() and (doubtful.max_abs_err <= doubtful.error_bound).all()
    summary = rc.summarize(table)
    assert list(summary.images) == [2, 2] and sorted(summary.exact) == sorted([2, int(table.exact.sum()) - 2])
    csv = tmp_path / "metrics.csv"
    table.to_csv(csv, index=False)
    rc.plot_psnr(csv, path=tmp_path / "psnr.png")
    rc.plot_grid(samples[0][:2], [r.image for r in reconstructions["float32"]], path=tmp_path / "grid.png")
    rc.plot_reconstruction(samples[0][0], reconstructions["float64"][0].image, path=tmp_path / "one.png")
    for name in ("psnr.png", "grid.png", "one.png"):
        assert (tmp_path / name).stat().st_size > 5000


def test_every_not_exact_row_names_the_layer_that_failed(packs):
    # 12 first-layer filters where the gradient constraints alone need 64: never exact, always explained
    table = rc.attack_grid("cifar100", "lenet", [0, 1], dtypes=["float64", "float32"],
                           first_layers=["gradients", "hybrid"], data_root=packs, progress=False)
    failed = table[~table.exact]
    rank = failed[failed.first_layer == "gradients"]
    assert len(rank) == 4 and rank.reason.str.startswith("conv layer 1 (gradients): rank ").all(), failed.reason.tolist()
    # The hybrid solves are determined; a float32 one whose error bound passes 1e-3 says so, and holds.
    bounded = failed[failed.first_layer == "hybrid"]
    assert (bounded.dtype == "float32").all() and bounded.reason.str.startswith("error bound: ").all()
    assert (bounded.max_abs_err <= bounded.error_bound).all()
    assert (table[table.exact].reason == "").all() and (table[table.exact].max_abs_err <= 1e-3).all()


def test_a_csv_keeps_the_reasons(packs, tmp_path):
    table = rc.attack_grid("cifar10", "lenet_c10", [0], first_layers=["gradients"], data_root=packs, progress=False)
    table.to_csv(tmp_path / "metrics.csv", index=False)
    stored = pd.read_csv(tmp_path / "metrics.csv", keep_default_na=False)
    assert not stored.exact.any() and (stored.reason.str.len() > 0).all()
