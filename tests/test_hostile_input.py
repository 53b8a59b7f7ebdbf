"""Hostile input from issue 11 (items 6, 9, 11-15): each answer is one line and exit 2, never a hang, a
traceback or a silent exit, and nothing on disk is lost."""

from __future__ import annotations

import time

from cli_helpers import assert_one_line_error, run_cli


def test_a_range_of_thirty_million_values_is_refused_at_once(tmp_path, capsys):
    # It ran 120 s to 3.7 GB with no output.
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "--taus", "0:1:30000000")
    assert_one_line_error(code, err, "COUNT of '0:1:30000000' must be in [1, 10,000]")
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "--taus", "0:1:6000,1:2:6000")
    assert_one_line_error(code, err, "more than 10,000 values")
    assert time.perf_counter() - started < 2
    assert not (tmp_path / "r.html").exists()


def test_a_model_factory_calling_sys_exit_is_an_error_not_a_silent_success(tmp_path, capsys):
    import torch

    torch.save({"fc.weight": torch.zeros(10, 64)}, tmp_path / "foreign.pt")
    (tmp_path / "factory.py").write_text("import sys\ndef make():\n    sys.exit(0)\n")
    (tmp_path / "at_import.py").write_text("import sys\nsys.exit(0)\ndef make():\n    pass\n")
    for spec, message in [("factory.py:make", "make() raised SystemExit: 0"),
                          ("at_import.py:make", "failed: SystemExit: 0")]:
        code, _, err = run_cli(capsys, "probe", tmp_path / "foreign.pt", "--model", f"{tmp_path}/{spec}",
                               "--dataset", "digits", "--out", tmp_path / "p.h5")
        assert_one_line_error(code, err, message)
