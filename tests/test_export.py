"""`bnprobe export RUN -o model.safetensors [--compact]`: the seed plus what trained, read back bit-exactly by
every command that loads a checkpoint."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import time

import h5py
import numpy as np
import pytest
import torch
from probe_helpers import (
    assert_one_line_error,
    run_cli,
    single_thread,  # noqa: F401 - autouse: one thread for tiny models
    tiny_config,
    trained_runs,
)
from safetensors.torch import load_file

from bnprobe.analysis.loading import load_model
from bnprobe.core.options import LoadOptions

_RF: dict = {}


def random_features_run(tmp_path_factory):
    """A BN-only run whose convs also train 2 random weights per channel (masks drawn from the seed)."""
    from rich.console import Console

    from bnprobe.training.train import train

    key = str(tmp_path_factory.getbasetemp())
    if key not in _RF:
        _RF[key] = tmp_path_factory.mktemp("rf") / "rf"
        train(tiny_config(freeze="non-bn", lr=0.2, random_features=2), _RF[key], console=Console(quiet=True))
    return _RF[key]


def read_header(path):
    """(length, JSON) of a safetensors file's header, read by hand: 8 bytes of length, then the JSON."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return size, json.loads(f.read(size))


def export(capsys, run, out, *flags):
    code, stdout, err = run_cli(capsys, "export", run, "-o", out, *flags)
    assert code == 0, err
    return stdout


def forge(capsys, tmp_path, tmp_path_factory, metadata=lambda m: m, tensors=lambda t: t):
    """A real `export --compact` of the BN-only run saved again as bad.safetensors, its metadata and tensors changed
    by `metadata` and `tensors`, with the hash of its stored tensors made to fit them (as a forger would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bnprobe.files.compact import stored_digest

    export(capsys, trained_runs(tmp_path_factory)["bn-only"], tmp_path / "good.safetensors", "--compact")
    with safe_open(tmp_path / "good.safetensors", "pt") as f:
        original = f.metadata()
    changed = tensors(load_file(tmp_path / "good.safetensors"))
    save_file(changed, tmp_path / "bad.safetensors",
              metadata=metadata({**original, "stored_sha256": stored_digest(changed)}))
    return tmp_path / "bad.safetensors"


def same_model(a, b):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 60 + 100
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    with torch.inference_mode():
        assert torch.equal(a.model(x), b.model(x))  # identical logits, bit for bit


@pytest.mark.parametrize("which", ["bn-only", "random-features"])
def test_compact_export_is_small_and_reads_back_bit_exactly(capsys, tmp_path, tmp_path_factory, which):
    run = trained_runs(tmp_path_factory)["bn-only"] if which == "bn-only" else random_features_run(tmp_path_factory)
    out = export(capsys, run, tmp_path / "compact.safetensors", "--compact")
    export(capsys, run, tmp_path / "full.safetensors")
    compact, full = (tmp_path / "compact.safetensors").stat().st_size, (tmp_path / "full.safetensors").stat().st_size
    assert compact * 15 < full
    assert f"{compact:,} bytes instead of {full:,}" in out and f"({full / compact:.0f}x smaller)" in out
    # Only what trained, and next to nothing besides: BN's four vectors and its counter, plus, for random features,
    # 2 trained weights per output channel of every conv; packed one tensor per dtype, so the file is those
    # numbers' bytes, the metadata, and two short tensor entries.
    whole = load_file(str(tmp_path / "full.safetensors"))
    bn = {name.rpartition(".")[0] for name in whole if name.endswith(".running_var")}
    numbers = sum(t.numel() * t.element_size() for name, t in whole.items() if name.rpartition(".")[0] in bn)
    if which == "random-features":
        numbers += sum(2 * t.shape[0] * t.element_size() for t in whole.values() if t.dim() == 4)
    header_size, header = read_header(tmp_path / "compact.safetensors")
    metadata = header.pop("__metadata__")
    assert sorted(header) == ["float32", "int64"] and compact == 8 + header_size + numbers
    assert header_size < len(json.dumps(metadata)) + 200
    original = load_model(run, LoadOptions(device="cpu"))
    for name in ("compact", "full"):
        same_model(original, load_model(tmp_path / f"{name}.safetensors", LoadOptions(device="cpu")))


def test_ablate_and_probe_give_identical_results_on_a_compact_file(capsys, tmp_path, tmp_path_factory):
    run = trained_runs(tmp_path_factory)["bn-only"]
    compact = tmp_path / "compact.safetensors"
    export(capsys, run, compact, "--compact")
    for source, name in ((run, "run"), (compact, "compact")):
        code, _, err = run_cli(capsys, "ablate", source, "--clamp-gamma", "0.05,0.3", "--test-subset", "100",
                               "--train-subset", "100", "--device", "cpu", "--out", tmp_path / f"{name}-ablation.h5")
        assert code == 0, err
        code, _, err = run_cli(capsys, "probe", source, "--images", "60", "--device", "cpu",
                               "--out", tmp_path / f"{name}-probe.h5")
        assert code == 0, err
    with h5py.File(tmp_path / "run-ablation.h5") as a, h5py.File(tmp_path / "compact-ablation.h5") as b:
        for name in ("test_acc", "test_loss", "train_acc", "train_loss", "clamped", "masks"):
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    with h5py.File(tmp_path / "run-probe.h5") as a, h5py.File(tmp_path / "compact-probe.h5") as b:
        ga, gb = a["checkpoints/000"], b["checkpoints/000"]
        assert gb.attrs["source"] == "bnprobe" and gb.attrs["forward_pass"]  # probed as the run, with its data
        for group in ("bn", "relu"):
            for name in ga[group]:
                np.testing.assert_array_equal(ga[group][name][:], gb[group][name][:], err_msg=name)
        assert ga.attrs["accuracy"] == gb.attrs["accuracy"] and ga.attrs["loss"] == gb.attrs["loss"]


def test_a_changed_random_stream_is_one_line_never_other_weights(capsys, tmp_path, tmp_path_factory, monkeypatch):
    run = trained_runs(tmp_path_factory)["bn-only"]
    export(capsys, run, tmp_path / "compact.safetensors", "--compact")
    import bnprobe.files.compact

    build = bnprobe.files.compact.from_config
    # Another torch version drawing other numbers for the same seed: the frozen convs come out different.
    monkeypatch.setattr(bnprobe.files.compact, "from_config",
                        lambda config, *args: build(dataclasses.replace(config, seed=config.seed + 7), *args))
    code, _, err = run_cli(capsys, "probe", tmp_path / "compact.safetensors", "--device", "cpu",
                           "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, "do not match the file's hash")
    assert not (tmp_path / "probe.h5").exists()
    for argv in (["inspect", tmp_path / "compact.safetensors"],
                 ["ablate", tmp_path / "compact.safetensors", "--clamp-gamma", "0.1", "--device", "cpu",
                  "--out", tmp_path / "ablation.h5"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "do not match the file's hash")


def test_inspect_an_export(capsys, tmp_path, tmp_path_factory):
    run = random_features_run(tmp_path_factory)
    export(capsys, run, tmp_path / "compact.safetensors", "--compact")
    code, out, err = run_cli(capsys, "inspect", tmp_path / "compact.safetensors")
    assert code == 0, err
    stored = sum(t.numel() for t in load_file(str(tmp_path / "compact.safetensors")).values())
    total = sum(t.numel() for t in load_model(run, LoadOptions(device="cpu")).model.state_dict().values())
    assert "compact: the seed plus what trained" in out and "non-bn + 2 random features" in out
    assert f"{stored:,} of {total:,}" in out and "regenerated from seed 0; SHA-256 matches" in out
    assert re.search(r"stored tensors\s+SHA-256 matches", out)


def test_a_full_export_loads_in_plain_pytorch(capsys, tmp_path, tmp_path_factory):
    from bnprobe.nets.registry import create_model

    run = trained_runs(tmp_path_factory)["full"]
    export(capsys, run, tmp_path / "full.safetensors")
    model = create_model("resnet8", in_channels=1, num_classes=10)
    model.load_state_dict(load_file(str(tmp_path / "full.safetensors")))  # strict: every key, every shape
    original = load_model(run, LoadOptions(device="cpu")).model
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_export_errors_are_one_line_and_keep_files(capsys, tmp_path, tmp_path_factory):
    run = trained_runs(tmp_path_factory)["bn-only"]
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "theirs.pt")
    (tmp_path / "notes.safetensors").write_text("mine")
    for argv, pattern in (
        (["export", tmp_path / "theirs.pt", "-o", tmp_path / "x.safetensors"], "is not a bnprobe run's checkpoint"),
        (["export", run, "-o", tmp_path / "x.pt"], "-o must name a .safetensors file"),
        (["export", run, "-o", tmp_path / "notes.safetensors", "--compact"], "will not replace"),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, pattern)
    assert (tmp_path / "notes.safetensors").read_text() == "mine" and not (tmp_path / "x.safetensors").exists()


def test_the_frozen_tensors_regenerate_the_same_whatever_the_thread_count():
    from bnprobe.files.compact import frozen_digest, regenerate

    config = tiny_config(model="resnet20", freeze="non-bn", random_features=3)
    digests = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            initial, masks, stored = regenerate(config)
            digests.append(frozen_digest(initial, stored, masks))
    finally:
        torch.set_num_threads(threads)
    assert len(set(digests)) == 1
    initial, masks, stored = regenerate(dataclasses.replace(config, seed=1))
    assert frozen_digest(initial, stored, masks) != digests[0]  # and the seed is what decides them


@pytest.mark.parametrize("key, value, pattern", [
    ("epoch", "two", "damaged bnprobe export metadata"), ("config", "[1, 2]", "bad.safetensors"),
    ("config", "{not json", "damaged bnprobe export metadata"),
    ("layout_sha256", "0" * 64, "are not the ones the file packed"),
    ("version", "1", "a compact file of format version 1; this bnprobe reads versions 2 and 3"),
    # a traceback (TypeError), then one from a normalisation that broadcasts to no image
    ("normalization", '{"mean": "x", "std": [1]}', "damaged bnprobe export metadata (normalization: TypeError"),
    ("normalization", '{"mean": [[[0.5, 0.5]]], "std": [[[1.0, 1.0]]]}',
     "'normalization.mean' must hold numbers of shape (1, 1, 1) or (1, 8, 8) for digits, not a "
     "torch.float32 tensor of shape (1, 1, 2)"),
    # refused for its value, not for a shape (issue 30, item 11)
    ("normalization", '{"mean": [[[0.5]]], "std": [[[0.0]]]}', "'normalization.std' holds 0; it must hold finite positive"),
    ("normalization", '{"mean": [[[0.5]]], "std": [[[NaN]]]}', "'normalization.std' holds nan; it must hold finite positive"),
    ("normalization", '{"mean": [[[Infinity]]], "std": [[[1.0]]]}', "'normalization.mean' holds inf; it must hold finite"),
])
def test_an_export_with_damaged_metadata_is_one_line(capsys, tmp_path, tmp_path_factory, key, value, pattern):
    bad = forge(capsys, tmp_path, tmp_path_factory, metadata=lambda m: {**m, key: value})
    code, _, err = run_cli(capsys, "probe", bad, "--device", "cpu", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, pattern)
    assert "bad.safetensors" in err


def _config(metadata, **changes):
    return {**metadata, "config": json.dumps({**json.loads(metadata["config"]), **changes})}


@pytest.mark.parametrize("changes, pattern", [
    (dict(width=1000000), "config: --width must be at most 1,024"),  # a traceback: a 9.2e15-byte allocation
    (dict(model="resnet99998"), "config: CIFAR ResNet depth must be at most 2,000 layers"),  # 80 s, 8.7 GB
])
def test_an_export_asking_for_a_model_too_large_is_refused_before_it_is_built(capsys, tmp_path, tmp_path_factory,
                                                                              changes, pattern):
    bad = forge(capsys, tmp_path, tmp_path_factory, metadata=lambda m: _config(m, **changes))
    started = time.perf_counter()
    for argv in (["probe", bad, "--device", "cpu", "--out", tmp_path / "p.h5"], ["inspect", bad]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, f"bad.safetensors: {pattern}")
    assert time.perf_counter() - started < 30  # a bound, not a speed test


def test_the_data_folder_comes_from_the_user_never_from_an_export(shared_data, capsys, tmp_path, tmp_path_factory,
                                                                  monkeypatch):
    # data_dir=/etc with dataset=mnist: probe tried to download MNIST into /etc/MNIST/raw.
    theirs = tmp_path / "etc"
    bad = forge(capsys, tmp_path, tmp_path_factory,
                metadata=lambda m: _config(m, dataset="mnist", data_dir=str(theirs)))  # resnet8 fits both
    monkeypatch.setenv("BNPROBE_DATA_DIR", str(shared_data))
    code, _, err = run_cli(capsys, "probe", bad, "--images", "50", "--device", "cpu", "--out", tmp_path / "p.h5")
    assert code == 0, err
    assert not theirs.exists()
    with h5py.File(tmp_path / "p.h5") as f:
        assert f["checkpoints/000"].attrs["dataset"] == "mnist"


@pytest.mark.parametrize("flags", [["--compact"], []])
def test_a_flipped_byte_in_the_stored_tensors_is_refused(capsys, tmp_path, tmp_path_factory, flags):
    # The hash covered only the frozen tensors: a changed trained tensor loaded silently, and inspect said
    # "SHA-256 matches".
    path = tmp_path / "model.safetensors"
    export(capsys, trained_runs(tmp_path_factory)["bn-only"], path, *flags)
    header_size, _ = read_header(path)
    data = bytearray(path.read_bytes())
    data[(8 + header_size + len(data)) // 2] ^= 1  # one bit of a number in the middle of the stored data
    path.write_bytes(data)
    for argv in (["probe", path, "--device", "cpu", "--out", tmp_path / "p.h5"], ["inspect", path]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "model.safetensors: its stored tensors do not match the file's hash of them")
    assert not (tmp_path / "p.h5").exists()


def test_a_version_2_export_still_loads_but_its_stored_tensors_are_not_called_verified(capsys, tmp_path,
                                                                                       tmp_path_factory):
    old = forge(capsys, tmp_path, tmp_path_factory,
                metadata=lambda m: {**{k: v for k, v in m.items() if k != "stored_sha256"}, "version": "2"})
    code, out, err = run_cli(capsys, "inspect", old)
    assert code == 0, err
    assert "regenerated from seed 0; SHA-256 matches" in out  # the frozen tensors still are
    assert "not verified (a version 2 file holds no hash of them)" in " ".join(out.split())
    same_model(load_model(trained_runs(tmp_path_factory)["bn-only"], LoadOptions(device="cpu")),
               load_model(old, LoadOptions(device="cpu")))


@pytest.mark.parametrize("damage, pattern", [
    (lambda t: {**t, "float32": t["float32"][:-1]}, "damaged compact file: its packed tensors (float32 ("),
    (lambda t: {"float32": t["float32"]}, "do not hold the"),
    (lambda t: {**t, "int64": t["int64"].float()}, "damaged compact file"),
])
def test_a_compact_file_whose_packed_tensors_do_not_fit_is_one_line(capsys, tmp_path, tmp_path_factory, damage,
                                                                     pattern):
    bad = forge(capsys, tmp_path, tmp_path_factory, tensors=damage)
    code, _, err = run_cli(capsys, "ablate", bad, "--clamp-gamma", "0.1", "--device", "cpu", "--out", tmp_path / "a.h5")
    assert_one_line_error(code, err, pattern)


def test_report_lists_exported_models_from_their_headers(capsys, tmp_path, tmp_path_factory):
    from safetensors.torch import save_file

    run = trained_runs(tmp_path_factory)["bn-only"]
    models = tmp_path / "models"
    models.mkdir()
    export(capsys, run, models / "compact.safetensors", "--compact")
    export(capsys, run, models / "full.safetensors")
    save_file({"w": torch.ones(3)}, models / "theirs.safetensors")  # not bnprobe's: not an export, not an error
    (models / "broken.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 1000]}}).encode()
    (models / "short.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    _, good = read_header(models / "compact.safetensors")
    good["__metadata__"]["config"] = json.dumps({"model": "resnet8", "seed": "zero"})
    header = json.dumps(good).encode()
    (models / "config.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(1 << 20))
    code, out, err = run_cli(capsys, "report", models, "-o", tmp_path / "report.html")
    assert code == 0, err
    assert "2 exported models" in out and "skipped broken.safetensors: broken.safetensors is not a safetensors" in out
    assert "skipped short.safetensors: short.safetensors: damaged safetensors header at tensor 'w'" in out
    assert "skipped config.safetensors: config.safetensors: config: setting 'seed' must be an integer" in out
    html = (tmp_path / "report.html").read_text()
    section = html[html.index("<h2>Exported models</h2>"):]
    rows = section[: section.index("</tbody>")].split("<tr>")[2:]
    assert len(rows) == 2 and "theirs" not in section
    compact, full = (models / "compact.safetensors").stat().st_size, (models / "full.safetensors").stat().st_size
    for row, name, size, ratio in ((rows[0], "compact", compact, full / compact), (rows[1], "full", full, 1)):
        numbers = sum(t.numel() for t in load_file(models / f"{name}.safetensors").values())
        cells = [re.sub("<[^>]*>", "", cell) for cell in re.findall("<td[^>]*>(.*?)</td>", row)]
        assert cells == [f"{name}.safetensors", "resnet8", "digits", "non-bn", "0", "2", name, f"{numbers:,}",
                         f"{size:,}", f"{ratio:.0f}x"], cells
