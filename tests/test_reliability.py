"""kill -9 in the middle of training, then --resume: the result equals an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import torch

from bnprobe import runs
from bnprobe.config import TrainConfig
from bnprobe.train import train

ARGS = dict(model="resnet8", dataset="digits", epochs=3, subset=600, test_subset=200, batch_size=50,
            milestones="2", device="cpu")


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
    killed_at = runs.load_checkpoint(runs.checkpoint_path(run_dir))["epoch"]
    assert 1 <= killed_at < ARGS["epochs"]

    resumed = train(TrainConfig(**ARGS), run_dir, resume=True)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
           [{k: v for k, v in r.items() if k not in timing} for r in straight]
    a = runs.load_checkpoint(runs.checkpoint_path(tmp_path / "straight"))["model"]
    b = runs.load_checkpoint(runs.checkpoint_path(run_dir))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with h5py.File(tmp_path / "straight" / "telemetry.h5") as f, h5py.File(run_dir / "telemetry.h5") as g:
        assert np.array_equal(f["steps/grad_abs_mean"][:], g["steps/grad_abs_mean"][:])
        assert np.array_equal(f["epochs/test_loss"][:], g["epochs/test_loss"][:])
    assert not list(run_dir.glob(".*.tmp"))  # leftovers of the killed writes are cleaned on resume
