"""What a refused or odd command says and leaves (issue 30, items 6, 7 and 13): a refused export leaves no
folder behind; a Hugging Face folder is named as one; messages that named the wrong thing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import tiny_config, trained_runs
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_runs(tmp_path_factory)["full"]


def test_a_refused_export_leaves_no_folder_behind(run, tmp_path, capsys):
    # export d/r -o d/r/newdir/../x.safetensors made d/r/newdir, and train --overwrite then refused the run.
    copy = tmp_path / "d" / "r"
    shutil.copytree(run, copy)
    before = sorted(p.name for p in copy.iterdir())
    code, _, err = run_cli(capsys, "export", copy, "-o", copy / "newdir" / ".." / "x.safetensors")
    assert_one_line_error(code, err, "inside run directory")
    assert sorted(p.name for p in copy.iterdir()) == before
    code, _, err = run_cli(capsys, "report", copy, "-o", copy / "newdir" / ".." / "r.html")
    assert code == 2 and sorted(p.name for p in copy.iterdir()) == before, err


@pytest.fixture
def hf_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"model.norm.weight": torch.ones(8), "model.layers.0.input_layernorm.weight": torch.ones(8)},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model.safetensors",
                        "model.layers.0.input_layernorm.weight": "model.safetensors"}}))
    return folder


@pytest.mark.parametrize("target", ["", "model.safetensors.index.json", "model.safetensors"])
@pytest.mark.parametrize("command", ["inspect", "export"])
def test_a_hugging_face_folder_is_named_as_one(hf_folder, tmp_path, capsys, command, target):
    # inspect said "config: unknown config keys: model_type", export that the index "is not a PyTorch checkpoint".
    path = hf_folder / target if target else hf_folder
    extra = ["-o", tmp_path / "x.safetensors"] if command == "export" else []
    code, _, err = run_cli(capsys, command, path, *extra)
    assert_one_line_error(code, err, f"{path} is a Hugging Face model, not a bnprobe run: {command} takes a run "
                                     f"directory (runs/<name>); `bnprobe probe {path}` reads its normalisation layers")
    code, out, err = run_cli(capsys, "probe", path, "--brief", "--out", tmp_path / "p.h5")
    assert code == 0, err


def test_ablate_without_folding_says_so(run, tmp_path, capsys):
    # It printed "pairs found by off".
    code, out, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--no-fold", "--no-train",
                             "--test-subset", "50", "--device", "cpu", "--out", tmp_path / "a.h5")
    assert code == 0, err
    text = " ".join(out.split())
    assert "found by off" not in text and "No layer folded (--no-fold): all 9 norm layers masked on the layer" in text


def test_norm_groups_without_group_norm_is_said(tmp_path, capsys, monkeypatch):
    # --norm batch --norm-groups 3 was accepted without a word. (Refused after the warning: no data offline.)
    monkeypatch.setenv("BNPROBE_DATA_DIR", str(tmp_path / "nodata"))
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "mnist", "--no-download", "--norm-groups", "3",
                           "--runs-dir", tmp_path / "r", "--epochs", "1")
    assert err.splitlines()[0] == ("bnprobe: warning: --norm-groups 3 has no effect with --norm batch (only "
                                   "GroupNorm, --norm group, has groups)")


def test_resuming_with_another_norm_lists_no_groups(run, tmp_path, capsys):
    # Resuming a GroupNorm run with --norm layer listed "norm_groups: stored 4 vs given 16".
    copy = tmp_path / "runs" / "x"
    shutil.copytree(run, copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)  # the run's settings said GroupNorm of 4 groups
    state["config"].update(norm="group", norm_groups=4)
    torch.save(state, copy / "checkpoint.pt")
    (copy / "config.json").write_text(json.dumps(state["config"]))
    config = tiny_config()
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "digits", "--epochs", str(config.epochs),
                           "--batch-size", "64", "--subset", "300", "--test-subset", "200", "--milestones", "",
                           "--device", "cpu", "--eval-batch-size", "200", "--lr", "0.05", "--norm", "layer",
                           "--runs-dir", copy.parent, "--name", "x", "--resume")
    assert_one_line_error(code, err, "settings differ (norm: stored 'group' vs given 'layer')")
    assert "norm_groups" not in err
