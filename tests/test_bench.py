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
    ("check_speed.py", ["--cases", "small", "--files", "6", "--rounds", "1"], "check small: 6 checkpoint(s)"),
    ("gpu_speed.py", ["--models", "resnet8", "--batch-size", "16", "--steps", "1", "--epochs", "2", "--packed", "2",
                      "--pack-model", "resnet8", "--pack-steps", "1", "--pack-epochs", "2"], "(b) resnet8 BN-only runs at once"),
]


@pytest.mark.parametrize("script, sizes, result_line", BENCHMARKS, ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs_offline_without_data(tmp_path, script, sizes, result_line):
    # An empty working directory: no ./data, as on a fresh clone (the scripts find the package themselves).
    env = {k: v for k, v in os.environ.items() if k != "BNPROBE_DATA_DIR"}
    env["COLUMNS"] = "200"  # rich would wrap the result table's rows on a narrow pipe
    device = [] if script in ("report_speed.py", "check_speed.py") else ["--device", "cpu"]
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *device, *sizes], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert result_line in done.stdout, done.stdout[-3000:]


def test_gpu_speed_reports_graphed_against_eager_rows(tmp_path, monkeypatch, capsys):
    """The graphed half of bench/gpu_speed.py runs on CUDA only: here both settings are timed on the CPU (graphs
    fall back to eager there), so that its columns, ratios and targets are exercised before a GPU sees them."""
    import importlib
    import json

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setenv("COLUMNS", "250")
    gpu_speed = importlib.import_module("gpu_speed")
    monkeypatch.setattr(gpu_speed, "graph_modes", lambda cuda: [False, True])
    result = gpu_speed.main(["--device", "cpu", "--models", "resnet20,resnet110", "--batch-size", "8", "--steps", "1",
                             "--epochs", "2", "--packed", "", "--json", str(tmp_path / "speed.json")])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert [(r["model"], r["freeze"]) for r in result["rows"]] == [
        ("resnet20", "non-bn"), ("resnet20", "none"), ("resnet110", "non-bn"), ("resnet110", "none")]
    assert {r["precision"] for r in result["rows"]} == {"fp32"}  # bf16 autocast is timed on CUDA by default
    for row in result["rows"]:
        for mode in ("eager", "graphed"):  # the rate of the one epoch after the warm-up epoch
            assert len(row[mode]["epochs"]) == 2 and row[mode]["images_per_s"] == row[mode]["epochs"][1]
        ratio = row["graphed"]["images_per_s"] / row["eager"]["images_per_s"]
        assert row["graphed_over_eager"] == ratio and f"{ratio:.2f}x" in out
    assert ">= 50,000 img/s graphed: not met" in out and ">= 3x: " in out
    assert "(b)" not in out  # --packed '' skips the packed runs
