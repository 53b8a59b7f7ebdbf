import pytest

from bnprobe import runs
from bnprobe.config import TrainConfig
from bnprobe.errors import BnprobeError
from bnprobe.sweep import forward_flops, read_plan
from cli_helpers import assert_one_line_error, run_cli

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


def test_sweep_in_parallel_worker_processes(tmp_path, capsys):
    (tmp_path / "plan.toml").write_text(PLAN)
    code, out, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"),
                             "--devices", "cpu,cpu")
    assert code == 0, err
    assert len([d for d in (tmp_path / "runs").iterdir() if d.is_dir()]) == 2
    assert all(p.status() == "done" for p in read_plan(tmp_path / "plan.toml", tmp_path / "runs"))


def test_flop_count_of_resnet20_matches_hand_count():
    # stem, 3 stages of 6 convs (first of stages 2-3 strided), two 1x1 shortcuts, the linear layer: 40,813,184 MACs
    assert forward_flops(TrainConfig(model="resnet20", dataset="cifar10")) == 2 * 40_813_184


@pytest.mark.parametrize("text,message", [
    (None, "no plan file"),
    ("[grid\nmodel=", "not valid TOML"),
    ("[defaults]\nepochs = 1\n", "no [[grid]] table"),
    ("[[grid]]\nmodle = 'resnet8'\n", "unknown settings modle"),
    ("[runs]\nx = 1\n[[grid]]\nmodel = 'resnet8'\n", "unknown tables runs"),
    ("[[grid]]\nmodel = 'resnet8'\nlr = -1.0\n", "--lr must be > 0"),
])
def test_bad_plans_are_one_line_errors(tmp_path, capsys, text, message):
    if text is not None:
        (tmp_path / "plan.toml").write_text(text)
    code, _, err = run_cli(capsys, "sweep", str(tmp_path / "plan.toml"), "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, message)


def test_seed_plan_example_is_valid(tmp_path):
    from pathlib import Path

    planned = read_plan(Path(__file__).parents[1] / "examples" / "seed-plan.toml", tmp_path)
    assert len(planned) == 25
    assert {p.config.bn for p in planned} == {"full", "none", "every-k"}
    with pytest.raises(BnprobeError):
        read_plan(tmp_path / "missing.toml", tmp_path)


def test_job_array_through_submitit(tmp_path):
    """The Slurm path, with submitit's local cluster standing in for sbatch."""
    submitit = pytest.importorskip("submitit")
    from bnprobe.sweep import submit_sweep

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
