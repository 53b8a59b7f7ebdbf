"""Dimensions off in several layers of one width (issue 32, point 5): NormStats.recurring_off, probe.h5's
recurring_off/ and the probe's table, against a count made by hand on the saved tensors."""

from __future__ import annotations

from collections import defaultdict

import h5py
import numpy as np
from cli_helpers import run_cli
from safetensors.numpy import save_file

OFF = 0.01
H, W = 32, 24  # two widths: an index names one dimension only among layers of one width


def rms_file(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A llama-like file: 5 blocks of two RMSNorm scales of width H, a final norm of width W, a projection."""
    rng = np.random.default_rng(seed)
    state = {}
    for block in range(5):
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{block}.{name}.weight"] = rng.uniform(0.5, 1.5, H).astype(np.float32)
    state["model.layers.0.post_attention_layernorm.weight"][[7, 19]] = 0.0  # 7: in 4 layers, 19: in 2
    for block in (1, 3, 4):
        state[f"model.layers.{block}.input_layernorm.weight"][7] = 0.001
    state["model.layers.2.input_layernorm.weight"][19] = -0.005
    state["model.layers.4.post_attention_layernorm.weight"][2] = 0.0  # off once: not recurring
    state["model.norm.weight"] = rng.uniform(0.5, 1.5, W).astype(np.float32)
    state["model.norm.weight"][7] = 0.0  # index 7 of another width: not the same dimension
    state["model.layers.0.mlp.up_proj.weight"] = rng.normal(size=(2 * H, H)).astype(np.float32)
    save_file(state, str(path))
    return state


def by_hand(gammas: list[np.ndarray]) -> list[tuple[int, int, int, int, list[int]]]:
    found = defaultdict(list)
    for depth, g in enumerate(gammas):
        for dim in np.nonzero(np.abs(g) < OFF)[0]:
            found[(g.size, int(dim))].append(depth)
    rows = [(w, d, len(at), sum(g.size == w for g in gammas), at) for (w, d), at in found.items() if len(at) >= 2]
    return sorted(rows, key=lambda row: (-row[2], row[0], row[1]))


def test_recurring_off_dimensions_in_probe_h5_and_the_table(tmp_path, capsys):
    state = rms_file(tmp_path / "model.safetensors")
    out = tmp_path / "probe.h5"
    code, text, err = run_cli(capsys, "probe", tmp_path / "model.safetensors", "--out", out, "--off-threshold", OFF)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["version"] == 5
        g = f["checkpoints/000"]
        names = list(g["bn/names"].asstr()[:])
        gammas = [state[f"model.{name}.weight"].astype(np.float64) for name in names]
        rows = by_hand(gammas)
        off = g["recurring_off"]
        offsets, where = off["where_offsets"][:], off["where"][:]
        got = [(int(w), int(d), int(n), int(of), list(where[offsets[k]:offsets[k + 1]]))
               for k, (w, d, n, of) in enumerate(zip(*(off[k][:] for k in ("width", "dim", "layers", "of_layers"))))]
        assert got == rows and g.attrs["recurring_off_dims"] == len(rows)
    assert [r[:3] for r in rows] == [(H, 7, 4), (H, 19, 2)]
    assert "Dimensions off in several" in text and "4 of 10" in text and "2 of 10" in text


def test_no_recurring_off_dimension_no_table(tmp_path, capsys):
    rng = np.random.default_rng(1)
    save_file({f"model.layers.{b}.input_layernorm.weight": rng.uniform(0.5, 1.5, H).astype(np.float32)
               for b in range(3)}, str(tmp_path / "m.safetensors"))
    code, text, err = run_cli(capsys, "probe", tmp_path / "m.safetensors", "--out", tmp_path / "p.h5")
    assert code == 0, err
    assert "Dimensions off in several" not in text
    with h5py.File(tmp_path / "p.h5") as f:
        assert len(f["checkpoints/000/recurring_off/dim"]) == 0 and f["checkpoints/000"].attrs["recurring_off_dims"] == 0


def test_the_report_counts_them_and_reads_version_4_files(tmp_path, capsys):
    from test_static import report_section

    results = tmp_path / "results"
    results.mkdir()
    rms_file(tmp_path / "model.safetensors")
    assert run_cli(capsys, "probe", tmp_path / "model.safetensors", "--out", results / "probe.h5")[0] == 0
    rms_file(tmp_path / "older.safetensors", seed=1)
    assert run_cli(capsys, "probe", tmp_path / "older.safetensors", "--out", results / "v4.h5")[0] == 0
    with h5py.File(results / "v4.h5", "r+") as f:  # as version 4 wrote it
        f.attrs["version"] = 4
        del f["checkpoints/000/recurring_off"]
        del f["checkpoints/000"].attrs["recurring_off_dims"]
    out, _, section = report_section(capsys, results, tmp_path, '<section class="probes" id="norms">')
    section = " ".join(section.split())
    assert "2 probed checkpoints" in out and section.count("<svg") == 2
    assert section.count("dimensions off (|γ| below the probe's off threshold) in several layers") == 1
    assert "2 dimensions off" in section
