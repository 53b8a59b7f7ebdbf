"""The GPU study (issue 35): its plan expands to the intended grid in the intended order, `sweep --time-budget`
stops cleanly between runs, and bench/gpu_study.sh runs end to end on the CPU in its tiny mode."""

import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, run_cli
from rich.console import Console

from bnprobe.sweep import budget as budget_module
from bnprobe.sweep.budget import NOT_STARTED, TimeBudget, fitting_prefix
from bnprobe.sweep.launch import run_sweep
from bnprobe.sweep.plan import read_plan

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = ["resnet14", "resnet32", "resnet56", "resnet110"]


def test_gpu_study_plan_is_frankles_schedule_in_prefix_order(tmp_path):
    """examples/gpu-study.toml: BN-only and full at four depths, three seeds, Frankle's schedule on the 10,000
    training images and all 10,000 test images, graphed on CUDA, a clamp sweep per run; seed 0 of everything
    first, BN-only's depth series before full training's, so that a sweep cut short is a prefix of whole
    comparisons."""
    from bnprobe.analysis.findings import CLAMP_TAUS

    planned = read_plan(ROOT / "examples" / "gpu-study.toml", tmp_path)
    order = [(p.config.seed, p.config.freeze, p.config.model) for p in planned]
    assert order == [(seed, freeze, model) for seed in (0, 1, 2) for freeze in ("non-bn", "none") for model in DEPTHS]
    for p in planned:
        c = p.config
        assert (c.dataset, c.subset, c.test_subset, c.train_eval_subset) == ("cifar10", 10_000, 0, 2_000)
        assert (c.epochs, c.milestone_epochs, c.lr, c.lr_drop, c.batch_size) == (160, (80, 120), 0.1, 0.1, 128)
        assert (c.momentum, c.weight_decay, c.flip, c.translate, c.normalize) == (0.9, 1e-4, True, 4, "per-pixel")
        assert (c.gamma_init, c.shortcut, c.bn, c.norm) == ("uniform", "B", "full", "batch")
        assert (c.device, c.graphs, c.amp, c.compile, c.verify, c.download) == ("cuda", True, False, False, False,
                                                                                False)
        assert c.telemetry_every > 0  # the γ/β gradient ratio over the whole schedule
        assert p.ablation.mode == "threshold" and set(CLAMP_TAUS) <= set(p.ablation.values)
        assert p.ablation.test_subset == 0  # all 10,000 test images, as training evaluates
    assert len({p.run_dir for p in planned}) == 24


def test_the_budget_learns_what_runs_take(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(budget_module.time, "monotonic", lambda: now[0])
    budget = TimeBudget(60.0, started=100.0, prior=2.0)
    assert budget.left() == 60 and budget.expected(10) == 20 and budget.fits(30) and not budget.fits(31)
    now[0] += 30  # a run estimated at 10 s took 30 s: later estimates are tripled
    budget.finished(10.0, 30.0)
    assert budget.left() == 30 and budget.ratio() == 3 and budget.fits(10) and not budget.fits(10.1)
    budget.finished(0.0, 5.0)  # only a clamp sweep was left: no estimate, nothing learnt
    assert budget.ratio() == 3
    now[0] += 31
    assert not budget.fits(0.0)  # past the budget nothing starts, not even an ablation
    assert fitting_prefix([10, 20, 30], 30) == 2 and fitting_prefix([10, 20], 30) == 2 and fitting_prefix([], 1) == 0
    assert fitting_prefix([40], 30) == 0


PLAN = """
[defaults]
dataset = "digits"
epochs = 1
subset = 150
test_subset = 60
train_eval_subset = 60
device = "cpu"
milestones = ""

[[grid]]
model = "resnet8"
freeze = ["none", "non-bn", "all-but-output"]
"""


def test_a_budget_stops_between_runs_once_finished_runs_show_the_next_will_not_fit(tmp_path):
    """The first run starts (its estimate fits); it takes far longer than estimated, so the second, estimated a
    million times longer, is now expected to take days and is not started, nor anything after it (a sweep cut
    short is a prefix of its plan, even where a later run would fit); a later sweep trains what was left."""
    (tmp_path / "plan.toml").write_text(PLAN)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    quiet = Console(file=open(Path(tmp_path / "log"), "w"))
    estimates = {p.run_dir: e for p, e in zip(planned, (1e-6, 1.0, 1e-6))}
    outcome = run_sweep(planned, quiet, budget=TimeBudget(3600.0), estimates=estimates)
    names = [p.run_dir.name for p in planned]
    assert [outcome[n] for n in names] == ["done", NOT_STARTED, NOT_STARTED]
    assert [p.status() for p in planned] == ["done", "new", "new"]
    outcome = run_sweep(planned, quiet)  # no budget: the rest
    assert [outcome[n] for n in names] == ["done"] * 3


def test_a_budget_stops_worker_processes_between_runs_too(tmp_path):
    """The same with worker processes (--per-device 2): the two runs that fit the budget start side by side; the
    third, estimated at a million times the budget, is not started, and the sweep returns at once after them."""
    (tmp_path / "plan.toml").write_text(PLAN)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    quiet = Console(file=open(Path(tmp_path / "log"), "w"))
    estimates = {p.run_dir: e for p, e in zip(planned, (1e-6, 1e-6, 3.6e9))}
    outcome = run_sweep(planned, quiet, per_device=2, budget=TimeBudget(3600.0), estimates=estimates)
    assert [outcome[p.run_dir.name] for p in planned] == ["done", "done", NOT_STARTED]
    assert [p.status() for p in planned] == ["done", "done", "new"]


def test_time_budget_through_the_cli(tmp_path, capsys):
    (tmp_path / "plan.toml").write_text(PLAN)
    argv = ["sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs"]
    code, out, err = run_cli(capsys, *argv, "--time-budget", "1e-9")  # spent before the first run
    assert code == 0, err
    text = " ".join(out.split())
    assert "the first 0 of the 3 runs to do fit" in text
    assert "stopped by --time-budget: 0 of 3 runs done or tried, 3 not started" in text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    code, out, err = run_cli(capsys, *argv, "--time-budget", "1e6", "--dry-run", "--tflops", "1e-3")
    assert code == 0 and "the first 3 of the 3 runs to do fit" in " ".join(out.split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--time-budget", "0"], "--time-budget must be > 0 seconds"),
    (["--time-budget", "-5"], "--time-budget must be > 0 seconds"),
    (["--time-budget", "nan"], "--time-budget must be > 0 seconds"),
    (["--time-budget", "inf"], "--time-budget must be > 0 seconds"),
    (["--time-budget", "60", "--launcher", "slurm"], "--time-budget is for --launcher local"),
])
def test_bad_time_budget_is_a_one_line_error(tmp_path, capsys, argv, message):
    (tmp_path / "plan.toml").write_text(PLAN)
    code, _, err = run_cli(capsys, "sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs", *argv)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "runs").exists()


def test_tiny_plan_keeps_the_plans_settings_and_order_cut_down(tmp_path):
    """bench/tiny_plan.py (the CPU rehearsal's plan): the real plan's settings and order, 1 epoch of 256 images on
    the CPU, seed 0 and the first two depths."""
    import subprocess
    import sys

    out = tmp_path / "tiny.toml"
    subprocess.run([sys.executable, str(ROOT / "bench" / "tiny_plan.py"), str(ROOT / "examples" / "gpu-study.toml"),
                    str(out)], check=True)
    tiny, real = read_plan(out, tmp_path), read_plan(ROOT / "examples" / "gpu-study.toml", tmp_path)
    assert [(p.config.freeze, p.config.model) for p in tiny] == [(f, m) for f in ("non-bn", "none") for m in DEPTHS[:2]]
    shrunk = {"epochs", "milestones", "subset", "test_subset", "train_eval_subset", "device"}
    for t in tiny:
        r = next(r for r in real if (r.config.freeze, r.config.model, r.config.seed) == (t.config.freeze,
                                                                                         t.config.model, 0))
        assert (t.config.epochs, t.config.subset, t.config.device) == (1, 256, "cpu")
        assert {k: v for k, v in t.config.to_dict().items() if k not in shrunk} == \
            {k: v for k, v in r.config.to_dict().items() if k not in shrunk}
        assert t.ablation.values == r.ablation.values


def test_gpu_study_script_unpacks_the_data_and_packs_runs_without_checkpoints(tmp_path):
    """bench/gpu_study.sh's data and pack stages (its sweep is rehearsed by `make gpu-study-tiny`, minutes on two
    cores): the carried archive is unpacked where BNPROBE_DATA_DIR says; every run's files but its checkpoint go
    into one archive under $OUT, next to each stage's log."""
    import os
    import subprocess
    import tarfile

    source = tmp_path / "src" / "cifar-10-batches-py"
    source.mkdir(parents=True)
    for name in ("batches.meta", "data_batch_1", "test_batch"):
        (source / name).write_bytes(name.encode() * 100)
    with tarfile.open(tmp_path / "cifar.tar.xz", "w:xz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
    runs_dir = tmp_path / "runs"
    for run in ("a", "b"):
        for name in ("config.json", "metrics.json", "telemetry.h5", "ablation.h5", "checkpoint.pt"):
            (runs_dir / run).mkdir(parents=True, exist_ok=True)
            (runs_dir / run / name).write_text(f"{run}/{name}")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_STUDY_STAGES": "data pack",
           "GPU_STUDY_RUNS": str(runs_dir), "GPU_STUDY_ARCHIVE": str(tmp_path / "cifar.tar.xz"),
           "BNPROBE_DATA_DIR": str(tmp_path / "data"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_study.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("batches.meta", "data_batch_1", "test_batch"):
        assert (tmp_path / "data" / "cifar-10-batches-py" / name).read_bytes() == (source / name).read_bytes()
    with tarfile.open(tmp_path / "out" / "gpu-study-runs.tar.gz") as tar:
        members = sorted(m.name.removeprefix("./") for m in tar.getmembers() if m.isfile())
        assert tar.extractfile("./a/metrics.json").read() == b"a/metrics.json"
    assert members == [f"{run}/{name}" for run in ("a", "b")
                       for name in ("ablation.h5", "config.json", "metrics.json", "telemetry.h5")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-study-runs.tar.gz", "pack.txt", "setup.txt"]
    assert "== setup exit 0" in done.stdout and "== pack exit 0" in done.stdout


def test_runs_brought_back_without_checkpoints_are_reported_as_with_them(tmp_path, capsys):
    """What bench/gpu_study.sh packs (every run file but checkpoint.pt) is what the report and findings read: a
    finished run copied without its checkpoint is reported with a note, its numbers and γ the same as with it; an
    unfinished one, or one without telemetry (γ would have to come from the checkpoint), is still skipped."""
    import json
    import shutil

    import numpy as np
    import torch

    from bnprobe.analysis.findings import findings_of
    from bnprobe.analysis.findings_output import findings_json
    from bnprobe.core.config import TrainConfig
    from bnprobe.reporting.collect import collect
    from bnprobe.training.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(model="resnet8", dataset="digits", epochs=2, batch_size=64, subset=200, test_subset=100,
                          train_eval_subset=100, device="cpu", milestones="", freeze="non-bn"),
              tmp_path / "with" / "run", console=Console(file=open(tmp_path / "log", "w")))
    finally:
        torch.set_num_threads(threads)
    copied = tmp_path / "copied"
    for name, drop in (("run", ()), ("unfinished", ()), ("no-telemetry", ("telemetry.h5",))):
        shutil.copytree(tmp_path / "with" / "run", copied / name,
                        ignore=shutil.ignore_patterns("checkpoint.pt", "*.lock", *drop))
    config = copied / "unfinished" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "epochs": 5}))
    with_it, without = collect([tmp_path / "with"]), collect([copied])
    assert [r.name for r in without.runs] == ["run"]
    assert "no checkpoint.pt (the run's files were copied without it)" in " ".join(without.runs[0].notes)
    assert {s.name: s.reason for s in without.skipped} == {"unfinished": "no checkpoint.pt",
                                                           "no-telemetry": "no checkpoint.pt"}
    a, b = with_it.runs[0], without.runs[0]
    assert a.test_acc == b.test_acc and a.gamma_epoch == b.gamma_epoch == 2
    assert all(np.array_equal(x, y) for x, y in zip(a.gamma_final, b.gamma_final)) and len(a.gamma_final) > 0
    assert findings_json(findings_of(with_it.runs)) == findings_json(findings_of(without.runs))


def test_the_documented_device_call_matches_the_scripts():
    """docs/gpu-study.md's device call carries the archive that `make gpu-data` writes and gpu_study.sh reads, and
    gives the script more time than the script gives itself (its last stage's kill grace included)."""
    import re

    doc = (ROOT / "docs" / "gpu-study.md").read_text()
    study = (ROOT / "bench" / "gpu_study.sh").read_text()
    data = (ROOT / "bench" / "gpu_data.sh").read_text()
    call = re.search(r'run\(command="OUT=\$OUT bash bench/gpu_study.sh", carry=\["([^"]+)"\], timeout_s=(\d+)\)', doc)
    assert call, "the device call is not in docs/gpu-study.md"
    archive, timeout_s = call.group(1), int(call.group(2))
    assert f"ARCHIVE=${{GPU_STUDY_ARCHIVE:-{archive}}}" in study and f"\nARCHIVE={archive}\n" in data
    seconds = int(re.search(r"echo 240 \|\| echo (\d+)\)\}", study).group(1))
    assert seconds + 10 <= timeout_s <= 600  # `timeout -k 10`; the device tool's longest command
    assert archive.startswith("data/") and "/data/*" in (ROOT / ".gitignore").read_text().splitlines()
