"""Hostile input from issue 11 (items 6, 9, 11-15): each answer is one line and exit 2, never a hang, a
traceback or a silent exit, and nothing on disk is lost."""

from __future__ import annotations

import os
import time

import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli


def test_a_range_of_thirty_million_values_is_refused_at_once(tmp_path, capsys):
    # It ran 120 s to 3.7 GB with no output.
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "--taus", "0:1:30000000")
    assert_one_line_error(code, err, "COUNT of '0:1:30000000' must be in [1, 10,000]")
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / "r.html", "--taus", "0:1:6000,1:2:6000")
    assert_one_line_error(code, err, "more than 10,000 values")
    assert time.perf_counter() - started < 30  # refused before any value is made (not a speed test: a loaded CI machine)
    assert not (tmp_path / "r.html").exists()


def test_a_hundred_million_histogram_bins_are_refused_at_once(tmp_path, capsys):
    # probe --bins 100000000 hung, at 7 GB after 40 s.
    torch.save({"bn.weight": torch.rand(8), "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8),
                "bn.running_var": torch.ones(8)}, tmp_path / "bn.pt")
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "probe", tmp_path / "bn.pt", "--bins", "100000000", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, "--bins must be in [1, 10,000], got 100,000,000")
    assert time.perf_counter() - started < 30 and not (tmp_path / "p.h5").exists()  # a bound, not a speed test
    code, _, err = run_cli(capsys, "probe", tmp_path / "bn.pt", "--bins", "10000", "--out", tmp_path / "p.h5")
    assert code == 0, err


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


def _mnist_copy(shared_data, tmp_path):
    import shutil

    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(shared_data / "MNIST" / "raw", raw)
    return raw


def _train_mnist(capsys, tmp_path):
    return run_cli(capsys, "train", "resnet8", "--dataset", "mnist", "--data-dir", tmp_path / "data",
                   "--no-download", "--epochs", "1", "--subset", "100", "--test-subset", "50", "--device", "cpu",
                   "--runs-dir", tmp_path / "runs", "--name", "m")


def test_a_truncated_mnist_gz_is_named_not_taken_for_ctrl_c(shared_data, tmp_path, capsys):
    raw = _mnist_copy(shared_data, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-100])
    code, _, err = _train_mnist(capsys, tmp_path)
    assert_one_line_error(code, err, f"{labels} is truncated")
    assert "interrupted" not in err
    labels.write_bytes(b"\x1f\x8b garbage")
    code, _, err = _train_mnist(capsys, tmp_path)
    assert_one_line_error(code, err, f"cannot read {labels}")


def test_an_mnist_gz_inflating_past_its_header_is_refused_after_reading_what_the_header_says(
        shared_data, tmp_path, capsys):
    # A 3 MB .gz that inflates to 3.3 GB: a 7.3 GB peak, and the message said "truncated".
    import gzip
    import struct
    import tracemalloc

    raw = _mnist_copy(shared_data, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    zeros = gzip.compress(bytes(64 << 20), compresslevel=9)  # 64 MiB in 64 KB; gzip members concatenate
    labels.write_bytes(labels.read_bytes() + zeros * 50)  # the 10,000 labels, then 3.3 GB more
    assert labels.stat().st_size < 4 << 20
    tracemalloc.start()
    try:
        code, _, err = _train_mnist(capsys, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(code, err, f"{labels} is longer than its header says ((10000,) = 10,000 bytes of data)")
    assert peak < 1 << 30  # MNIST itself is 55 MB
    labels.write_bytes(gzip.compress(b"\0\0\x08\x03" + struct.pack(">3I", 60000, 100000, 100000)))
    code, _, err = _train_mnist(capsys, tmp_path)
    assert_one_line_error(code, err, "its header announces (60000, 100000, 100000) = 600,000,000,000,000 bytes of "
                                     "data, more than an IDX file bnprobe reads (1,073,741,824)")


def test_any_eof_error_is_an_error_not_an_interrupt(tmp_path, capsys, monkeypatch):
    # click turns every EOFError into Abort, which read as Ctrl-C: "interrupted", rc 130.
    def ends_early(*args, **kwargs):
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr("bnprobe.sweep.plan.read_plan", ends_early)
    code, _, err = run_cli(capsys, "sweep", tmp_path / "plan.toml")
    assert_one_line_error(code, err, "a file ended early (Compressed file ended")


def test_an_mnist_label_of_99_is_refused_before_training(shared_data, tmp_path, capsys):
    import gzip

    raw = _mnist_copy(shared_data, tmp_path)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[8 + 5] = 99
    labels.write_bytes(gzip.compress(bytes(content)))
    code, _, err = _train_mnist(capsys, tmp_path)
    assert_one_line_error(code, err, "t10k-labels-idx1-ubyte.gz: label 99 is outside 0..9")
    assert not (tmp_path / "runs" / "m").exists()


def test_a_cifar_batch_of_the_wrong_size_is_one_line(tmp_path, capsys):
    import pickle

    import numpy as np

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    good = {"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 3]}
    for name, batch in (("data_batch_1", {"data": np.zeros((4, 3000), np.uint8), "labels": [0, 1, 2, 3]}),
                        ("test_batch", good)):
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    args = ("train", "resnet8", "--dataset", "cifar10", "--data-dir", tmp_path / "data", "--no-download",
            "--no-verify", "--epochs", "1", "--device", "cpu", "--runs-dir", tmp_path / "runs")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "data_batch_1: 'data' must be uint8 rows of 3072 pixels")
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1]},
                                                       protocol=2))
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "data_batch_1: 4 images but 2 labels")


def _tiny_run(tmp_path, name="r", **changes):
    from probe_helpers import tiny_config
    from rich.console import Console

    from bnprobe.training.train import train

    run = tmp_path / name
    train(tiny_config(epochs=1, **changes), run, console=Console(quiet=True))
    return run


def test_nan_gamma_in_ablate_names_the_layers_and_never_suggests_no_fold(tmp_path, capsys):
    import torch

    from bnprobe.files import checkpoints, runs

    run = _tiny_run(tmp_path)
    state = checkpoints.load_checkpoint(runs.checkpoint_path(run))
    state["model"]["layer1.0.bn1.weight"][2] = float("nan")
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    for fold in ("--fold", "--no-fold"):
        code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--device", "cpu", fold)
        assert_one_line_error(code, err, "holds NaN or infinite γ in 1 norm layer(s) (layer1.0.bn1)")
        assert "--no-fold" not in err
    state["model"]["layer1.0.bn1.weight"][2] = 1.0
    state["model"]["layer1.0.bn1.bias"][:] = float("nan")  # finite γ, yet no finite output: still not the fold's fault
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--device", "cpu", "--no-fold")
    assert_one_line_error(code, err, "the model's own output holds NaN or inf")
    assert not (run / "ablation.h5").exists() and torch.isnan(state["model"]["layer1.0.bn1.bias"]).all()


# ---- sweep plans -----------------------------------------------------------------------------------------


def test_a_million_run_grid_is_refused_at_once_unless_max_runs_allows_it(tmp_path, capsys):
    # 1000 x 1000 values printed nothing in 240 s under --dry-run and grew to 3 GB.
    plan = tmp_path / "plan.toml"
    plan.write_text('[defaults]\ndataset = "digits"\nmodel = "resnet8"\n[[grid]]\n'
                    f"seed = {list(range(1000))}\nlr = {[0.001 * (i + 1) for i in range(1000)]}\n")
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "sweep", plan, "--runs-dir", tmp_path / "runs", "--dry-run")
    assert_one_line_error(code, err, "plans 1,000,000 runs, more than the limit of 10,000; at most 100,000 can be planned")
    assert time.perf_counter() - started < 60 and not out  # refused before planning (it took 240 s; a bound, not a speed test)
    plan.write_text('[defaults]\ndataset = "digits"\nmodel = "resnet8"\n[[grid]]\nseed = [0, 1, 2]\n')
    code, _, err = run_cli(capsys, "sweep", plan, "--runs-dir", tmp_path / "runs", "--dry-run", "--max-runs", "2")
    assert_one_line_error(code, err, "plans 3 runs, more than the limit of 2")
    from bnprobe.sweep.cost import _layer_flops

    _layer_flops.cache_clear()
    code, out, err = run_cli(capsys, "sweep", plan, "--runs-dir", tmp_path / "runs", "--dry-run", "--max-runs", "3")
    assert code == 0 and "3 runs" in out, err
    assert _layer_flops.cache_info().misses == 1  # one model shape: its cost is counted once
    assert not (tmp_path / "runs").exists()


def test_plans_of_the_wrong_shape_are_one_line(tmp_path, capsys):
    grid = '[[grid]]\nmodel = "resnet8"\ndataset = "digits"\n'
    for text, message in [
        ('defaults = 5\n[[grid]]\nseed = 1\n', "must be tables of settings"),
        ('grid = [1, 2]\n', "must be tables of settings"),
        (grid + "milestones = {a = 1}", 'setting \'milestones\' must be text, not {"a": 1}'),
        (grid + "epochs = 1.5", "grid 1: setting 'epochs' must be an integer, not 1.5"),
        (grid + "seed = 99999999999999999999", "--seed must be in [0, 2**32)"),
    ]:
        (tmp_path / "plan.toml").write_text(text)
        code, _, err = run_cli(capsys, "sweep", tmp_path / "plan.toml", "--runs-dir", tmp_path / "runs", "--dry-run")
        assert_one_line_error(code, err, message)


# ---- train: run paths and seeds -----------------------------------------------------------------------

TRAIN = ("train", "resnet8", "--dataset", "digits", "--epochs", "2", "--subset", "150", "--test-subset", "60",
         "--milestones", "", "--device", "cpu", "--batch-size", "64")


def test_a_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, *TRAIN, "--runs-dir", tmp_path, "--seed", "99999999999999999999")
    assert_one_line_error(code, err, "--seed must be in [0, 2**32), got 99999999999999999999")


@pytest.mark.parametrize("model, width, message", [
    ("resnet8", "100000", "--width must be at most 1,024 (every model is then past 2,000,000,000 parameters), "
                          "got 100,000"),
    ("resnet8", "200", "resnet8 at width 200 has 3,051,811,210 parameters, more than bnprobe builds (2,000,000,000"),
    ("resnet600002", "1", "CIFAR ResNet depth must be at most 2,000 layers, got 600,002"),
])
def test_a_model_too_large_to_build_is_refused_before_it_is_built(tmp_path, capsys, model, width, message):
    # --width 100000 died in a 92 TB allocation with a traceback; resnet600002 ran silently for minutes.
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "train", model, "--width", width, "--dataset", "digits", "--device", "cpu",
                           "--runs-dir", tmp_path / "runs")
    assert_one_line_error(code, err, message)
    assert time.perf_counter() - started < 30 and not (tmp_path / "runs").exists()  # a bound, not a speed test


def test_a_run_path_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("mine")
    for extra in ((), ("--resume",), ("--overwrite",)):
        code, _, err = run_cli(capsys, *TRAIN, "--runs-dir", tmp_path, "--name", "thesis.tex", *extra)
        assert_one_line_error(code, err, "thesis.tex is a file, not a run directory")
        assert (tmp_path / "thesis.tex").read_text() == "mine"


def test_an_output_name_too_long_for_the_file_system_is_one_line(tmp_path, capsys):
    long_name = "x" * 300
    code, _, err = run_cli(capsys, "report", tmp_path, "-o", tmp_path / f"{long_name}.html")
    assert_one_line_error(code, err, "longer than the 255 bytes a file name can have")
    run = _tiny_run(tmp_path)
    code, _, err = run_cli(capsys, "probe", run, "--device", "cpu", "--images", "20",
                           "--out", tmp_path / f"{long_name}.h5")
    assert_one_line_error(code, err, "longer than the 255 bytes a file name can have")


# ---- checkpoints read back: train --resume and probe ----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-epoch run; each test edits a copy of it."""
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context():
        from bnprobe.cli import main

        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in (*TRAIN, "--runs-dir", root, "--name", "r")])
    assert exit_info.value.code == 0
    return root / "r"


def _copy_with(finished_run, tmp_path, edit):
    """A copy of the run whose checkpoint (epoch 1 of 2, so --resume has work to do) `edit` changes."""
    import shutil

    from bnprobe.files import checkpoints, runs

    run = tmp_path / "r"
    shutil.copytree(finished_run, run)
    state = checkpoints.load_checkpoint(runs.checkpoint_path(run))
    state["epoch"], state["history"] = 1, state["history"][:1]
    edit(state)
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    return run, runs.checkpoint_path(run).read_bytes()


def _resume(capsys, run):
    return run_cli(capsys, *TRAIN, "--runs-dir", run.parent, "--name", run.name, "--resume")


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("optimizer"), "'optimizer' must be an optimizer state, not missing"),
    (lambda s: s.pop("config"), "config must be a table of settings, not null"),
    (lambda s: s["rng"].update(data=torch.zeros(3, dtype=torch.uint8)), "optimizer or RNG state cannot be restored"),
    (lambda s: s["rng"].update(torch="seed"), "'rng.torch' must be a tensor, not str"),
    (lambda s: s["model"].update({"fc.weight": torch.zeros(3, 3)}), "does not fit this run's model"),
    (lambda s: s["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(2)), "optimizer state does not fit"),
    # issue 21 (9): trained to the end, then KeyError: 'test_acc', with the bad row in metrics.json
    (lambda s: s.update(history=[{"epoch": "x"}]), "'history' must be a list of per-epoch tables numbered from 1"),
    (lambda s: s["history"][0].pop("test_acc"), "row 1 is dict"),
    (lambda s: s.update(history=[]), "'history' has 0 epochs, but the checkpoint is after epoch 1"),
    # (10): trained an epoch, rewrote checkpoint.pt, then said "already finished"
    (lambda s: s.update(epoch=10**12, finished=False), "'epoch' must be in [0, 2] (the config's epochs), not 10000"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_keeps_it(finished_run, tmp_path, capsys, edit, message):
    run, before = _copy_with(finished_run, tmp_path, edit)
    metrics = (run / "metrics.json").read_bytes()
    code, _, err = _resume(capsys, run)
    assert_one_line_error(code, err, message)
    assert (run / "checkpoint.pt").read_bytes() == before and (run / "metrics.json").read_bytes() == metrics


def test_resume_with_a_cut_short_telemetry_file_is_one_line(finished_run, tmp_path, capsys):
    run, before = _copy_with(finished_run, tmp_path, lambda s: None)
    telemetry = run / "telemetry.h5"
    telemetry.write_bytes(telemetry.read_bytes()[: telemetry.stat().st_size // 2])
    half = telemetry.read_bytes()
    code, _, err = _resume(capsys, run)
    assert_one_line_error(code, err, f"cannot resume: {telemetry} is damaged")
    assert (run / "checkpoint.pt").read_bytes() == before and telemetry.read_bytes() == half


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(config=[]), "config must be a table of settings, not []"),
    (lambda s: s.update(epoch="two"), "'epoch' must be a whole number, not str 'two'"),
    (lambda s: s.update(normalization="per-pixel"), "'normalization' must be a table of mean and std, not str"),
    (lambda s: s["config"].update(width="x"), "config: setting 'width' must be an integer, not \"x\""),
    (lambda s: s["config"].update(width=200), "config: resnet8 at width 200 has 3,051,811,210 parameters"),
    (lambda s: s["normalization"].update(mean=torch.zeros(1, 1, 2)),  # broadcasts to no image: a traceback
     "'normalization.mean' must hold numbers of shape (1, 1, 1) or (1, 8, 8) for digits"),
])
def test_probe_of_a_checkpoint_with_a_damaged_structure_is_one_line(finished_run, tmp_path, capsys, edit, message):
    run, _ = _copy_with(finished_run, tmp_path, edit)
    code, _, err = run_cli(capsys, "probe", run, "--device", "cpu", "--images", "20", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, message)


def test_a_fifo_named_config_json_makes_no_run_and_blocks_nothing(tmp_path):
    # runs.is_run read config.json with read_text(), which waits forever on a FIFO with no writer.
    import signal

    from bnprobe.files import runs, schema

    os.mkfifo(tmp_path / "config.json")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a FIFO blocked"))
    signal.alarm(20)
    try:
        assert not runs.is_run(tmp_path) and schema.run_holding(tmp_path / "report.html") is None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
