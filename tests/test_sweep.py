import io
import json

import pytest
from cli_helpers import assert_one_line_error, run_cli
from rich.console import Console

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import ABLATION_FILES, FREEZE_MODES
from bnprobe.core.options import AblateOptions
from bnprobe.files import checkpoints, runs
from bnprobe.sweep.cost import duration, forward_flops, gradient_tensors, plan_table, si_number, training_flops
from bnprobe.sweep.ablation_job import ablation_file, ablation_from_job, ablation_to_job
from bnprobe.sweep.plan import PlannedRun, read_plan

PLAN = """
[defaults]
dataset = "digits"
epochs = 1
subset = 150
test_subset = 60
device = "cpu"
milestones = ""

[[grid]]
model = "resnet8"
freeze = ["none", "non-bn"]

[[grid]]
model = ["resnet8"]
freeze = ["non-bn"]   # overlaps the first grid: planned once
"""


def test_plan_expands_grids_once(tmp_path):
    (tmp_path / "plan.toml").write_text(PLAN)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    assert [(p.config.model, p.config.freeze) for p in planned] == [("resnet8", "none"), ("resnet8", "non-bn")]
    assert all(p.status() == "new" for p in planned)
    assert planned[0].run_dir == tmp_path / "runs" / planned[0].config.run_name()


def test_sweep_trains_then_skips_finished_runs(tmp_path, capsys):
    (tmp_path / "plan.toml").write_text(PLAN)
    code, out, _ = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "0 of 2 runs already done; 2 to train" in out
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 2 and all(runs.checkpoint_path(d).exists() for d in run_dirs)
    before = [runs.checkpoint_path(d).read_bytes() for d in run_dirs]
    code, out, _ = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "2 of 2 runs already done; 0 to train" in out
    assert [runs.checkpoint_path(d).read_bytes() for d in run_dirs] == before
    code, out, _ = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"), "--dry-run")
    assert code == 0 and out.count("done") >= 2


ABLATE = '\n[ablate]\nclamp_gamma = "0,0.05,0.3"\ntest_subset = 40\ntrain_subset = 30\n'


@pytest.mark.parametrize("devices", [[], ["--devices", "cpu,cpu"]])
def test_a_plan_with_ablate_clamps_every_run_once_as_ablate_would(tmp_path, capsys, devices):
    """[ablate] runs `bnprobe ablate RUN` on each run once it has trained, in this process or in the workers; a
    rerun finds them done. The file is the one `bnprobe ablate` writes by hand with the same settings."""
    import h5py

    (tmp_path / "plan.toml").write_text(PLAN + ABLATE)
    argv = ["sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs", *devices]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "0 of 2 runs already done; 2 to train or ablate" in " ".join(out.split())
    run_dirs = sorted(d for d in (tmp_path / "runs").iterdir() if d.is_dir())
    assert len(run_dirs) == 2 and all((d / "ablation.h5").exists() for d in run_dirs)
    code, out, err = run_cli(capsys, "ablate", run_dirs[0], "--clamp-gamma", "0,0.05,0.3", "--test-subset", "40",
                             "--train-subset", "30", "--out", tmp_path / "by-hand.h5")
    assert code == 0, err
    with h5py.File(run_dirs[0] / "ablation.h5") as swept, h5py.File(tmp_path / "by-hand.h5") as by_hand:
        for name in ("values", "test_acc", "train_acc", "clamped"):
            assert swept[name][:].tolist() == by_hand[name][:].tolist(), name
    before = [(d / "ablation.h5").read_bytes() for d in run_dirs]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "2 of 2 runs already done; 0 to train or ablate" in " ".join(out.split())
    assert [(d / "ablation.h5").read_bytes() for d in run_dirs] == before
    (run_dirs[1] / "ablation.h5").unlink()  # trained, not ablated: the dry run says so, the sweep ablates only
    code, out, _ = run_cli(capsys, "sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs", "--dry-run")
    assert code == 0 and "done; ablate" in out
    checkpoint = runs.checkpoint_path(run_dirs[1]).read_bytes()
    assert run_cli(capsys, *argv)[0] == 0
    assert (run_dirs[1] / "ablation.h5").exists() and runs.checkpoint_path(run_dirs[1]).read_bytes() == checkpoint


@pytest.mark.parametrize("mode", sorted(ABLATION_FILES))
def test_a_jobs_ablation_is_the_plans(tmp_path, mode):
    """What a worker or a Slurm job is given (JSON or a pickle) is the plan's [ablate] again, and the file it
    writes is the one the plan checks for: a job never re-ablates, nor skips, what the plan sees otherwise."""
    options = AblateOptions(mode=mode, values=[0.0, 0.25], zero_beta=True, test_subset=7, dims=["1", "random:2"])
    planned = PlannedRun(TrainConfig(model="resnet8"), tmp_path / "run", options)
    assert ablation_file(planned.run_dir, options) == planned.ablation_file == tmp_path / "run" / ABLATION_FILES[mode]
    assert ablation_from_job(json.loads(json.dumps(ablation_to_job(options)))) == options
    assert ablation_to_job(None) is None and ablation_from_job(None) is None and ablation_file(tmp_path, None) is None


def test_sweep_in_parallel_worker_processes(tmp_path, capsys):
    (tmp_path / "plan.toml").write_text(PLAN)
    code, out, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"),
                             "--devices", "cpu,cpu")
    assert code == 0, err
    assert len([d for d in (tmp_path / "runs").iterdir() if d.is_dir()]) == 2
    assert all(p.status() == "done" for p in read_plan(tmp_path / "plan.toml", tmp_path / "runs"))


def test_per_device_runs_overlap_and_equal_the_same_runs_one_at_a_time(tmp_path, capsys):
    import torch

    (tmp_path / "plan.toml").write_text(PLAN.replace("epochs = 1", "epochs = 2"))
    code, _, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "alone"))
    assert code == 0, err
    code, out, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "packed"),
                             "--per-device", "2")  # no --devices: two processes on the plan's device, cpu
    assert code == 0, err
    names = sorted(d.name for d in (tmp_path / "alone").iterdir() if d.is_dir())
    assert len(names) == 2 and sorted(d.name for d in (tmp_path / "packed").iterdir() if d.is_dir()) == names
    lines = out.splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith("started ") and line.endswith(" on cpu")]
    finished = [i for i, line in enumerate(lines) if line.endswith(" on cpu: done")]
    # Both processes were started before either finished: two slots on one device. (Whether their steps
    # overlapped in time depends on how fast each process starts on a loaded machine: not asserted.)
    assert len(started) == 2 and len(finished) == 2 and max(started) < min(finished), out
    timing = ("seconds", "images_per_s")
    for name in names:
        histories = [json.loads(runs.metrics_path(tmp_path / where / name).read_text()) for where in ("alone", "packed")]
        assert [len(h) for h in histories] == [2, 2]
        alone, packed = ([{k: v for k, v in r.items() if k not in timing} for r in h] for h in histories)
        assert alone == packed
        models = [checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / where / name))["model"] for where in ("alone", "packed")]
        assert models[0].keys() == models[1].keys() and all(torch.equal(models[0][k], models[1][k]) for k in models[0])


@pytest.mark.parametrize("argv, message", [
    (["--per-device", "0"], "--per-device must be between 1 and 64, got 0"),
    (["--per-device", "65"], "--per-device must be between 1 and 64, got 65"),
    (["--per-device", "2", "--launcher", "slurm"], "--per-device is for --launcher local"),
])
def test_bad_per_device_is_a_one_line_error(tmp_path, capsys, argv, message):
    (tmp_path / "plan.toml").write_text(PLAN)
    code, _, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"), *argv)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "runs").exists()


WIDE_PLAN = """
[defaults]
epochs = 160

[[grid]]
model = ["resnet8", "resnet20"]
dataset = ["digits", "cifar100"]
freeze = ["all-but-output"]
seed = [0, 12345]
gamma_l1 = [0.0001]
bn_l2 = [0.001]

[[grid]]
model = "resnet8"
dataset = "digits"
epochs = 3
bn = "every-k"
bn_every = 2
"""


def render(renderable, width=80):
    """What `bnprobe ... | cat` shows: rich falls back to 80 columns when stdout is not a terminal."""
    out = io.StringIO()
    Console(width=width, file=out, force_terminal=False).print(renderable)
    return out.getvalue()


def test_plan_table_is_readable_at_80_columns(tmp_path):
    (tmp_path / "plan.toml").write_text(WIDE_PLAN)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    assert len(planned) == 9
    partial = planned[1]
    partial.run_dir.mkdir(parents=True)
    runs.save_checkpoint(runs.checkpoint_path(partial.run_dir), {"epoch": 7})
    text = render(plan_table(planned, 50.0))
    assert "\u2026" not in text and "..." not in text, text  # nothing is cut with an ellipsis
    assert max(len(line) for line in text.splitlines()) <= 80
    total = 0.0
    for i, run in enumerate(planned, 1):
        flops = training_flops(run.config)
        total += flops
        row = next(line for line in text.splitlines() if line[:1] == str(i))  # not a folded line's "8" of resnet8
        # every number of the row, whole, on the row's first line
        assert f" {si_number(flops)} " in row and f" {duration(flops / 50e12)} " in row, row
        assert f" {run.config.seed} " in row and f" {run.config.epochs} " in row, row
    total_row = next(line for line in text.splitlines() if "total" in line)
    assert si_number(total) in total_row and duration(total / 50e12) in total_row, total_row
    assert "partial" in text  # text columns fold (here, with everything varying, even within words)


def test_plan_table_moves_what_every_run_shares_into_the_title(tmp_path):
    (tmp_path / "plan.toml").write_text(PLAN)
    text = render(plan_table(read_plan(tmp_path / "plan.toml", tmp_path / "runs"), 50.0))
    assert "2 runs (digits, 1 epochs, seed 0)" in text
    header = next(line for line in text.splitlines() if line.startswith("#"))
    assert header.split() == ["#", "model", "freeze", "bn", "other", "FLOP", "time", "status"], text
    rows = [line.split()[:4] for line in text.splitlines() if line[:1].isdigit()]
    assert rows == [["1", "resnet8", "none", "full"], ["2", "resnet8", "non-bn", "full"]], text


@pytest.mark.parametrize("value,text", [
    (0.0, "0"), (950.0, "950"), (1_234.0, "1.23k"), (999_600.0, "1M"), (1.782e17, "178P"), (6.23e16, "62.3P"),
    (2.966e18, "2.97E"), (4.2e24, "4.2e+03Z"),
])
def test_si_number(value, text):
    assert si_number(value) == text


@pytest.mark.parametrize("seconds,text", [
    (0.2, "<1s"), (45.0, "45s"), (59.6, "1m"), (21 * 60.0, "21m"), (3590.0, "1.0h"), (16.6 * 3600, "16.6h"),
    (1663 * 3600.0, "1,663h"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_flop_count_of_resnet20_matches_hand_count():
    # stem, 3 stages of 6 convs (first of stages 2-3 strided), two 1x1 shortcuts, the linear layer: 40,813,184 MACs
    assert forward_flops(TrainConfig(model="resnet20", dataset="cifar10")) == 2 * 40_813_184


@pytest.mark.parametrize("freeze,random_features", [(mode, 0) for mode in FREEZE_MODES]
                         + [(mode, 2) for mode in ("non-bn", "non-bn-output", "all-but-output")])
def test_the_estimate_computes_the_gradients_training_computes(freeze, random_features):
    """The cost estimate's tensors with a gradient are those a run of `config` trains (requires_grad after
    bnprobe.training.train's freezing and random features), for every freeze mode."""
    import torch

    from bnprobe.training.train import trainable_model

    config = TrainConfig(model="resnet8", dataset="digits", freeze=freeze, random_features=random_features,
                         bn_affine_off="layer1.*", device="cpu").resolved()
    model = trainable_model(config, torch.device("cpu"))[0]
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert gradient_tensors(config) == trained and trained


@pytest.mark.parametrize("changes,weight_gradients", [
    (dict(freeze="none"), "convs"), (dict(freeze="bn"), "convs"), (dict(freeze="non-bn"), "none"),
    (dict(freeze="non-bn-output"), "output"), (dict(freeze="all-but-output"), "output"),
    (dict(freeze="all-but-output", random_features=2), "convs"),  # whole conv weight gradients, then masked
])
def test_training_flops_count_weight_gradients_where_they_are_computed(changes, weight_gradients):
    forward, output = 2 * 40_813_184, 2 * 64 * 10  # resnet20 by hand (above); its 64 -> 10 linear layer
    backward = forward + {"convs": forward, "none": 0, "output": output}[weight_gradients]
    config = TrainConfig(model="resnet20", dataset="cifar10", epochs=3, **changes)
    assert training_flops(config) == (forward + backward) * 50_000 * 3


@pytest.mark.parametrize("text,message", [
    (None, "no plan file"),
    ("[grid\nmodel=", "not valid TOML"),
    ("[defaults]\nepochs = 1\n", "no [[grid]] table"),
    ("[[grid]]\nmodle = 'resnet8'\n", "unknown settings modle"),
    ("[runs]\nx = 1\n[[grid]]\nmodel = 'resnet8'\n", "unknown tables runs"),
    ("[[grid]]\nmodel = 'resnet8'\nlr = -1.0\n", "--lr must be > 0"),
    ("[[grid]]\nmodel = 'resnet8'\nseed = []\n", "plans no runs"),
    ("[ablate]\ntest_subset = 10\n[[grid]]\nmodel = 'resnet8'\n", "set exactly one of clamp_gamma and clamp_fraction"),
    ("[ablate]\nclamp_gamma = '0:0.1:3'\nclamp_fraction = 0.5\n[[grid]]\nmodel = 'resnet8'\n", "exactly one"),
    ("[ablate]\nclamp_gamma = '0.1,,0.2'\n[[grid]]\nmodel = 'resnet8'\n", "--clamp-gamma has an empty item"),
    ("[ablate]\nclamp_fraction = '2'\n[[grid]]\nmodel = 'resnet8'\n", "--clamp-fraction values must be in [0, 1]"),
    ("[ablate]\nclamp_gamma = 0.1\nzero_beta = 1\n[[grid]]\nmodel = 'resnet8'\n", "zero_beta must be true or false"),
    ("[ablate]\nclamp_gamma = 0.1\ntest_subset = -1\n[[grid]]\nmodel = 'resnet8'\n", "test_subset must be >= 0"),
    ("[ablate]\nclamp_gamma = 0.1\ntaus = 3\n[[grid]]\nmodel = 'resnet8'\n", "unknown setting 'taus'"),
])
def test_bad_plans_are_one_line_errors(tmp_path, capsys, text, message):
    if text is not None:
        (tmp_path / "plan.toml").write_text(text)
    code, _, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, message)


def test_a_bad_value_of_a_huge_grid_is_refused_before_the_grid_is_expanded(tmp_path, capsys):
    # issue 21 (17): a 1e12-run grid allowed by --max-runs was expanded (106 s, 2.9 GB) before epochs = -1 failed;
    # --max-runs is now at most 100,000 (issue 30), the largest grid it allows is checked value by value first
    import signal

    values = lambda start: "[" + ", ".join(str(start + i) for i in range(300)) + "]"  # noqa: E731
    (tmp_path / "plan.toml").write_text(
        f"[defaults]\nmodel = 'resnet8'\ndataset = 'digits'\nmilestones = ''\n[[grid]]\n"
        f"epochs = {values(1)[:-1]}, -1]\nseed = {values(0)}\n")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the grid was expanded before its values"))
    signal.alarm(60)  # (not a speed test: a loaded machine; expanding takes hours)
    try:
        code, _, err = run_cli(capsys, "sweep", tmp_path / "plan.toml", "--max-runs", 100_000, "--dry-run",
                               "--runs-dir", tmp_path / "runs")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert_one_line_error(code, err, "grid 1: --epochs must be >= 1, got -1")


def test_seed_plan_example_is_the_whole_plan_and_valid(tmp_path):
    from pathlib import Path

    # What --dry-run reads first: every entry resolved, its model built on the meta device. (The dry run's cost
    # column then counts FLOPs of every model; that is tested above, on small ones.)
    planned = read_plan(Path(__file__).parents[1] / "examples" / "seed-plan.toml", tmp_path)
    assert len(planned) == 222
    fields = ("model", "dataset", "freeze", "bn", "bn_every", "gamma_init", "gamma_l1", "bn_l2", "bn_affine_off",
              "random_features", "epochs")
    seeds: dict[tuple, set[int]] = {}  # experiment -> its seeds
    for p in planned:
        c = {**p.config.to_dict(), "bn_every": p.config.bn_every if p.config.bn == "every-k" else None}
        seeds.setdefault(tuple(c[f] for f in fields), set()).add(p.config.seed)
    assert all(s == {0, 1, 2} for s in seeds.values())  # three seeds for every experiment
    settings = [dict(zip(fields, key)) for key in seeds]

    def models(**wanted) -> set[str]:
        return {s["model"] for s in settings if all(s[k] == v for k, v in wanted.items())}

    deep = {"resnet50", "resnet152", "resnet200"}
    for freeze in ("none", "non-bn"):
        assert deep <= models(freeze=freeze, bn="full", gamma_init="uniform", gamma_l1=0, bn_l2=0, bn_affine_off="")
        for every in (2, 5):
            assert models(freeze=freeze, bn="every-k", bn_every=every) == deep
        assert models(freeze=freeze, bn="full", dataset="cifar10") >= {"convs25", "convs76", "convs100"}
        assert models(freeze=freeze, dataset="cifar10", epochs=160) >= {
            f"resnet{d}" for d in (14, 32, 56, 110, 218, 434, 866)}  # Frankle's depth series
        assert models(freeze=freeze, dataset="mnist")
    assert models(freeze="none", bn="none") == deep
    for changed in (dict(gamma_init="ones"), dict(gamma_init="normal"), dict(gamma_l1=1e-4), dict(bn_l2=1e-3),
                    dict(bn_affine_off="layer4.*")):
        assert models(freeze="non-bn", **changed) == deep
    assert models(freeze="all-but-output", random_features=2) == models(freeze="non-bn-output") == deep
    assert models(model="vgg38", dataset="cifar100", epochs=100, freeze="none") == {"vgg38"}
    with pytest.raises(BnprobeError):
        read_plan(tmp_path / "missing.toml", tmp_path)


def test_job_array_through_submitit(tmp_path):
    """The Slurm path, with submitit's local cluster standing in for sbatch."""
    submitit = pytest.importorskip("submitit")
    from bnprobe.sweep.launch import submit_sweep

    (tmp_path / "plan.toml").write_text(PLAN)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    jobs = submit_sweep(planned, tmp_path / "jobs", "local", timeout_min=5)
    assert len(jobs) == 2 and isinstance(jobs[0], submitit.Job)
    assert sorted(job.result() for job in jobs) == sorted(str(p.run_dir) for p in planned)
    assert all(p.status() == "done" for p in planned)
    assert submit_sweep(planned, tmp_path / "jobs", "local") == []  # nothing left to do


def test_slurm_launcher_without_slurm_is_a_clear_error(tmp_path, capsys):
    pytest.importorskip("submitit")
    import shutil

    if shutil.which("sbatch"):
        pytest.skip("this machine has Slurm")
    (tmp_path / "plan.toml").write_text(PLAN)
    code, _, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"),
                           "--launcher", "slurm")
    assert_one_line_error(code, err, "submitting 2 jobs failed")


def test_seeds_repeat_each_run_and_group_by_seed(tmp_path):
    from bnprobe.core.config import seed_group

    (tmp_path / "plan.toml").write_text(PLAN.replace('milestones = ""', 'milestones = ""\nseeds = [0, 1, 2]')
                                        + '\n[[grid]]\nmodel = "resnet8"\nfreeze = "bn"\nseeds = [7]\n')
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    assert [(p.config.freeze, p.config.seed) for p in planned] == [
        ("none", 0), ("none", 1), ("none", 2), ("non-bn", 0), ("non-bn", 1), ("non-bn", 2), ("bn", 7)]
    assert len({p.run_dir for p in planned}) == 7  # each seed its own run
    groups = {}
    for p in planned:
        groups.setdefault(seed_group(p.config.to_dict()), []).append(p.config.seed)
    assert sorted(groups.values()) == [[0, 1, 2], [0, 1, 2], [7]]
    # what only says how to run (device, data folder), an unused --bn-every and 0 vs 0.0 do not split a group
    config = planned[0].config.to_dict()
    assert seed_group(config) == seed_group({**config, "device": "cuda", "data_dir": "/x", "bn_every": 5,
                                             "gamma_l1": 0, "seed": 9})
    assert seed_group(config) != seed_group({**config, "lr": 0.2})
    every = {**config, "bn": "every-k"}
    assert seed_group({**every, "bn_every": 2}) != seed_group({**every, "bn_every": 5})
    # a config written before a setting existed groups with the same settings at that setting's default
    assert seed_group({k: v for k, v in config.items() if k != "gamma_l1"}) == seed_group(config)


@pytest.mark.parametrize("table, message", [
    ("seeds = [0, 0]", "seeds must be a list of distinct integers"),
    ("seeds = 3", "seeds must be a list of distinct integers"),
    ("seeds = []", "seeds must be a list of distinct integers"),
    ("seeds = [0, 1]\nseed = 2", "seed and seeds both set"),
])
def test_bad_seeds_are_one_line(tmp_path, table, message):
    (tmp_path / "plan.toml").write_text(PLAN.replace('milestones = ""', f'milestones = ""\n{table}'))
    with pytest.raises(BnprobeError, match=message):
        read_plan(tmp_path / "plan.toml", tmp_path / "runs")


def test_calibrate_times_real_steps_once_per_distinct_model(tmp_path, capsys, monkeypatch):
    """--calibrate: the time column is the measured step time x steps x epochs; seeds share one calibration."""
    import time

    from bnprobe.sweep import cost

    real_step, calls = cost.train_one_epoch, []

    def timed_step(*args, **kwargs):  # the real step, made slow enough that whole seconds show its time
        start = time.perf_counter()
        time.sleep(0.3)
        result = real_step(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return result

    monkeypatch.setattr(cost, "train_one_epoch", timed_step)
    cost._step_seconds.cache_clear()
    (tmp_path / "plan.toml").write_text(PLAN.replace("epochs = 1", "epochs = 5\nbatch_size = 64\nseeds = [0, 1]"))
    code, out, err = run_cli(capsys, "sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs",
                             "--dry-run", "--calibrate")
    assert code == 0, err
    assert "time from 3 timed training steps of each model on this machine" in " ".join(out.split())
    assert len(calls) == 2 * 4  # two distinct models (freeze none, non-bn), each 1 warm-up + 3 timed; seeds share
    rows = [line.split() for line in out.splitlines() if " resnet8 " in line]
    assert [row[:3] for row in rows] == [["1", "resnet8", "none"], ["2", "resnet8", "none"],
                                         ["3", "resnet8", "non-bn"], ["4", "resnet8", "non-bn"]], out
    steps = 3 * 5  # ceil(150 / 64) steps x 5 epochs
    for row, timed in ((rows[0], calls[1:4]), (rows[2], calls[5:8])):
        shown = int(row[row.index("new") - 1].rstrip("s"))
        assert abs(shown - sum(timed) / 3 * steps) <= 1, (row, timed)
    assert not (tmp_path / "runs").exists()  # a dry run trains nothing
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    render(plan_table(planned, 50.0, calibrate=True))  # the same models again: timed already
    assert len(calls) == 8


def test_cpu_study_example_plans_every_comparison_it_reports(tmp_path):
    """examples/cpu-study.toml: each of the seed's questions has its runs, three seeds on both sides of every
    comparison (paired tests), Frankle's schedule shape, and a clamp sweep of every run at the findings' τ."""
    from pathlib import Path

    from bnprobe.analysis.findings import CLAMP_TAUS

    planned = read_plan(Path(__file__).parents[1] / "examples" / "cpu-study.toml", tmp_path)
    kinds: dict[tuple, set[int]] = {}
    for p in planned:
        c = p.config
        assert (c.dataset, c.subset, c.epochs, c.device, c.batch_size) == ("cifar10", 10_000, 12, "cpu", 128)
        assert (c.lr, c.momentum, c.weight_decay, c.milestone_epochs, c.lr_drop) == (0.1, 0.9, 1e-4, (6, 9), 0.1)
        assert (c.flip, c.translate, c.normalize) == (True, 4, "per-pixel")
        assert p.ablation.mode == "threshold" and set(CLAMP_TAUS) <= set(p.ablation.values)
        kinds.setdefault((c.model, c.freeze, c.random_features, c.gamma_l1), set()).add(c.seed)
    assert all(seeds == {0, 1, 2} for seeds in kinds.values())  # paired tests need the same seeds on both sides
    for depth in (8, 14, 20):  # BN-only vs full at each depth: the depth series of both, and their gaps
        assert {(f"resnet{depth}", "none", 0, 0.0), (f"resnet{depth}", "non-bn", 0, 0.0)} <= set(kinds)
    assert {("resnet8", "non-bn-output", 0, 0.0), ("resnet8", "all-but-output", 2, 0.0)} <= set(kinds)
    assert ("resnet20", "non-bn", 0, 5e-3) in kinds  # γ regularised on the deepest BN-only net
    assert len(planned) == 27
