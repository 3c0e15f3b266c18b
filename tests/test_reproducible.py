"""Stored results are reproducible: two notebooks regenerated in a fresh copy of the repository, once
serially and once with --jobs 2, give the committed tables back (the same exact and reason columns,
PSNR within 0.1 dB), and agree with each other whatever the environment."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO
from rconv.common.environment import current_environment, environment_differences

# Cheap full-size notebooks (about 0.1 s per attack), one of each kind the template renders.
NOTEBOOKS = {"Test_on_MNIST": "testing/mnist", "LeNet_4_ReLU": "various_settings/LeNet_4_ReLU"}
PSNR_DB = 0.1  # how far a regenerated PSNR may stray: the printed precision of results/README.md
EXACT_COLUMNS = ["dataset", "model", "dtype", "index", "exact", "reason"]
REGENERATE_SECONDS = 900


def fresh_copy(target):
    """The repository's tracked files (as a clone of the working tree would hold them) in `target`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source, destination = REPO / name, target / name
        if source.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(source.read_bytes())
    return target


def regenerate(copy, packs, jobs):
    argv = [sys.executable, "run_all.py", "--jobs", str(jobs), "--data-root", str(packs.resolve())]
    for name in NOTEBOOKS:
        argv += ["--only", name]
    done = subprocess.run(argv, cwd=copy, capture_output=True, text=True, timeout=REGENERATE_SECONDS,
                          env={key: value for key, value in os.environ.items() if not key.endswith("_NUM_THREADS")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return {name: pd.read_csv(copy / "results" / folder / "metrics.csv") for name, folder in NOTEBOOKS.items()}


def assert_same(ours, theirs, what):
    assert list(ours.columns) == list(theirs.columns), what
    pd.testing.assert_frame_equal(ours[EXACT_COLUMNS].fillna(""), theirs[EXACT_COLUMNS].fillna(""), obj=what)
    drift = (ours.psnr - theirs.psnr).abs()
    assert (drift <= PSNR_DB).all(), f"{what}: PSNR moved by up to {drift.max():.3g} dB"


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory, packs):
    """The two notebooks' tables from a serial run and from a --jobs 2 run, each in its own fresh copy."""
    return {jobs: regenerate(fresh_copy(tmp_path_factory.mktemp(f"jobs{jobs}")), packs, jobs) for jobs in (1, 2)}


@pytest.mark.slow
@pytest.mark.notebooks
def test_jobs_do_not_change_the_tables(regenerated):
    for name in NOTEBOOKS:
        assert_same(regenerated[2][name], regenerated[1][name], f"{name}: --jobs 2 against a serial run")


@pytest.mark.slow
@pytest.mark.notebooks
def test_a_fresh_run_gives_the_committed_tables_back(regenerated):
    stored = json.loads((REPO / "results" / "environment.json").read_text())
    for name, folder in NOTEBOOKS.items():
        differences = environment_differences(stored[name], current_environment())
        if differences:
            pytest.skip(f"{name}'s results were made in another environment ({'; '.join(differences)}): regenerate "
                        f"them with `make run` in the pinned environment to compare")
        committed = pd.read_csv(REPO / "results" / folder / "metrics.csv")
        for jobs, tables in regenerated.items():
            assert_same(tables[name], committed, f"{name} (--jobs {jobs}) against the committed table")
