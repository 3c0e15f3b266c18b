"""rconv.cli: the command line (python -m rconv_core) attacks, writes its figure, and answers every user mistake
with one line and exit status 2, never a traceback."""
import os
import subprocess
import sys

import pytest

import rconv_core as rc
from conftest import REPO, corrupt_pack


def cli(capsys, *argv):
    """Run the command line in this process; returns (exit status, stdout, stderr)."""
    try:
        status = rc.main(list(argv))
    except SystemExit as done:
        status = done.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_cli_names_a_corrupt_pack(tmp_path, capsys, offline):
    path = corrupt_pack(tmp_path / "packs")
    status, out, err = cli(capsys, "-d", "cifar10", "-i", "0", "--data-root", str(tmp_path / "packs"),
                           "--out", str(tmp_path / "r.png"))
    assert status == 2 and f"error: sample pack {path} is not a readable .npz" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_cli_checks_out_before_the_attack(capsys):
    status, out, err = cli(capsys, "-d", "samples", "-i", "0", "--out", "/proc/x.png")
    assert status == 2 and "--out /proc/x.png: cannot create files in /proc" in err
    assert out == "", "the attack ran before --out was checked"


def test_cli_never_creates_the_folder_of_out(tmp_path, capsys):
    missing = tmp_path / "nonexistent_dir"
    status, out, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(missing / "x.png"))
    assert status == 2 and f"the folder {missing} does not exist" in err
    assert not missing.exists() and out == ""
    (tmp_path / "file").write_text("")
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(tmp_path / "file" / "x.png"))
    assert status == 2 and "is a file, not a folder" in err
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", "--out", str(tmp_path / "x.unknown"))
    assert status == 2 and "matplotlib cannot write .unknown files" in err


def test_cli_writes_inside_an_existing_folder(tmp_path, capsys):
    folder = tmp_path / "figures"
    folder.mkdir()
    status, out, _ = cli(capsys, "-d", "samples", "-i", "0", "--out", str(folder))
    assert status == 0 and f"saved {folder / 'reconstruction.png'}" in out
    assert (folder / "reconstruction.png").stat().st_size > 0
    assert not folder.with_suffix(".png").exists()


@pytest.mark.parametrize("argv,problem", [(["--dtype", "int8"], "unknown dtype 'int8'"),
                                          (["-i", "-1"], "image indices must be non-negative"),
                                          (["--model", "resnet"], "unknown model 'resnet'"),
                                          (["-d", "imagenet"], "unknown dataset 'imagenet'"),
                                          (["--seed", str(10 ** 30)], "seed must be a whole number")])
def test_cli_user_mistakes_get_one_line(capsys, argv, problem):
    status, _, err = cli(capsys, "-d", "samples", "-i", "0", *argv)
    assert status == 2 and problem in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_prints_no_traceback_for_a_corrupt_pack(tmp_path):
    corrupt_pack(tmp_path / "packs")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RCONV_DATA", None)
    done = subprocess.run([sys.executable, "-m", "rconv_core", "-d", "cifar10", "--data-root", str(tmp_path / "packs"),
                           "--out", str(tmp_path / "r.png")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "sample pack" in done.stderr


def run_cli(*args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "rconv_core", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_command_line_offline(tmp_path, packs):
    done = run_cli("-d", "CIFAR10", "-i", "0", "--dtype", "float64", "--data-root", str(packs), "--out",
                   str(tmp_path / "r.png"), cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "PSNR" in done.stdout and "exact: True" in done.stdout
    assert (tmp_path / "r.png").exists()
    relu = run_cli("-d", "samples", "-i", "2", "-a", "Tanh", "--dtype", "float64", "--out",
                   str(tmp_path / "t.png"), cwd=REPO)
    assert relu.returncode == 0, relu.stderr
    assert "leaky_relu-leaky_relu-tanh-tanh" in relu.stdout


def test_command_line_errors(tmp_path):
    done = run_cli("-d", "ImageNet", cwd=tmp_path)
    assert done.returncode == 2 and "unknown dataset 'ImageNet'" in done.stderr


@pytest.mark.slow
def test_the_command_line_takes_a_batch(tmp_path, capsys, packs):
    args = ["--model", "lenet_batch", "-d", "cifar100", "-i", "0", "--dtype", "float64",
            "--out", str(tmp_path / "b.png"), "--data-root", str(packs)]
    assert rc.main(args + ["--batch", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 image(s) found, 2 exact" in printed and (tmp_path / "b.png").exists()
    with pytest.raises(SystemExit):
        rc.main(args + ["--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err
