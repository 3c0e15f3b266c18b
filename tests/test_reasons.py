"""Every attack that is not exact says why, in the tables the notebooks store (the reason column)."""
import pandas as pd

import rconv_core as rc


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
