"""`bnprobe diff A B` (issue 33): every number against a direct computation on the saved tensors, layers matched
by name across prefixes, a mismatch in one line, and a real run before and after training: a BN-only run's γ and
β move, a run with BatchNorm frozen keeps them exactly (its running statistics still move)."""

from __future__ import annotations

import json

import h5py
import jsonschema
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from safetensors.numpy import save_file
from test_check_cli import schema

from bnprobe.core.config import TrainConfig
from bnprobe.files.compact import regenerate

C, H = 12, 20


def model(seed: int) -> dict[str, np.ndarray]:
    """Two BatchNorm layers, a LayerNorm (weight and bias) and an RMSNorm (weight alone), with a conv."""
    rng = np.random.default_rng(seed)
    state = {"conv.weight": rng.normal(size=(C, 3, 3, 3)).astype(np.float32)}
    for name in ("bn1", "bn2"):
        state.update({f"{name}.weight": rng.uniform(0.5, 1.5, C), f"{name}.bias": rng.normal(0, 0.2, C),
                      f"{name}.running_mean": rng.normal(0, 1, C), f"{name}.running_var": rng.uniform(0.5, 2, C)})
    state.update({"blocks.0.norm.weight": rng.uniform(0.5, 1.5, H), "blocks.0.norm.bias": rng.normal(0, 0.2, H),
                  "blocks.0.rms_norm.weight": rng.uniform(0.5, 1.5, H)})
    return {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}


def by_hand(a: dict, b: dict, prefix: str, off: float = 0.01, factor: float = 10.0) -> dict:
    ga, gb = (x[f"{prefix}.weight"].astype(np.float64) for x in (a, b))
    row = {"rel_gamma": np.linalg.norm(gb - ga) / np.linalg.norm(ga), "channels": ga.size,
           "delta_gamma": np.linalg.norm(gb - ga),
           "gamma_corr": np.corrcoef(ga, gb)[0, 1],
           "turned_off": [i for i in range(ga.size) if abs(gb[i]) < off <= abs(ga[i])],
           "turned_on": [i for i in range(ga.size) if abs(ga[i]) < off <= abs(gb[i])]}
    deltas = {"gamma": np.abs(gb - ga)}
    if f"{prefix}.bias" in a:
        ba, bb = (x[f"{prefix}.bias"].astype(np.float64) for x in (a, b))
        row["rel_beta"] = np.linalg.norm(bb - ba) / np.linalg.norm(ba)
        row["delta_beta"] = np.linalg.norm(bb - ba)
        deltas["beta"] = np.abs(bb - ba)
    param = max(deltas, key=lambda p: deltas[p].max())
    row.update(max_abs_delta=deltas[param].max(), max_at_param=param, max_at_dim=int(deltas[param].argmax()))
    if f"{prefix}.running_var" in a:
        for leaf in ("running_mean", "running_var"):
            x, y = (s[f"{prefix}.{leaf}"].astype(np.float64) for s in (a, b))
            row[f"rel_{leaf}"] = np.linalg.norm(y - x) / np.linalg.norm(x)
    outliers = [{i for i in range(g.size) if abs(g[i]) > factor * np.median(np.abs(g))} for g in (ga, gb)]
    row["outliers_appeared"] = sorted(outliers[1] - outliers[0])
    row["outliers_vanished"] = sorted(outliers[0] - outliers[1])
    return row


def test_every_number_against_the_tensors(tmp_path, capsys):
    a, b = model(0), model(0)
    rng = np.random.default_rng(5)
    for name in b:
        if not name.startswith("conv"):
            b[name] = (b[name] + rng.normal(0, 0.1, b[name].shape)).astype(np.float32)
    b["bn2.weight"][[1, 4]] = 0.001  # turned off
    a["blocks.0.norm.weight"][3] = 0.0  # ... and one turned on
    b["blocks.0.rms_norm.weight"][7] = 40.0  # an outlier appeared
    save_file({f"module.{k}": v for k, v in a.items()}, str(tmp_path / "a.safetensors"))  # DDP's prefix: stripped
    save_file(b, str(tmp_path / "b.safetensors"))
    code, out, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    jsonschema.validate(document, schema("bnprobe-diff"))
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert sorted(layers) == ["blocks.0.norm", "blocks.0.rms_norm", "bn1", "bn2"]  # in depth order: blocks first
    for name, layer in layers.items():
        expected = by_hand(a, b, name)
        for key, value in expected.items():
            assert layer[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), (name, key)
    assert layers["blocks.0.rms_norm"]["rel_beta"] is None and layers["bn1"]["rel_running_var"] is not None
    assert layers["blocks.0.norm"]["rel_running_mean"] is None
    assert layers["bn2"]["turned_off"] == [1, 4] and layers["blocks.0.norm"]["turned_on"] == [3]
    assert layers["blocks.0.rms_norm"]["outliers_appeared"] == [7]
    ranked = sorted(layers, key=lambda n: -layers[n]["rel_gamma"])
    assert document["changed_most"] == ranked
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 0 and "γ changed most in blocks.0.rms_norm" in out  # 4 layers: no table of the top 10


def test_identical_checkpoints_changed_nothing(tmp_path, capsys):
    save_file(model(1), str(tmp_path / "a.safetensors"))
    save_file(model(1), str(tmp_path / "b.safetensors"))
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--format", "json")
    document = json.loads(out)
    assert code == 0 and document["changed_most"] == []
    assert all(layer["rel_gamma"] == 0 and layer["max_abs_delta"] == 0 and layer["max_at_param"] is None
               and layer["gamma_corr"] == pytest.approx(1.0) for layer in document["layers"])


def test_a_mismatch_is_one_line_naming_the_first_differences(tmp_path, capsys):
    save_file(model(0), str(tmp_path / "a.safetensors"))
    other = model(0)
    other["bn3.weight"], other["bn3.bias"] = other.pop("bn2.weight"), other.pop("bn2.bias")
    other["bn3.running_mean"], other["bn3.running_var"] = other.pop("bn2.running_mean"), other.pop("bn2.running_var")
    save_file(other, str(tmp_path / "b.safetensors"))
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert_one_line_error(code, err, "a and b are not one architecture (4 and 4 norm layers; only in a: bn2; only in "
                                     "b: bn3)")
    wider = model(0)
    wider["blocks.0.rms_norm.weight"] = np.ones(H + 1, np.float32)
    save_file(wider, str(tmp_path / "wide.safetensors"))
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "wide.safetensors")
    assert_one_line_error(code, err, f"blocks.0.rms_norm is RMSNorm-like of {H} channels in a, RMSNorm-like of "
                                     f"{H + 1} in wide")
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "nowhere.pt")
    assert_one_line_error(code, err, "no such checkpoint")
    code, _, err = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "a.safetensors", "--format", "csv")
    assert_one_line_error(code, err, "--format must be text or json")


@pytest.mark.parametrize("freeze, moves", [("non-bn", True), ("bn", False)])
def test_a_run_before_and_after_training(tmp_path, capsys, freeze, moves):
    """Trained with the CLI; its initial state rebuilt from the run's config and seed, as training drew it."""
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "resnet8", "--dataset", "digits", "--freeze", freeze, "--epochs", "1",
                           "--subset", "256", "--test-subset", "100", "--batch-size", "64", "--device", "cpu",
                           "--milestones", "", "--lr", "0.2", "--name", "run", "--runs-dir", tmp_path)
    assert code == 0, err
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()), "config")
    initial, _, _ = regenerate(config)
    torch.save(initial, tmp_path / "init.pt")
    code, out, err = run_cli(capsys, "diff", tmp_path / "init.pt", run, "--format", "json")
    assert code == 0, err
    layers = json.loads(out)["layers"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    assert [layer["name"] for layer in layers] == [n.removesuffix(".running_var") for n in state
                                                   if n.endswith(".running_var")]
    for layer in layers:
        g0, g1 = (s[f"{layer['name']}.weight"].double().numpy() for s in (initial, state))
        assert layer["rel_gamma"] == pytest.approx(np.linalg.norm(g1 - g0) / np.linalg.norm(g0), rel=1e-9)
        b0, b1 = (s[f"{layer['name']}.bias"].double().numpy() for s in (initial, state))
        assert layer["delta_beta"] == pytest.approx(np.linalg.norm(b1 - b0), rel=1e-9, abs=1e-12)
        assert (layer["rel_gamma"] > 0) == moves and (layer["delta_beta"] > 0) == moves
        assert layer["rel_beta"] is None if moves else layer["rel_beta"] == 0  # β starts at 0: no relative change
        assert layer["rel_running_var"] > 0  # the statistics move either way: they are not parameters
    # --from-init rebuilds the same initial state itself; checked against what training recorded at epoch 0
    code, out, err = run_cli(capsys, "diff", run, "--from-init", "--format", "json")
    assert code == 0, err
    document = json.loads(out)
    assert document["a"]["file_format"] == "bnprobe run at initialisation"
    with h5py.File(run / "telemetry.h5") as f:
        assert f["bn/epoch"][0] == 0
        for layer in document["layers"]:
            g0, g1 = f[f"bn/{layer['name']}/gamma"][0].astype(np.float64), state[f"{layer['name']}.weight"].double()
            b0, b1 = f[f"bn/{layer['name']}/beta"][0].astype(np.float64), state[f"{layer['name']}.bias"].double()
            assert layer["rel_gamma"] == pytest.approx(np.linalg.norm(g1.numpy() - g0) / np.linalg.norm(g0), rel=1e-6)
            assert layer["delta_beta"] == pytest.approx(np.linalg.norm(b1.numpy() - b0), rel=1e-6, abs=1e-12)
    # check reads the run, its export and the rebuilt initial state alike (a fresh model: its BN statistics at
    # init; its γ are drawn uniform, Frankle et al.'s init, so not the 1 of BNP402)
    code, _, err = run_cli(capsys, "export", run, "-o", tmp_path / "run.safetensors", "--compact")
    assert code == 0, err
    for path in (run, tmp_path / "run.safetensors"):
        code, out, err = run_cli(capsys, "check", path, "--format", "json", "--fail-on", "warning")
        assert code == 0 and json.loads(out)["summary"]["findings"] == 0, (path, out, err)
    code, out, _ = run_cli(capsys, "check", tmp_path / "init.pt", "--format", "json", "--fail-on", "warning")
    codes = {x["code"] for x in json.loads(out)["files"][0]["findings"]}
    assert code == 1 and codes == {"BNP401"}
    code, _, err = run_cli(capsys, "diff", tmp_path / "init.pt", "--from-init")
    assert_one_line_error(code, err, "--from-init needs a bnprobe run")
    code, _, err = run_cli(capsys, "diff", run, run, "--from-init")
    assert_one_line_error(code, err, "give two checkpoints A B, or one bnprobe run with --from-init")


def test_the_layers_that_changed_most_in_a_deep_model(tmp_path, capsys):
    rng = np.random.default_rng(2)
    a = {f"blocks.{k}.norm.weight": rng.uniform(0.5, 1.5, H).astype(np.float32) for k in range(14)}
    b = {name: (g * (1 + 0.01 * k)).astype(np.float32) for k, (name, g) in enumerate(a.items())}  # grows with depth
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--format", "json")
    expected = sorted(a, key=lambda n: -np.linalg.norm(b[n].astype(np.float64) - a[n]) / np.linalg.norm(a[n]))
    assert json.loads(out)["changed_most"] == [n.removesuffix(".weight") for n in expected[:10]]
    assert expected[0] == "blocks.13.norm.weight" and expected[-1] == "blocks.0.norm.weight"
    code, out, _ = run_cli(capsys, "diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert code == 0 and "Changed most" in out and "13 of 14 norm layers changed" in out


def test_output_replaces_only_a_report(tmp_path, capsys):
    save_file(model(0), str(tmp_path / "a.safetensors"))
    save_file(model(1), str(tmp_path / "b.safetensors"))
    ab = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for output_format, name in (("json", "d.json"), ("text", "d.txt")):
        assert run_cli(capsys, "diff", *ab, "--format", output_format, "-o", tmp_path / name)[0] == 0
        first = (tmp_path / name).read_text()
        assert run_cli(capsys, "diff", *ab, "--format", output_format, "-o", tmp_path / name)[0] == 0
        assert (tmp_path / name).read_text() == first
    assert json.loads((tmp_path / "d.json").read_text())["format"] == "bnprobe-diff"
    assert "norm layers changed" in (tmp_path / "d.txt").read_text()
    (tmp_path / "notes.txt").write_text("my notes\n")
    code, _, err = run_cli(capsys, "diff", *ab, "-o", tmp_path / "notes.txt")
    assert_one_line_error(code, err, "will not replace")
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_the_report_shows_diff_files(tmp_path, capsys):
    from test_static import report_section

    results = tmp_path / "results"
    results.mkdir()
    a, b = model(0), model(0)
    b["bn2.weight"] = (b["bn2.weight"] * 1.5).astype(np.float32)
    b["bn1.weight"][[2, 3]] = 0.0
    save_file(a, str(tmp_path / "before.safetensors"))
    save_file(b, str(tmp_path / "after.safetensors"))
    code, _, err = run_cli(capsys, "diff", tmp_path / "before.safetensors", tmp_path / "after.safetensors", "--format",
                           "json", "-o", results / "tuned.diff.json")
    assert code == 0, err
    (results / "broken.diff.json").write_text('{"format": "bnprobe-diff", "version": 1, "layers": 3}')
    out, _, section = report_section(capsys, results, tmp_path, '<section class="probes" id="diffs">')
    section = " ".join(section.split())
    assert "before → after" in section and "tuned.diff.json" in section
    ga, gb = (x["bn2.weight"].astype(np.float64) for x in (a, b))
    g1a, g1b = (x["bn1.weight"].astype(np.float64) for x in (a, b))
    rel2, rel1 = np.linalg.norm(gb - ga) / np.linalg.norm(ga), np.linalg.norm(g1b - g1a) / np.linalg.norm(g1a)
    assert f"bn2 ({rel2:.4g}), bn1 ({rel1:.4g})" in section  # the larger first
    assert "<td>4</td><td>2</td><td>2</td> <td>0</td>" in section  # layers, changed, turned off, on
    assert "broken.diff.json" in out and "layers must be a list" in out
