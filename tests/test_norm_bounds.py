"""Issue 30 items 1 and 8: a file that declares an implausibly wide norm (a sparse file: 8 KB on disk, 1e9 or 1e12
elements declared) is one line and exit 2 in bounded memory, whatever it declares; and an index's faults are
named for what they are (a symbolic link in a loop, an empty weight_map)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from conftest import REPO

from bnprobe.analysis.static import MAX_NORM_CHANNELS, MAX_NORM_TOTAL

LIMIT = 1 << 30  # address space of the probe's process: its imports take ~200 MB; 1e9 float32 alone are 4 GB


def sparse_safetensors(path: Path, tensors: dict[str, int], real: dict[str, np.ndarray] = {}) -> None:
    """A safetensors file declaring float32 tensors of these element counts, truncated to its declared size: holes,
    except the tensors in `real`."""
    header, offset = {}, 0
    for name, count in tensors.items():
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, values in real.items():
            f.seek(8 + len(text) + header[name]["data_offsets"][0])
            f.write(values.astype("<f4").tobytes())
        f.truncate(8 + len(text) + offset)


# The command in a fresh interpreter that prints, at its exit, its own peak resident memory (VmHWM starts anew at
# exec, where ru_maxrss would keep the forked test process's).
PEAK = ("import atexit, runpy, sys\n"
        "atexit.register(lambda: print('PEAK', next(line.split()[1] for line in open('/proc/self/status') "
        "if line.startswith('VmHWM:'))))\n"
        "sys.argv = ['bnprobe', *sys.argv[1:]]\n"
        "runpy.run_module('bnprobe', run_name='__main__', alter_sys=True)\n")


def probe_limited(*args) -> tuple[int, str, int]:
    """`bnprobe probe ...` in its own process under LIMIT of address space: exit status, stderr, peak RSS (KiB)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    done = subprocess.run([sys.executable, "-c", PEAK, "probe", *map(str, args)], preexec_fn=limit,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    peak = [int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK ")]
    assert peak, done.stdout[-1000:] + done.stderr[-1000:]
    return done.returncode, done.stderr, peak[-1]


def assert_refused(code: int, err: str, rss_kb: int, pattern: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnprobe: error: ") and pattern in lines[0], err
    assert rss_kb < 200 * 1024  # near the imports (~70 MB), not what the file declares


@pytest.mark.parametrize("elements", [10**9, 10**12])
def test_a_sparse_file_declaring_a_huge_norm_is_one_line_in_bounded_memory(tmp_path, elements):
    path = tmp_path / "m.safetensors"
    sparse_safetensors(path, {"model.layers.0.input_layernorm.weight": elements})
    assert os.stat(path).st_blocks * 512 < 1 << 20  # a few KB on disk
    code, err, rss = probe_limited(path, "--brief", "--out", tmp_path / "probe.h5")
    assert_refused(code, err, rss, f"norm layer layers.0.input_layernorm declares {elements:,} channels, more than "
                                   f"the {MAX_NORM_CHANNELS:,} bnprobe reads")
    assert not (tmp_path / "probe.h5").exists()


def test_an_index_of_60_sparse_shards_of_huge_norms_is_one_line_in_bounded_memory(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    weight_map = {}
    for k in range(60):
        name = f"model.layers.{k}.input_layernorm.weight"
        sparse_safetensors(folder / f"s{k}.safetensors", {name: 5 * 10**7})
        weight_map[name] = f"s{k}.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, err, rss = probe_limited(folder, "--brief", "--out", tmp_path / "probe.h5")
    assert_refused(code, err, rss, "norm layer layers.0.input_layernorm declares 50,000,000 channels")


def test_norms_within_the_bound_but_too_many_in_all_are_one_line(tmp_path, monkeypatch, capsys):
    import bnprobe.analysis.static as static

    monkeypatch.setattr(static, "MAX_NORM_TOTAL", 100)
    sparse_safetensors(tmp_path / "m.safetensors", {f"model.layers.{i}.input_layernorm.weight": 40 for i in range(3)})
    code, _, err = run_cli(capsys, "probe", tmp_path / "m.safetensors", "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, "its norm layers declare more than 100 channels in all (at layers.2.input_layernorm)")
    assert MAX_NORM_TOTAL >= 4 * 4_100_000  # room for the largest published model's norms (Llama 3.1 405B)


def test_the_widest_norm_read_is_read_in_chunks_exactly(tmp_path, capsys):
    """A norm of MAX_NORM_CHANNELS (16 MB of float32 bytes: several reads) is read, every value its own."""
    import h5py

    gamma = np.random.default_rng(0).standard_normal(MAX_NORM_CHANNELS).astype(np.float32)
    name = "model.norm.weight"
    sparse_safetensors(tmp_path / "m.safetensors", {name: MAX_NORM_CHANNELS}, {name: gamma})
    code, _, err = run_cli(capsys, "probe", tmp_path / "m.safetensors", "--brief", "--out", tmp_path / "probe.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "probe.h5") as f:
        np.testing.assert_array_equal(f["checkpoints/000/bn/gamma"][:], gamma.astype(np.float64))


# ---- item 8: index messages that name the right fault ----------------------------------------------------------


def index_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    folder.mkdir()
    sparse_safetensors(folder / "a.safetensors", {"model.norm.weight": 4}, {"model.norm.weight": np.ones(4)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.norm.weight": "a.safetensors", "model.layers.0.input_layernorm.weight": "b.safetensors"}}))
    return folder


def loop(folder: Path) -> None:
    os.symlink("c.safetensors", folder / "b.safetensors")
    os.symlink("b.safetensors", folder / "c.safetensors")


@pytest.mark.parametrize("make, pattern", [
    (loop, "shard b.safetensors is a symbolic link in a loop"),
    (lambda d: os.symlink("gone.safetensors", d / "b.safetensors"),
     "shard b.safetensors is a symbolic link to a file that does not exist"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {}}'),
     "a weight_map of tensor names to shard files expected; its weight_map is empty"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": null}'),
     "its weight_map is null"),
    (lambda d: None, "shard b.safetensors is missing (the index places 1 tensor in it)"),
])
def test_index_faults_are_named_for_what_they_are(capsys, tmp_path, make, pattern):
    folder = index_folder(tmp_path)
    make(folder)
    code, _, err = run_cli(capsys, "probe", folder, "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, pattern)
