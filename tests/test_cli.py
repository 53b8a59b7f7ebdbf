"""The CLI as a user meets it: bad input gives one line on stderr and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.files import runs

TINY = ["--dataset", "digits", "--epochs", "1", "--subset", "200", "--test-subset", "100", "--device", "cpu"]


@pytest.mark.parametrize("argv,pattern", [
    (["train", "resnet21"], "unknown model 'resnet21'"),
    (["train", "resnet8", "--dataset", "svhn"], "unknown data set 'svhn'"),
    (["train", "resnet8", "--lr", "-1"], "--lr must be > 0"),
    (["train", "resnet8", "--lr", "fast"], "Invalid value for '--lr'"),
    (["train", "resnet8", "--epochs", "0"], "--epochs must be >= 1"),
    (["train", "resnet8", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["train", "resnet8", "--freeze", "conv"], "--freeze must be one of"),
    (["train", "resnet8", "--milestones", "80;120"], "--milestones"),
    (["train", "resnet8", "--milestones", "120,80"], "--milestones must be increasing"),
    (["train", "resnet8", "--lr", "inf"], "--lr must be a finite number"),
    (["train", "resnet8", "--weight-decay", "inf"], "--weight-decay must be a finite number"),
    (["train", "resnet8", "--name", "../elsewhere"], "--name must be a single folder name"),
    (["train", "resnet8", "--name", "."], "--name must be a single folder name"),
    (["train", "resnet8", "--name", "a/b"], "--name must be a single folder name"),
    (["train", "resnet8", "--name", ""], "--name must be a single folder name"),
    (["train", "resnet8", "--name", "a\nb"], "--name must not contain control characters"),
    (["train", "resnet8", "--name", "a\tb"], "--name must not contain control characters"),
    (["train", "resnet8", "--name", ".r1.replaced"], "--name must not start with '.'"),
    (["train", "resnet8", "--name", ".r1.lock"], "--name must not start with '.'"),
    (["train", "resnet8", "--bn", "none", "--gamma-l1", "0.1"], "act on the norm layers' γ and β, but --bn none leaves none"),
    (["train", "resnet8", "--gamma-init", "zeros"], "--gamma-init must be one of"),
    (["train", "resnet50", "--shortcut", "A"], "shortcut"),
    (["train", "resnet8", "--resume", "--overwrite"], "contradict"),
    (["train"], "Missing argument"),
    (["train", "resnet8", "--no-such-flag"], "No such option"),
    (["frobnicate"], "No such command"),
    # issue 21 (17): accepted, then minutes or gigabytes later (or never) an answer
    (["train", "resnet8", "--epochs", "1000000000"], "--epochs must be at most 100,000, got 1,000,000,000"),
    (["report", "no-runs", "--jobs", "100000"], "--jobs must be between 0 and 1,024, got 100,000"),
    (["sweep", "plan.toml", "--tflops", "nan"], "--tflops must be > 0 (a finite number), got nan"),
    (["sweep", "plan.toml", "--slurm-hours", "inf"], "--slurm-hours must be > 0 (a finite number), got inf"),
    (["probe", "x.pt", "--off-threshold", "nan"], "--off-threshold must be >= 0 (a finite number), got nan"),
])
def test_bad_input_is_one_line(capsys, tmp_path, argv, pattern):
    code, _, err = run_cli(capsys, *argv, "--runs-dir", str(tmp_path)) if argv[0] == "train" and len(argv) > 1 else run_cli(capsys, *argv)
    assert_one_line_error(code, err, pattern)
    assert not any(tmp_path.iterdir())  # nothing written


def test_missing_data_offline(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                           "--no-download", "--runs-dir", str(tmp_path / "runs"))
    assert_one_line_error(code, err, "MNIST is not in")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:5"])
def test_cuda_requested_without_one(capsys, tmp_path, device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY[:-2], "--device", device, "--runs-dir", str(tmp_path))
    assert_one_line_error(code, err, f"--device {device} was given but no CUDA device")


def test_no_arguments_prints_help_without_an_empty_error(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and "Commands:" in out + err and "bnprobe: error" not in err
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("bnprobe 0.")


def test_help_keeps_square_brackets(capsys):
    code, out, _ = run_cli(capsys, "sweep", "--help")
    assert code == 0 and "[defaults] and [[grid]]" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "U[0,1]" in out and "\\[" not in out


def test_overwrite_only_replaces_a_run(capsys, tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "thesis",
                           "--overwrite")
    assert_one_line_error(code, err, "is not a bnprobe run")
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]


def test_overwrite_ignores_a_config_json_that_bnprobe_did_not_write(capsys, tmp_path):
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "config.json").write_text("{}")  # any program's config file: not a run
    (app / "src" / "thesis.tex").write_text("years of work")
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "app",
                           "--overwrite")
    assert_one_line_error(code, err, "is not a bnprobe run")
    assert (app / "src" / "thesis.tex").read_text() == "years of work" and (app / "config.json").read_text() == "{}"


def test_overwrite_never_deletes_files_bnprobe_did_not_write(capsys, tmp_path):
    import h5py

    argv = ["train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]
    assert run_cli(capsys, *argv)[0] == 0
    (tmp_path / "r" / "notes.txt").write_text("mine")
    (tmp_path / "r" / "data.h5").write_bytes(b"not HDF5")
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert_one_line_error(code, err, "holds files bnprobe did not write (data.h5, notes.txt)")
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine" and runs.checkpoint_path(tmp_path / "r").exists()

    (tmp_path / "r" / "notes.txt").unlink()
    (tmp_path / "r" / "data.h5").unlink()
    with h5py.File(tmp_path / "r" / "my-probe.h5", "w") as f:  # bnprobe's own kinds of result go with the run
        f.attrs["format"] = "bnprobe-probe"
    (tmp_path / "r" / ".probe.h5.lock").touch()
    assert run_cli(capsys, *argv, "--overwrite", "--freeze", "non-bn")[0] == 0
    assert runs.read_config(tmp_path / "r").freeze == "non-bn" and not (tmp_path / "r" / "my-probe.h5").exists()


def test_interrupted_overwrite_gives_the_old_run_back(capsys, tmp_path, monkeypatch):
    import bnprobe.training.train

    argv = ["train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]
    assert run_cli(capsys, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the new run's first epoch

    monkeypatch.setattr(bnprobe.training.train, "train_one_epoch", interrupted)
    code, _, err = run_cli(capsys, *argv, "--overwrite", "--freeze", "non-bn")
    assert code == 130 and err.strip().startswith("bnprobe: interrupted;") and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # nothing set aside is left behind


@pytest.mark.parametrize("new_run_saved", [False, True])
def test_overwrite_killed_midway_is_finished_or_undone_next_time(capsys, tmp_path, new_run_saved):
    """A SIGKILL between setting the old run aside and the new run's first checkpoint loses nothing."""
    argv = ["train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r"]
    assert run_cli(capsys, *argv)[0] == 0
    old_checkpoint = runs.checkpoint_path(tmp_path / "r").read_bytes()
    replacement = runs.Replacement(tmp_path / "r")
    replacement.set_aside()  # what the killed `--overwrite` had done ...
    (tmp_path / "r").mkdir()
    runs.write_json(runs.config_path(tmp_path / "r"), {"half": "written"})
    if new_run_saved:  # ... and maybe its first checkpoint too
        runs.save_checkpoint(runs.checkpoint_path(tmp_path / "r"), {"new": 1})
    runs.Replacement(tmp_path / "r").recover()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert (runs.checkpoint_path(tmp_path / "r").read_bytes() == old_checkpoint) is not new_run_saved


def test_an_old_run_set_aside_by_a_killed_overwrite_is_shown(capsys, tmp_path):
    import shutil

    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r")[0] == 0
    runs.Replacement(tmp_path / "r").set_aside()  # what an `--overwrite` killed with -9 leaves
    code, out, _ = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "report.html", "--jobs", "1")
    assert code == 0 and "skipped .r.replaced: the old run r, set aside by an --overwrite that was interrupted" in out
    code, _, err = run_cli(capsys, "inspect", tmp_path / "r")
    assert_one_line_error(code, err, f"no run directory at {tmp_path / 'r'}; {tmp_path / '.r.replaced'} holds the old")
    shutil.copytree(tmp_path / ".r.replaced", tmp_path / "r")  # and with the new run there
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "r")
    assert code == 0 and "After 1 of 1 epochs" in out and "set aside by an --overwrite" in " ".join(out.split())


def test_a_folder_named_like_a_set_aside_run_is_never_touched(capsys, tmp_path):
    """Issue 21: `.r1.replaced` beside an ordinary folder r1 made train delete r1 (thesis.tex with it). Only
    what bnprobe set aside itself (its marker inside) is ever moved back or deleted."""
    (tmp_path / "r1" / "src").mkdir(parents=True)
    (tmp_path / "r1" / "src" / "thesis.tex").write_text("x")
    (tmp_path / ".r1.replaced").mkdir()
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r1")
    assert code == 2 and "bnprobe: error:" in err  # r1 is not a run: refused as before, not recovered
    assert (tmp_path / "r1" / "src" / "thesis.tex").read_text() == "x"
    assert (tmp_path / ".r1.replaced").is_dir()
    # the same with --overwrite: r1 holds a foreign file, and .r1.replaced is a user's
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r1", "--overwrite")
    assert code == 2 and (tmp_path / "r1" / "src" / "thesis.tex").read_text() == "x"


def test_a_complete_run_copied_to_a_set_aside_name_survives_overwrite(capsys, tmp_path):
    """Issue 21: with r1 a real run and another complete run in .r1.replaced (not set aside by bnprobe),
    `train r1 --overwrite` deleted .r1.replaced silently. Now it refuses, and both runs stay."""
    import shutil

    argv = ["train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r1"]
    assert run_cli(capsys, *argv)[0] == 0
    shutil.copytree(tmp_path / "r1", tmp_path / ".r1.replaced")
    kept = {p.name: p.read_bytes() for p in (tmp_path / ".r1.replaced").iterdir()}
    code, _, err = run_cli(capsys, *argv, "--overwrite")
    assert_one_line_error(code, err, f"{tmp_path / '.r1.replaced'} exists and bnprobe did not make it")
    assert {p.name: p.read_bytes() for p in (tmp_path / ".r1.replaced").iterdir()} == kept
    assert runs.checkpoint_path(tmp_path / "r1").is_file()
    code, out, _ = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "report.html", "--jobs", "1")
    assert code == 0 and "set aside by an --overwrite" not in out  # a user's folder is not called one


def test_recovery_never_deletes_files_bnprobe_did_not_write(capsys, tmp_path):
    """A set-aside run is put back only over what the interrupted new run wrote, never over a user's files."""
    argv = ["train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r"]
    assert run_cli(capsys, *argv)[0] == 0
    runs.Replacement(tmp_path / "r").set_aside()  # what a killed `--overwrite` left ...
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")  # ... and a file the user put there since
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert_one_line_error(code, err, "cannot put the old run back")
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine" and (tmp_path / ".r.replaced").is_dir()
    (tmp_path / "r" / "notes.txt").unlink()
    code, out, _ = run_cli(capsys, *argv, "--resume")
    assert code == 0 and "put back the old run" in " ".join(out.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert runs.foreign_files(tmp_path / "r") == [] and not (tmp_path / "r" / ".bnprobe-set-aside").exists()


def test_export_refuses_to_write_inside_a_run(capsys, tmp_path):
    """Issue 21: `export R -o R/x.safetensors` wrote inside the run, which train --overwrite then refused."""
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", tmp_path, "--name", "r")[0] == 0
    code, _, err = run_cli(capsys, "export", tmp_path / "r", "-o", tmp_path / "r" / "x.safetensors")
    assert_one_line_error(code, err, "will not write")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(runs.RUN_FILES)


def test_config_json_stores_an_absolute_data_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "train", "resnet8", *TINY, "--data-dir", "somewhere/../data", "--name", "r")[0] == 0
    assert runs.read_config(tmp_path / "runs" / "r").data_dir == str(tmp_path / "data")


def test_unwritable_runs_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(blocker / "runs"))
    assert_one_line_error(code, err, "cannot write run directory")
    assert blocker.read_text() == "not a directory"


def test_train_then_refuse_to_overwrite_then_resume_and_overwrite(capsys, tmp_path):
    # A long path and rich markup in the name: messages must neither wrap nor swallow "[b]".
    tmp_path = tmp_path / ("long-folder-name-" * 8)
    argv = ["train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r[b]"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    assert "77,754 of 77,754 parameters trainable" in out
    checkpoint = runs.checkpoint_path(tmp_path / "r[b]").read_bytes()

    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "already exists; pass --resume")
    assert runs.checkpoint_path(tmp_path / "r[b]").read_bytes() == checkpoint  # nothing lost

    code, _, err = run_cli(capsys, *argv, "--resume", "--lr", "0.3")
    assert_one_line_error(code, err, "settings differ (lr: stored 0.1 vs given 0.3)")

    code, out, _ = run_cli(capsys, *argv, "--resume")
    assert code == 0 and f"{tmp_path / 'r[b]'} already finished" in out

    code, out, _ = run_cli(capsys, *argv, "--overwrite", "--freeze", "non-bn")
    assert code == 0 and "672 of 77,754 parameters trainable" in out
    assert runs.read_config(tmp_path / "r[b]").freeze == "non-bn"


def test_default_run_name_is_stable(capsys, tmp_path):
    code, _, _ = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path))
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.startswith("resnet8-digits-none-s0-")
    code, _, err = run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path))
    assert_one_line_error(code, err, "already exists")


def test_installed_command_end_to_end(tmp_path):
    """The real console script in a fresh process: help, a run, and an error without traceback."""
    env = {**os.environ, "BNPROBE_DATA_DIR": str(tmp_path / "no-data")}
    bnprobe = [sys.executable, "-m", "bnprobe"]
    assert "train" in subprocess.run([*bnprobe, "--help"], capture_output=True, text=True, env=env).stdout
    done = subprocess.run([*bnprobe, "train", "resnet8", *TINY, "--freeze", "non-bn", "--runs-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "trainable" in done.stdout and "test acc" in done.stdout
    bad = subprocess.run([*bnprobe, "train", "resnet8", "--dataset", "cifar10", "--no-download",
                          "--runs-dir", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]


def test_models_lists_the_registry(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "resnet152" in out and "272,474" in out
    assert "resnet<6n+2>" in out  # the names that build without being listed


@pytest.mark.parametrize("command", ["probe", "ablate"])
def test_results_to_a_folder_or_an_unwritable_place_are_one_line(capsys, tmp_path, command):
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r")[0] == 0
    extra = ["--clamp-gamma", "0.1", "--test-subset", "50", "--train-subset", "50"] if command == "ablate" else []
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for out, pattern in [(tmp_path, "it is a directory"), (blocker / "x.h5", "cannot write")]:
        code, _, err = run_cli(capsys, command, str(tmp_path / "r"), *extra, "--out", str(out))
        assert_one_line_error(code, err, pattern)
    assert blocker.read_text() == "keep"
    assert not list(tmp_path.glob("**/.*.tmp"))


def test_a_report_is_never_written_inside_a_run(capsys, tmp_path):
    # It was, with its findings JSON beside it, and `train --overwrite` then refused the run for foreign files.
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r")[0] == 0
    before = sorted(p.name for p in run.iterdir())
    (tmp_path / "link").symlink_to(run)
    for output in (run / "x.html", run / "sub" / "x.pdf", tmp_path / "link" / "x.html"):
        code, _, err = run_cli(capsys, "report", tmp_path, "-o", output, "--jobs", "1")
        assert_one_line_error(code, err, f"will not write {output} inside run directory {run} (")
    code, _, err = run_cli(capsys, "findings", tmp_path, "--json", run / "f.json")  # nor `findings --json`
    assert_one_line_error(code, err, f"will not write {run / 'f.json'} inside run directory {run} (")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, no folder or lock left
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r", "--overwrite")[0] == 0
    notes = tmp_path / "notes"  # a config.json that is not a run's settings makes no run
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    assert run_cli(capsys, "report", run, "-o", notes / "x.html", "--jobs", "1")[0] == 0
    assert (notes / "x.html").is_file() and (notes / "x.findings.json").is_file()


@pytest.mark.parametrize("command,victim,pattern", [
    ("probe", "checkpoint.pt", "it is not a file bnprobe wrote"),
    ("ablate", "telemetry.h5", "it is a bnprobe-telemetry file"),
    ("ablate", "config.json", "it is not a file bnprobe wrote"),
    ("report", "metrics.html", "it is not a report bnprobe wrote"),
    ("report", "metrics.pdf", "it is not a report bnprobe wrote"),
])
def test_an_output_never_replaces_a_file_of_another_kind(capsys, tmp_path, command, victim, pattern):
    run = tmp_path / "r"
    assert run_cli(capsys, "train", "resnet8", *TINY, "--runs-dir", str(tmp_path), "--name", "r")[0] == 0
    target = run / victim
    if victim.startswith("metrics."):  # the user's own page or paper beside the run (a report is never inside)
        target = tmp_path / victim
        target.write_text("<html><body>my notes</body></html>")
    argv = {"probe": ["probe", run, "--images", "50"],
            "ablate": ["ablate", run, "--clamp-gamma", "0.1", "--test-subset", "50", "--no-train"],
            "report": ["report", run, "--jobs", "1"]}[command]
    before = target.read_bytes()
    code, _, err = run_cli(capsys, *argv, "--output" if command == "report" else "--out", target)
    assert_one_line_error(code, err, f"will not replace {target}: {pattern}")
    assert target.read_bytes() == before
    if not victim.endswith(".pdf"):  # an earlier result of the same kind is replaced
        same = tmp_path / ("again.html" if command == "report" else "again.h5")
        for _ in range(2):
            assert run_cli(capsys, *argv, "--output" if command == "report" else "--out", same)[0] == 0
