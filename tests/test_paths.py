"""rconv.common.paths: relative paths point into the checkout whatever the working directory (Jupyter runs a
notebook from its folder)."""
from pathlib import Path

import rconv.common.paths
import rconv_core as rc
from conftest import REPO
from rconv.cases.data import data_place


def test_a_relative_path_is_read_from_the_repository_root_whatever_the_working_directory(tmp_path, monkeypatch):
    for folder in (tmp_path, REPO / "Various_settings", REPO):
        monkeypatch.chdir(folder)
        assert rc.resolve_path("results/various_settings/LeNet") == REPO / "results/various_settings/LeNet"


def test_an_absolute_path_is_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO / "Testing")
    assert rc.resolve_path(tmp_path / "out") == tmp_path / "out"
    assert rc.resolve_path(str(tmp_path)) == tmp_path


def test_an_installed_suite_reads_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    site_packages = tmp_path / "site-packages"  # an installed suite: the package without the checkout around it
    site_packages.mkdir()
    monkeypatch.setattr(rconv.common.paths, "_PACKAGE_PARENT", site_packages)
    monkeypatch.chdir(tmp_path)
    assert rconv.common.paths.repository_root() is None
    assert rc.resolve_path("results/x") == tmp_path / "results/x"


def test_the_checkout_is_found():
    assert rconv.common.paths.repository_root() == REPO


def test_a_relative_data_root_is_read_from_the_repository_root(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"  # a checkout with its data folder, opened from a notebook's folder
    (checkout / "Testing").mkdir(parents=True)
    (checkout / "run_all.py").touch()
    (checkout / "packs").mkdir()
    monkeypatch.setattr(rconv.common.paths, "_PACKAGE_PARENT", checkout)
    monkeypatch.chdir(checkout / "Testing")
    assert data_place("packs") == checkout / "packs"
    (checkout / "Testing" / "mine").mkdir()
    assert data_place("mine") == Path("mine"), "a folder only the working directory holds is still found"
