"""One writer at a time: a second process is refused with one line naming the holder's pid, and a holder
killed with -9 leaves no stuck lock."""

import subprocess
import sys
import time

import pytest
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.files import checkpoints, runs

TINY = ["--dataset", "digits", "--epochs", "1", "--subset", "200", "--test-subset", "100", "--device", "cpu"]
# A real second process that holds the lock of argv[1] until it is killed.
HOLDER = ("import sys; from pathlib import Path; from bnprobe.files.lock import locked\n"
          "with locked(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); sys.stdin.read()")


def hold(target):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


@pytest.fixture
def run(capsys, tmp_path):
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", tmp_path / "runs", "--name", "r")[0] == 0
    return tmp_path / "runs" / "r"


def test_two_trainings_of_one_run_at_once(capsys, tmp_path):
    """The second training is refused before it reads or changes anything: no run mixed from two."""
    argv = ["train", "resnet8", "--dataset", "digits", "--subset", "200", "--test-subset", "100", "--device", "cpu",
            "--runs-dir", tmp_path, "--name", "r"]
    first = subprocess.Popen([sys.executable, "-m", "bnprobe", *map(str, argv), "--epochs", "100"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not runs.checkpoint_path(tmp_path / "r").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    code, _, err = run_cli(capsys, *argv, "--epochs", "3", "--lr", "0.05", "--overwrite")
    still_running = first.poll() is None
    first.kill()
    first.wait()
    assert still_running, first.stderr.read()
    assert_one_line_error(code, err, f"run directory {tmp_path / 'r'} is being written by process {first.pid}")
    assert runs.read_config(tmp_path / "r").lr == 0.1
    assert checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "r"))["config"]["epochs"] == 100


def test_a_killed_holder_leaves_no_stuck_lock(capsys, run):
    holder = hold(run)
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", run.parent, "--name", "r", "--overwrite",
                           "--lr", "0.05")
    assert_one_line_error(code, err, f"is being written by process {holder.pid}")
    holder.kill()
    holder.wait()
    assert (run.parent / ".r.lock").exists()  # left by kill -9, and no longer held
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", run.parent, "--name", "r", "--overwrite",
                   "--lr", "0.05")[0] == 0
    assert runs.read_config(run).lr == 0.05
    assert sorted(p.name for p in run.parent.iterdir()) == ["r"]  # the lock file goes with its holder


@pytest.mark.parametrize("command", ["probe", "ablate", "report"])
def test_an_output_file_has_one_writer(capsys, run, command):
    out = run.parent / ("report.html" if command == "report" else "result.h5")
    argv = {"probe": ["probe", run, "--images", "50", "--out", out],
            "ablate": ["ablate", run, "--clamp-gamma", "0.1", "--test-subset", "50", "--no-train", "--out", out],
            "report": ["report", run, "-o", out, "--jobs", "1"]}[command]
    holder = hold(out)
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"{out} is being written by process {holder.pid}")
    assert not out.exists()
    holder.kill()
    holder.wait()
    assert run_cli(capsys, *argv)[0] == 0 and out.exists()
    assert not list(run.parent.glob(".*.lock"))
