"""Every benchmark runs on a fresh offline clone: each script's default path (synthetic data, no ./data, no
network), shrunk to a few steps so that a benchmark that stops working fails here, not in a user's hands."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

# (script, tiny sizes, a line the script prints only when it got to its result)
BENCHMARKS = [
    ("train_throughput.py", ["--model", "resnet8", "--images", "64", "--batch-size", "16", "--steps", "1",
                             "--warmup", "1", "--rounds", "1", "--workers", "0"], "bnprobe / reference"),
    ("telemetry_overhead.py", ["--model", "resnet8", "--batch-size", "16", "--steps", "2", "--rounds", "1"],
     "overhead:"),
    ("ablate_sweep.py", ["--model", "resnet8", "--images", "64", "--thresholds", "0:0.2:2", "--workers", "0"],
     "naive / bnprobe"),
    ("report_speed.py", ["--runs", "2", "--html"], "report of 2 runs"),
]


@pytest.mark.parametrize("script, sizes, result_line", BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs_offline_without_data(tmp_path, script, sizes, result_line):
    # An empty working directory: no ./data, as on a fresh clone (the scripts find the package themselves).
    env = {k: v for k, v in os.environ.items() if k != "BNPROBE_DATA_DIR"}
    env["COLUMNS"] = "200"  # rich would wrap the result table's rows on a narrow pipe
    device = [] if script == "report_speed.py" else ["--device", "cpu"]
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *device, *sizes], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result_line in done.stdout, done.stdout[-3000:]
