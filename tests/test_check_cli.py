"""`bnprobe check` and `bnprobe rules` as a user runs them (issue 33): exit statuses, the config file found
upwards (and hostile ones), --select/--ignore/--set, folders, --output written atomically, the JSON validated
against docs/check-schema.md and the SARIF against the SARIF 2.1.0 schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from safetensors.numpy import save_file
from test_check_rules import _202, _302, _401, bn_state

ROOT = Path(__file__).resolve().parents[1]
SARIF_SCHEMA = ROOT.parent / "shared" / "specs" / "sarif-schema-2.1.0.json"


def schema(title: str) -> dict:
    """The JSON schema of that title in docs/check-schema.md."""
    for block in re.findall(r"```json\n(.*?)```", (ROOT / "docs" / "check-schema.md").read_text(), re.S):
        document = json.loads(block)
        if document["title"] == title:
            return document
    raise AssertionError(f"no schema {title} in docs/check-schema.md")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A healthy checkpoint, one with warnings only (a recurring outlier), one with an error (BN statistics at
    init), in tmp_path, which is also the current folder (so no pyproject.toml of the repository is found)."""
    monkeypatch.chdir(tmp_path)
    save_file(bn_state(), str(tmp_path / "ok.safetensors"))
    save_file(_202(False), str(tmp_path / "warn.safetensors"))
    save_file(_401(False), str(tmp_path / "error.safetensors"))
    return tmp_path


def test_exit_status_follows_fail_on(files, capsys):
    assert run_cli(capsys, "check", "ok.safetensors")[0] == 0
    code, out, _ = run_cli(capsys, "check", "warn.safetensors")
    assert code == 0 and "BNP202" in out and "passes --fail-on error" in out
    assert run_cli(capsys, "check", "warn.safetensors", "--fail-on", "warning")[0] == 1
    code, out, _ = run_cli(capsys, "check", "ok.safetensors", "error.safetensors")
    assert code == 1 and "BNP401" in out and "error.safetensors" in out and "no findings" in out
    assert run_cli(capsys, "check", "error.safetensors", "--fail-on", "never")[0] == 0
    assert run_cli(capsys, "check", "error.safetensors", "--ignore", "BNP4")[0] == 0
    assert run_cli(capsys, "check", "error.safetensors", "--select", "BNP1,BNP2")[0] == 0
    assert run_cli(capsys, "check", "error.safetensors", "--select", "BNP", "--ignore", "BNP4", "--fail-on",
                   "note")[0] == 0


@pytest.mark.parametrize("argv, pattern", [
    (["check", "missing.safetensors"], "no such checkpoint"),
    (["check", "ok.safetensors", "--select", "XYZ"], "no rule code starts with 'XYZ'"),
    (["check", "ok.safetensors", "--ignore", ","], "a rule code must be text"),
    (["check", "ok.safetensors", "--format", "xml"], "--format must be one of"),
    (["check", "ok.safetensors", "--fail-on", "fatal"], "--fail-on must be one of"),
    (["check", "ok.safetensors", "--set", "BNP101.max_fraction=2"], "BNP101.max_fraction must be between 0 and 1"),
    (["check", "ok.safetensors", "--set", "BNP101.nope=2"], "has no threshold 'nope'"),
    (["check", "ok.safetensors", "--set", "BNP101=2"], "--set takes CODE.threshold=value"),
    (["check", "ok.safetensors", "--set", "BNP202.min_layers=2.5"], "must be a whole number"),
    (["check", "ok.safetensors", "--set", "BNP303.min_var=nan"], "must be a finite number"),
    (["check", "ok.safetensors", "--config", "nowhere.toml"], "no such file"),
    (["check"], "give at least one PATH"),
    (["rules", "BNP999"], "no rule 'BNP999'"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, pattern):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, pattern)


def test_set_changes_a_threshold(files, capsys):
    state = bn_state()
    state["features.1.bn.weight"][:6] = 0.0  # 37.5% off: under the default 50%
    save_file(state, str(files / "some-off.safetensors"))
    assert "BNP101" not in run_cli(capsys, "check", "some-off.safetensors")[1]
    code, out, _ = run_cli(capsys, "check", "some-off.safetensors", "--set", "BNP101.max_fraction=0.3",
                           "--fail-on", "warning")
    assert code == 1 and "BNP101" in out and "limit 30.0%" in out


def test_config_found_upwards_and_overridden_by_the_command_line(files, capsys, monkeypatch):
    (files / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.bnprobe.check]\nignore = ["BNP401"]\n'
                                          'fail-on = "warning"\n\n[tool.bnprobe.check.BNP202]\nmin_layers = 4\n')
    deep = files / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    # BNP401 ignored, BNP202 needs 4 layers (the file has 3): nothing, even at fail-on warning
    assert run_cli(capsys, "check", files / "error.safetensors", files / "warn.safetensors")[0] == 0
    assert run_cli(capsys, "check", files / "warn.safetensors", "--set", "BNP202.min_layers=3")[0] == 1
    code, out, _ = run_cli(capsys, "check", files / "error.safetensors", "--format", "json")
    document = json.loads(out)
    assert code == 0 and document["config"]["source"] == str(files / "pyproject.toml")
    assert document["config"]["ignore"] == ["BNP401"] and document["config"]["thresholds"]["BNP202"]["min_layers"] == 4
    # --select replaces the file's select, but its ignore stays (BNP401 is more specific than BNP4)
    assert run_cli(capsys, "check", files / "error.safetensors", "--select", "BNP4")[0] == 0
    other = files / "other.toml"
    other.write_text("[tool.bnprobe.check]\nselect = ['BNP3']\n")
    assert run_cli(capsys, "check", files / "error.safetensors", "--config", other)[0] == 0


@pytest.mark.parametrize("text, pattern", [
    ("[tool.bnprobe.check\n", "not valid TOML"),
    ("[tool.bnprobe]\ncheck = 3\n", "tool.bnprobe.check must be a table"),
    ("[tool.bnprobe.check]\nselect = 'BNP1'\n", "select must be a list of rule codes"),
    ("[tool.bnprobe.check]\nselect = [1]\n", "a rule code must be text"),
    ("[tool.bnprobe.check]\nfail-on = 'fatal'\n", "fail-on must be one of"),
    ("[tool.bnprobe.check]\ncolour = true\n", "unknown key 'colour'"),
    ("[tool.bnprobe.check]\nBNP101 = 0.3\n", "BNP101 must be a table of thresholds"),
    ("[tool.bnprobe.check.BNP101]\nmax_fraction = nan\n", "must be a finite number"),
    ("[tool.bnprobe.check.BNP101]\nmax_fraction = inf\n", "must be a finite number"),
    ("[tool.bnprobe.check.BNP101]\nmax_fraction = true\n", "must be a finite number"),
    ("[tool.bnprobe.check.BNP101]\nmax_fraction = '0.3'\n", "must be a finite number"),
    ("[tool.bnprobe.check.BNP301]\nlimit = 3\n", "has no threshold 'limit'"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML"),
    ("# " + "x" * (1 << 20) + "\n", "more than a config file may hold"),
    (b"\xff\xfe[tool]", "not UTF-8"),
])
def test_hostile_config_files(files, capsys, text, pattern):
    path = files / "pyproject.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(capsys, "check", "ok.safetensors")
    assert_one_line_error(code, err, pattern)


def test_a_pyproject_without_the_table_is_passed_over(files, capsys, monkeypatch):
    (files / "pyproject.toml").write_text("[tool.bnprobe.check]\nfail-on = 'never'\n")
    inner = files / "pkg"
    inner.mkdir()
    (inner / "pyproject.toml").write_text("[project]\nname = 'inner'\n")
    monkeypatch.chdir(inner)
    assert run_cli(capsys, "check", files / "error.safetensors")[0] == 0  # the outer file's fail-on


def test_folders_are_searched(files, capsys):
    nested = files / "models" / "deep"
    nested.mkdir(parents=True)
    save_file(_302(False), str(nested / "neg.safetensors"))
    (files / "models" / "notes.txt").write_text("not a checkpoint")
    code, out, _ = run_cli(capsys, "check", files / "models", "--format", "json")
    document = json.loads(out)
    assert code == 1 and [Path(f["path"]).name for f in document["files"]] == ["neg.safetensors"]
    empty = files / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "check", empty)
    assert_one_line_error(code, err, "a folder without checkpoints")


def test_json_matches_its_documented_schema(files, capsys):
    code, out, _ = run_cli(capsys, "check", "ok.safetensors", "warn.safetensors", "error.safetensors", "--format",
                           "json")
    document = json.loads(out)
    jsonschema.validate(document, schema("bnprobe-check"))
    assert code == 1 and document["summary"] == {"files": 3, "findings": 2, "error": 1, "warning": 1, "note": 0,
                                                 "failed": True}
    [finding] = document["files"][1]["findings"]
    assert finding["code"] == "BNP202" and finding["dims"] == [5] and finding["value"] == 3


def test_sarif_validates_against_sarif_2_1_0(files, capsys):
    if not SARIF_SCHEMA.is_file():
        pytest.skip(f"no SARIF schema at {SARIF_SCHEMA}")
    code, _, err = run_cli(capsys, "check", "warn.safetensors", "error.safetensors", "--format", "sarif",
                           "--output", "out.sarif")
    assert code == 1, err
    sarif = json.loads((files / "out.sarif").read_text())
    jsonschema.validate(sarif, json.loads(SARIF_SCHEMA.read_text()))
    run = sarif["runs"][0]
    rules = [rule["id"] for rule in run["tool"]["driver"]["rules"]]
    assert sarif["version"] == "2.1.0" and rules[0] == "BNP101" and len(rules) == 13
    results = run["results"]
    assert len(results) == 2 and {r["ruleId"] for r in results} == {"BNP202", "BNP401"}
    for r in results:
        assert rules[r["ruleIndex"]] == r["ruleId"] and r["level"] in ("error", "warning") and r["message"]["text"]
        [location] = r["locations"]
        assert location["physicalLocation"]["artifactLocation"]["uri"] in ("warn.safetensors", "error.safetensors")
        assert location["logicalLocations"][0]["name"].startswith("features.")
    assert len({r["partialFingerprints"]["bnprobeFinding/v1"] for r in results}) == 2


def test_output_is_replaced_atomically_and_kept_on_bad_input(files, capsys):
    out = files / "report.json"
    out.write_text('{"format": "someone-else"}')
    code, _, err = run_cli(capsys, "check", "ok.safetensors", "--format", "json", "-o", out)
    assert_one_line_error(code, err, "will not replace")
    code, _, err = run_cli(capsys, "check", "ok.safetensors", "-o", "ok.safetensors")  # a checkpoint: never
    assert_one_line_error(code, err, "will not replace")
    out.unlink()
    assert run_cli(capsys, "check", "ok.safetensors", "--format", "json", "-o", out)[0] == 0
    assert run_cli(capsys, "check", "ok.safetensors", "--format", "json", "-o", out)[0] == 0  # its own: replaced
    assert run_cli(capsys, "check", "ok.safetensors", "--format", "sarif", "-o", "r.sarif")[0] == 0
    assert run_cli(capsys, "check", "warn.safetensors", "--format", "sarif", "-o", "r.sarif")[0] == 0
    assert json.loads(out.read_text())["summary"]["findings"] == 0
    before = out.read_text()
    code, _, err = run_cli(capsys, "check", "missing.safetensors", "--format", "json", "-o", out)
    assert_one_line_error(code, err, "no such checkpoint")
    assert out.read_text() == before and not list(files.glob(".report.json.*"))
    assert run_cli(capsys, "check", "warn.safetensors", "-o", "report.txt")[0] == 0
    assert run_cli(capsys, "check", "warn.safetensors", "-o", "report.txt")[0] == 0
    text = (files / "report.txt").read_text()
    assert "BNP202" in text and "[" not in text.split("BNP202")[0]  # plain: no rich markup
    run = files / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "resnet8", "dataset": "digits"}))
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, err = run_cli(capsys, "check", "ok.safetensors", "-o", run / "check.txt")
    assert_one_line_error(code, err, "inside run directory")


def test_list_rules_and_rules_code(capsys):
    code, out, _ = run_cli(capsys, "check", "--list-rules")
    assert code == 0 and all(c in out for c in ("BNP101", "BNP203", "BNP501"))
    code, out, _ = run_cli(capsys, "rules", "bnp303")
    assert code == 0 and "tiny-running-var" in out and "min_var (default 1e-05)" in out and "Sources:" in out


def test_every_rule_is_documented_with_its_thresholds():
    from bnprobe.analysis.rules import RULES

    text = (ROOT / "docs" / "check-rules.md").read_text()
    for code, rule in RULES.items():
        section = text.split(f"### {code} ")[1].split("\n### ")[0]
        flat = " ".join(section.split())
        assert rule.name in section and f"Severity: **{rule.severity}**" in section and " ".join(rule.doc.split()) in flat
        assert all(f"`{name}` = {p.default:g}" in section for name, p in rule.params.items()), code
        assert all(" ".join(source.split()) in flat for source in rule.sources), code


def test_nan_values_are_null_in_json(files, capsys):
    state = bn_state()
    state["features.0.bn.weight"][:] = np.nan
    save_file(state, str(files / "nan.safetensors"))
    code, out, _ = run_cli(capsys, "check", "nan.safetensors", "--format", "json")
    document = json.loads(out)
    jsonschema.validate(document, schema("bnprobe-check"))
    assert code == 1 and [f["code"] for f in document["files"][0]["findings"]] == ["BNP301"]


def test_the_rules_table_reads_at_80_columns():
    """Every rule's name, summary and thresholds whole at a terminal's usual width: no cell cut to '…'."""
    from rich.console import Console

    from bnprobe.analysis.rules import RULES
    from bnprobe.reporting.check_output import rules_table

    console = Console(width=80, record=True, color_system=None)
    console.print(rules_table())
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert all(rule.name in text for rule in RULES.values())
