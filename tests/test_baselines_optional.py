"""rconv.studies.baselines without the optional breaching package: the suite still compares what it can, and says
how to get the rest."""
import importlib.util
import sys

import pytest

import rconv_core as rc


@pytest.fixture
def no_breaching(monkeypatch):
    """An environment where `import breaching` fails, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "breaching", None)


def test_breaching_missing_says_how_to_install_it(no_breaching):
    message = rc.breaching_missing()
    assert "breaching" in message and "pip install -r requirements-baselines.txt" in message
    assert "\n" not in message


def test_breaching_missing_is_empty_where_it_imports():
    assert (rc.breaching_missing() == "") == (importlib.util.find_spec("breaching") is not None)


def test_a_baseline_without_breaching_raises_the_same_sentence(no_breaching, samples):
    model = rc.build_model("lenet", 3, 10)
    image, label = samples[0][0], samples[1][0]
    with pytest.raises(ImportError) as raised:
        rc.run_baseline("dlg", model, rc.client_gradients(model, image, label), image.shape)
    assert str(raised.value) == rc.breaching_missing()


def test_compare_baselines_runs_rconv_alone_without_breaching(no_breaching, packs):
    table, shown = rc.compare_baselines("cifar10", "lenet", [0, 1], methods=[], dtype="float64", data_root=packs,
                                        progress=False)
    assert list(table.method) == ["rconv", "rconv"] and table.exact.all()
    assert set(shown) == {"original", "rconv"}


def test_compare_baselines_refuses_an_unknown_method():
    with pytest.raises(rc.RConvError, match="unknown baseline 'gan'; choose from dlg, idlg, inverting_gradients"):
        rc.compare_baselines("samples", "lenet", [0], methods=["gan"])


def test_the_install_hints_name_the_pinned_version(no_breaching):
    from conftest import REPO
    pin = next(line for line in (REPO / "requirements-baselines.txt").read_text().splitlines()
               if line.startswith("breaching=="))
    assert pin in rc.breaching_missing()
    assert pin in (REPO / "Experiments" / "Baselines.ipynb").read_text()
