"""Hostile sweep plans (issue 30, items 2 and 3): a plan is counted from its lists' lengths before any value is
checked or any run built, a plan file's size is capped, and --max-runs has an upper bound."""

from __future__ import annotations

import time

import pytest
from cli_helpers import assert_one_line_error, run_cli

from bnprobe.core.errors import BnprobeError
from bnprobe.sweep.plan import MAX_PLAN_BYTES, MAX_RUNS_LIMIT, read_plan


def _write(path, text):
    path.write_text(text)
    return path


def test_a_hundred_thousand_seeds_are_counted_before_any_is_checked(tmp_path, capsys):
    # 1,000,000 seeds took 100-120 s to be refused: each was checked as a run first.
    seeds = ", ".join(str(s) for s in range(100_000))
    plan = _write(tmp_path / "p.toml", f"[defaults]\nseeds = [{seeds}]\n[[grid]]\nmodel = 'resnet8'\n"
                                       f"lr = [{', '.join(str(0.1 + i / 1e6) for i in range(3))}]\n")
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "sweep", plan, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert_one_line_error(code, err, "plans 300,000 runs, more than the limit of 10,000; at most 100,000 can be planned")
    assert time.perf_counter() - started < 10  # counted, not checked one by one (a bound, not a speed test)
    assert not (tmp_path / "runs").exists()


def test_values_are_counted_before_a_bad_one_is_looked_for(tmp_path):
    # A bad value far down a long list: the count answers first, at once.
    lrs = ", ".join(["0.1"] * 20_000 + ["-1.0"])
    plan = _write(tmp_path / "p.toml", f"[[grid]]\nmodel = 'resnet8'\nlr = [{lrs}]\n")
    with pytest.raises(BnprobeError, match="plans 20,001 runs, more than the limit of 10,000"):
        read_plan(plan, tmp_path / "runs")


def test_a_plan_file_over_the_size_cap_is_refused_before_it_is_parsed(tmp_path, capsys):
    plan = _write(tmp_path / "p.toml", "[[grid]]\nmodel = 'resnet8'\n" + "#" * MAX_PLAN_BYTES + "\n")
    code, _, err = run_cli(capsys, "sweep", plan, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert_one_line_error(code, err, f"is larger than a plan's limit of {MAX_PLAN_BYTES:,} bytes")


def test_a_fifo_as_plan_is_refused_not_waited_on(tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "p.toml")
    code, _, err = run_cli(capsys, "sweep", tmp_path / "p.toml", "--dry-run")
    assert_one_line_error(code, err, "is not a plan file (not a regular file)")


@pytest.mark.parametrize("value", ["1000000000000", str(2**70), "0", "-5"])
def test_max_runs_is_bounded(tmp_path, capsys, value):
    # --max-runs 1000000000000 --dry-run built 1e12 runs in memory (1.8 GB and growing at 120 s).
    plan = _write(tmp_path / "p.toml", "[[grid]]\nmodel = 'resnet8'\nseed = [1, 2]\n")
    code, _, err = run_cli(capsys, "sweep", plan, "--max-runs", value, "--dry-run", "--runs-dir", tmp_path / "r")
    assert_one_line_error(code, err, "--max-runs must be")
    assert (f"at most {MAX_RUNS_LIMIT:,}" in err) == (int(value) > 0)
    with pytest.raises(BnprobeError, match="--max-runs must be"):
        read_plan(plan, tmp_path / "r", max_runs=int(value))


def test_a_huge_product_of_lists_is_counted_not_expanded(tmp_path):
    # 40 lists of 2: 2**40 runs, a number of runs no memory holds; refused from the lengths alone.
    grid = "".join(f"{name} = [{a}, {b}]\n" for name, a, b in [
        ("lr", 0.1, 0.2), ("momentum", 0.8, 0.9), ("weight_decay", 0.0, 1e-4), ("gamma_l1", 0.0, 1e-5),
        ("bn_l2", 0.0, 1e-5), ("lr_drop", 0.1, 0.2), ("subset", 100, 200), ("test_subset", 100, 200)])
    plan = _write(tmp_path / "p.toml", f"[defaults]\nseeds = [{', '.join(map(str, range(100)))}]\n"
                                       f"[[grid]]\nmodel = ['resnet8', 'resnet14']\n{grid}")
    started = time.perf_counter()
    with pytest.raises(BnprobeError, match="plans 51,200 runs, more than the limit of 50,000; pass --max-runs 51200"):
        read_plan(plan, tmp_path / "runs", max_runs=50_000)
    assert time.perf_counter() - started < 5
