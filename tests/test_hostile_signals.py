"""TERM during any command (issue 30, item 12): the same "interrupted; every file written so far is complete"
line and exit 130 as `report` and Ctrl-C, never a silent 143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["probe", "ablate"])
def test_term_during_a_command_is_the_interrupted_line_and_exit_130(tmp_path, command):
    # A static probe exited 143 with no message under TERM.
    torch.save({"fc.weight": torch.zeros(10, 64)}, tmp_path / "foreign.pt")
    (tmp_path / "slow.py").write_text(
        "import pathlib, time\n"
        f"def make():\n    pathlib.Path({str(tmp_path / 'started')!r}).touch()\n    time.sleep(60)\n")
    extra = ["--clamp-gamma", "0.1"] if command == "ablate" else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "bnprobe", command, str(tmp_path / "foreign.pt"), "--model",
                              f"{tmp_path}/slow.py:make", "--dataset", "digits", "--out", str(tmp_path / "out.h5"),
                              *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert err.strip().splitlines() == [
        "bnprobe: interrupted; every file written so far is complete (a training run continues with --resume)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.pt", "slow.py", "started"]
