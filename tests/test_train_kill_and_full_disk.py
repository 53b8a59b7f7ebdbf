"""kill -9 in the middle of training, then --resume: the result equals an uninterrupted run."""

import errno
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.core.config import TrainConfig
from bnprobe.files import checkpoints, runs
from bnprobe.training.train import train

ARGS = dict(model="resnet8", dataset="digits", epochs=3, subset=600, test_subset=200, batch_size=50,
            milestones="2", device="cpu")
TINY = ["--dataset", "digits", "--epochs", "1", "--subset", "200", "--test-subset", "100", "--device", "cpu"]


def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path):
    straight = train(TrainConfig(**ARGS), tmp_path / "straight")

    run_dir = tmp_path / "killed"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items() if k != "model"]
    process = subprocess.Popen([sys.executable, "-m", "bnprobe", "train", "resnet8", *flags, "--name", "killed",
                                "--runs-dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if runs.checkpoint_path(run_dir).exists():
            time.sleep(0.1)  # into epoch 2, mid-step
            break
        time.sleep(0.02)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = checkpoints.load_checkpoint(runs.checkpoint_path(run_dir))["epoch"]
    assert 1 <= killed_at < ARGS["epochs"]

    resumed = train(TrainConfig(**ARGS), run_dir, resume=True)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in timing} for r in straight]
    a = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "straight"))["model"]
    b = checkpoints.load_checkpoint(runs.checkpoint_path(run_dir))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with h5py.File(tmp_path / "straight" / "telemetry.h5") as f, h5py.File(run_dir / "telemetry.h5") as g:
        assert np.array_equal(f["steps/grad_abs_mean"][:], g["steps/grad_abs_mean"][:])
        assert np.array_equal(f["epochs/test_loss"][:], g["epochs/test_loss"][:])
    assert not list(run_dir.glob(".*.tmp"))  # leftovers of the killed writes are cleaned on resume


# ---- a full disk: one line naming it, the previous file intact, no temporary file left -----------------------


class FullDisk:
    """bnprobe.files.atomic's `open` on a disk that fills up once `full` is set: writes raise ENOSPC, as the OS does."""

    def __init__(self, monkeypatch, full=False):
        self.full = full
        monkeypatch.setattr("bnprobe.files.atomic.open", self.open, raising=False)

    def open(self, path, mode="r", **kwargs):
        file = open(path, mode, **kwargs)
        if self.full:
            def write(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            file.write = write
        return file


def test_a_full_disk_during_training_keeps_the_last_checkpoint(capsys, tmp_path, monkeypatch):
    import bnprobe.training.train

    disk = FullDisk(monkeypatch)
    epochs = []

    def one_epoch(*args, **kwargs):
        epochs.append(1)
        disk.full = len(epochs) == 2  # the disk fills during the second epoch
        return train_one_epoch(*args, **kwargs)

    train_one_epoch = bnprobe.training.train.train_one_epoch
    monkeypatch.setattr(bnprobe.training.train, "train_one_epoch", one_epoch)
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--epochs", "3", "--runs-dir", tmp_path, "--name", "r")
    assert_one_line_error(code, err, "no space left on device")
    assert checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "r"))["epoch"] == 1
    assert not list(tmp_path.glob("**/.*.tmp")) and not list(tmp_path.glob(".*.lock"))


def test_a_full_disk_during_a_checkpoint_takes_the_epochs_telemetry_back(capsys, tmp_path, monkeypatch):
    # issue 21 (16): telemetry.h5 kept epoch 2, which checkpoint.pt did not, and inspect said "After 2 of 3 epochs"
    disk = FullDisk(monkeypatch)
    save = runs.save_checkpoint

    def save_checkpoint(path, state):
        disk.full = state["epoch"] == 2  # the disk fills while epoch 2's checkpoint is written
        try:
            save(path, state)
        finally:
            disk.full = False  # the failed temporary file is removed: its space is free again

    monkeypatch.setattr(runs, "save_checkpoint", save_checkpoint)
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--epochs", "3", "--runs-dir", tmp_path, "--name", "r")
    assert_one_line_error(code, err, "no space left on device")
    assert checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "r"))["epoch"] == 1
    with h5py.File(tmp_path / "r" / "telemetry.h5") as f:
        assert f["epochs/epoch"][:].tolist() == [1] and f["bn/epoch"][:].tolist() == [0, 1]
        assert set(f["steps/epoch"][:].tolist()) == {1}
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "r")
    assert code == 0 and "After 1 of 3 epochs" in out


@pytest.mark.parametrize("command", ["probe", "ablate", "report"])
def test_a_full_disk_keeps_the_previous_result(capsys, tmp_path, monkeypatch, command):
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r")[0] == 0
    out = tmp_path / ("report.html" if command == "report" else "result.h5")
    argv = {"probe": ["probe", run, "--images", "50", "--out", out],
            "ablate": ["ablate", run, "--clamp-gamma", "0.1", "--test-subset", "50", "--no-train", "--out", out],
            "report": ["report", run, "-o", out, "--jobs", "1"]}[command]
    assert run_cli(capsys, *argv)[0] == 0
    before = out.read_bytes()
    FullDisk(monkeypatch, full=True)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"cannot write {out}: no space left on device")
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("**/.*.tmp")) and not list(tmp_path.glob(".*.lock"))


KILL_MID_COMMIT = """
import os, sys
from pathlib import Path
from bnprobe.core.config import TrainConfig
from bnprobe.training.train import train

run_dir = Path(sys.argv[1])
real = os.pwrite

def pwrite(fd, data, offset):  # the first in-place write of a later epoch's telemetry: half of it, then kill -9
    if (run_dir / "telemetry.h5.journal").exists() and (run_dir / "checkpoint.pt").exists():
        real(fd, bytes(data)[:len(data) // 2], offset)
        os._exit(137)
    return real(fd, data, offset)

os.pwrite = pwrite
train(TrainConfig(**{args}), run_dir)
"""


def test_a_kill_mid_telemetry_commit_is_read_whole_and_resumed_exactly(tmp_path):
    args = dict(ARGS, epochs=2, subset=100, test_subset=50)
    straight = train(TrainConfig(**args), tmp_path / "straight")
    run_dir = tmp_path / "killed"
    done = subprocess.run([sys.executable, "-c", KILL_MID_COMMIT.replace("{args}", repr(args)), str(run_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, done.stderr
    assert (run_dir / "telemetry.h5.journal").exists()  # killed while the file is half updated
    assert runs.foreign_files(run_dir) == []  # the journal is bnprobe's: --overwrite may remove it
    from bnprobe.files.schema import check_telemetry, open_h5

    with open_h5(run_dir / "telemetry.h5") as f:  # a reader sees the file through the journal: 2 whole epochs
        assert check_telemetry(f).epochs == 2 and f["bn/epoch"][:].tolist() == [0, 1, 2]
    assert checkpoints.load_checkpoint(runs.checkpoint_path(run_dir))["epoch"] == 1

    train(TrainConfig(**args), run_dir, resume=True)  # completes the commit, trims epoch 2, trains it again
    assert not (run_dir / "telemetry.h5.journal").exists()
    with h5py.File(tmp_path / "straight" / "telemetry.h5") as f, h5py.File(run_dir / "telemetry.h5") as g:
        for name in ("steps/grad_abs_mean", "steps/step", "epochs/test_loss", "bn/epoch", "bn/layer1.0.bn1/gamma"):
            assert np.array_equal(f[name][:], g[name][:]), name
    assert len(straight) == 2
