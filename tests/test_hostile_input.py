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
    from rich.console import Console

    from bnprobe.train import train
    from probe_helpers import tiny_config

    run = tmp_path / name
    train(tiny_config(epochs=1, **changes), run, console=Console(quiet=True))
    return run


def test_nan_gamma_in_ablate_names_the_layers_and_never_suggests_no_fold(tmp_path, capsys):
    import torch

    from bnprobe import runs

    run = _tiny_run(tmp_path)
    state = runs.load_checkpoint(runs.checkpoint_path(run))
    state["model"]["layer1.0.bn1.weight"][2] = float("nan")
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    for fold in ("--fold", "--no-fold"):
        code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--device", "cpu", fold)
        assert_one_line_error(code, err, "holds NaN or infinite γ in 1 BN layer(s) (layer1.0.bn1)")
        assert "--no-fold" not in err
    state["model"]["layer1.0.bn1.weight"][2] = 1.0
    state["model"]["layer1.0.bn1.bias"][:] = float("nan")  # finite γ, yet no finite output: still not the fold's fault
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--device", "cpu", "--no-fold")
    assert_one_line_error(code, err, "the model's own output holds NaN or inf")
    assert not (run / "ablation.h5").exists() and torch.isnan(state["model"]["layer1.0.bn1.bias"]).all()
