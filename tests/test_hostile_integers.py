"""Integers past 2**63 (issue 30, item 4): every integer setting has a range, checked before anything is written,
the same from the command line, config.json, a checkpoint's config and a plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.core.config import INT_RANGES, TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.sweep.plan import read_plan

HUGE = 2**63

TRAIN_FLAGS = ["--norm-groups", "--bn-every", "--telemetry-every", "--subset", "--test-subset", "--batch-size",
               "--eval-batch-size", "--train-eval-subset", "--random-features", "--translate", "--width", "--epochs"]


def test_every_integer_setting_has_a_range():
    ints = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "Optional[int]")}
    assert ints == set(INT_RANGES)
    assert all(0 <= low < high < 2**63 for low, high in INT_RANGES.values())


@pytest.mark.parametrize("flag", TRAIN_FLAGS)
def test_a_huge_integer_flag_is_one_line_and_makes_no_run_folder(tmp_path, capsys, flag):
    # It ended in an h5py TypeError traceback after r/NAME/config.json was written; --norm-groups 2**63 trained.
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "digits", "--no-download", "--runs-dir",
                           tmp_path / "r", "--name", "x", "--epochs" if flag != "--epochs" else "--lr", "1", flag,
                           str(HUGE))
    assert_one_line_error(code, err, f"{flag} must be at most")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", sorted(INT_RANGES))
def test_the_same_range_from_every_source(tmp_path, name):
    low, high = INT_RANGES[name]
    flag = f"--{name.replace('_', '-')}"
    for value in (high + 1, HUGE, 10**5000):  # a 5,000-digit number is past what Python prints
        with pytest.raises(BnprobeError, match=f"config.json: {flag} must be"):
            TrainConfig.from_dict({name: value}, "config.json")
        with pytest.raises(BnprobeError, match=f"{flag} must be"):
            TrainConfig(**{name: value}).check()
    plan = tmp_path / "p.toml"
    plan.write_text(f"[[grid]]\nmodel = 'resnet8'\ndataset = 'digits'\n{name} = {HUGE - 1}\n")
    with pytest.raises(BnprobeError, match=f"{flag} must be"):
        read_plan(plan, tmp_path / "runs")
    TrainConfig.from_dict({name: high}, "config.json")  # the bound itself holds


def test_a_run_config_with_a_huge_integer_is_refused_by_its_readers(tmp_path, capsys):
    run = tmp_path / "r" / "x"
    run.mkdir(parents=True)
    config = TrainConfig(model="resnet8", dataset="digits", epochs=2).resolved().to_dict()
    (run / "config.json").write_text(json.dumps({**config, "norm_groups": HUGE}))
    code, _, err = run_cli(capsys, "inspect", run)
    assert_one_line_error(code, err, "--norm-groups must be at most 65,536, got 9,223,372,036,854,775,808")
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_probe_and_ablate_integers_are_bounded_before_anything_is_written(tmp_path, capsys):
    torch.save({"bn.weight": torch.rand(8), "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8),
                "bn.running_var": torch.ones(8)}, tmp_path / "bn.pt")
    for argv, message in [
        (["probe", tmp_path / "bn.pt", "--images", str(HUGE)], "--images must be at most 1,000,000,000"),
        (["probe", tmp_path / "bn.pt", "--batch-size", str(HUGE)], "--batch-size must be at most"),
        (["probe", tmp_path / "bn.pt", "--images", "-1"], "--images must be >= 0, got -1"),
        (["ablate", tmp_path / "bn.pt", "--clamp-gamma", "0.1", "--test-subset", str(HUGE)], "--test-subset must be"),
        (["ablate", tmp_path / "bn.pt", "--clamp-gamma", "0.1", "--train-subset", str(HUGE)], "--train-subset must"),
        (["ablate", tmp_path / "bn.pt", "--clamp-gamma", "0.1", "--batch-size", str(HUGE)], "--batch-size must"),
    ]:
        code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "out.h5")
        assert_one_line_error(code, err, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.pt"]
