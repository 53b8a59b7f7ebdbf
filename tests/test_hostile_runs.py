"""A run whose files were edited (issue 30, items 9 and 10): one check of a run in every reader, config.json and
checkpoint.pt agreeing, --norm-groups dividing every layer's channels from any source, NaN in a history."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import trained_runs

from bnprobe.core.config import TrainConfig, check_groups
from bnprobe.core.errors import BnprobeError
from bnprobe.nets.check import check_model
from bnprobe.nets.registry import list_models


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_runs(tmp_path_factory)["full"]


def _edited(run, tmp_path, **changes):
    copy = tmp_path / "runs" / "edited"
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


READERS = [["inspect", "{run}"], ["probe", "{run}", "--out", "{tmp}/p.h5"],
           ["ablate", "{run}", "--clamp-gamma", "0.1", "--out", "{tmp}/a.h5"], ["export", "{run}", "-o", "{tmp}/e.safetensors"]]


@pytest.mark.parametrize("argv", READERS, ids=lambda argv: argv[0])
@pytest.mark.parametrize("changes, message", [
    (dict(norm="weird"), "--norm must be one of batch, group, layer; got 'weird'"),
    (dict(norm_groups=0), "--norm-groups must be >= 1, got 0"),
    (dict(norm_groups=1e30), "setting 'norm_groups' must be an integer"),
    (dict(norm="group", norm_groups=7), "--norm-groups 7 does not divide a layer's 16 channels"),
    (dict(norm="group", norm_groups=4), "disagree on norm (\"group\" vs \"batch\")"),
    (dict(lr=0.5), "disagree on lr (0.5 vs 0.05)"),
])
def test_every_reader_refuses_a_run_whose_config_was_edited(run, tmp_path, capsys, argv, changes, message):
    # probe and ablate used the checkpoint's copy where inspect, report and findings refused the run; GN7 on
    # 16-channel layers was accepted everywhere (findings listed a group "GN7"); norm_groups 1e30 too.
    edited = _edited(run, tmp_path, **changes)
    before = sorted(p.name for p in edited.iterdir())
    code, _, err = run_cli(capsys, *[a.format(run=edited, tmp=tmp_path) for a in argv])
    assert_one_line_error(code, err, message)
    assert sorted(p.name for p in edited.iterdir()) == before
    assert not any(p.suffix in (".h5", ".safetensors") for p in tmp_path.iterdir())


@pytest.mark.parametrize("command", ["report", "findings"])
def test_report_and_findings_skip_a_run_whose_config_and_checkpoint_disagree(run, tmp_path, capsys, command):
    """A config.json edited to a valid other setting: the report and the findings read the checkpoint's copy too
    (inertly, no torch) and skip the run with the line every other reader gives, not report it as another run."""
    edited = _edited(run, tmp_path, lr=0.5)
    argv = [command, edited.parent] + (["-o", tmp_path / "r.html"] if command == "report" else [])
    code, out, err = run_cli(capsys, *argv)
    assert "disagree on lr (0.5 vs 0.05)" in " ".join((out + err).split())


@pytest.mark.parametrize("command", ["report", "findings"])
def test_report_and_findings_skip_a_run_with_groups_that_do_not_divide(run, tmp_path, capsys, command):
    edited = _edited(run, tmp_path, norm="group", norm_groups=7)
    argv = [command, edited.parent] + (["-o", tmp_path / "r.html"] if command == "report" else [])
    code, out, err = run_cli(capsys, *argv)
    assert "--norm-groups 7 does not divide a layer's 16 channels" in out + err
    assert "GN7" not in out


def test_the_torch_free_group_check_agrees_with_the_models():
    for model in [m for m in list_models() if m in ("resnet8", "resnet50", "convs25", "vgg14")]:
        for width in (1, 3):
            for groups in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 65, 96, 128, 192, 256, 300):
                config = TrainConfig(model=model, width=width, norm="group", norm_groups=groups, dataset="digits")
                try:
                    check_groups(model, width, groups)
                    torch_free = True
                except BnprobeError:
                    torch_free = False
                try:
                    check_model(config)
                    built = True
                except BnprobeError:
                    built = False
                assert torch_free == built, (model, width, groups)


@pytest.mark.parametrize("key, value", [("test_acc", float("nan")), ("test_loss", float("inf")), ("gap", "text")])
def test_a_history_with_nan_is_refused_before_resume_writes_anything(run, tmp_path, capsys, key, value):
    # A checkpoint whose history held test_acc NaN was resumed, and metrics.json then held a bare NaN (no JSON).
    import torch

    edited = _edited(run, tmp_path)
    state = torch.load(edited / "checkpoint.pt", weights_only=True)
    state["history"][0][key] = value
    torch.save(state, edited / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in edited.iterdir() if p.is_file()}
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "digits", "--epochs", "2", "--batch-size", "64",
                           "--subset", "300", "--test-subset", "200", "--milestones", "", "--device", "cpu",
                           "--eval-batch-size", "200", "--lr", "0.05", "--runs-dir", edited.parent, "--name",
                           edited.name, "--resume", "--no-download")
    assert_one_line_error(code, err, f"'history' row 1 has {key} = ")
    assert "not a finite number" in err
    assert {p.name: p.read_bytes() for p in edited.iterdir() if p.is_file()} == before
    code, _, err = run_cli(capsys, "probe", edited, "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, f"'history' row 1 has {key} = ")


def test_metrics_json_is_written_as_strict_json(tmp_path):
    from bnprobe.files.runs import write_json

    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", [{"test_acc": float("nan")}])
    assert not (tmp_path / "m.json").exists()
