"""rconv.studies.baselines: the optimisation baselines through breaching (skipped, with the reason, where it is not
installed)."""
import pytest
import torch

import rconv_core as rc

breaching = pytest.importorskip("breaching", reason="optional: pip install -r requirements-baselines.txt")
pytestmark = pytest.mark.baselines


@pytest.fixture(scope="module")
def setting(samples):
    model = rc.build_model("dlg_net", 3, 10)
    image, label = samples[0][2], samples[1][2]
    return model, image, label, rc.client_gradients(model, image, label)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow if name in ("dlg", "idlg") else ())
                                  for name in rc.BASELINES])  # DLG and iDLG: 10 s each on two cores
def test_baseline_returns_a_reconstruction(name, setting):
    model, image, label, grads = setting
    result = rc.run_baseline(name, model, grads, image.shape, iterations=3, seed=1)
    assert isinstance(result, rc.Reconstruction) and result.method == name
    assert result.image.shape == (1, 3, 32, 32) and torch.isfinite(result.image).all()
    assert result.seconds > 0 and not result.exact
    assert result.iterations == 3
    again = rc.run_baseline(name, model, grads, image.shape, iterations=3, seed=1)
    torch.testing.assert_close(result.image, again.image)  # seeded


def test_idlg_reads_the_label_off_the_gradients(setting):
    model, image, label, grads = setting
    result = rc.run_baseline("idlg", model, grads, image.shape, iterations=1)
    assert f"label found: {int(label)}" in result.notes


def test_unknown_baseline(setting):
    model, image, _, grads = setting
    with pytest.raises(rc.RConvError, match="unknown baseline 'gan'; choose one of dlg, idlg, inverting_gradients"):
        rc.run_baseline("gan", model, grads, image.shape)


def test_compare_baselines_on_the_same_gradients(packs):
    table, shown = rc.compare_baselines("cifar10", "lenet", [0], iterations={"dlg": 2, "idlg": 2,
                                                                            "inverting_gradients": 5},
                                        data_root=packs, progress=False)
    assert list(table.method) == ["rconv", "dlg", "idlg", "inverting_gradients"]
    assert {"dataset", "model", "method", "index", "psnr", "ssim", "seconds"} <= set(table.columns)
    rconv = table[table.method == "rconv"].iloc[0]
    assert rconv.exact and rconv.psnr > 60
    assert set(shown) == {"original", "rconv", "dlg", "idlg", "inverting_gradients"}
