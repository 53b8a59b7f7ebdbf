"""The static probe's reader (bnprobe.files.file_tensors): `bnprobe probe FILE` of safetensors files, sharded
folders and torch.save files never imports torch, and the numbers it reads with numpy are the tensors' own,
for every dtype and for a view into a larger storage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO
from safetensors.torch import save_file

from bnprobe.files.file_tensors import FileTensors, open_tensors

# Runs the real command in a fresh interpreter and says, at its exit, which of torch and torchvision it imported.
WATCH = ("import atexit, json, runpy, sys\n"
         "atexit.register(lambda: print('IMPORTED', json.dumps([m for m in ('torch', 'torchvision') "
         "if m in sys.modules])))\n"
         "sys.argv = ['bnprobe', *json.loads(sys.argv[1])]\n"
         "runpy.run_module('bnprobe', run_name='__main__', alter_sys=True)\n")


def run_probe_process(*args: str | Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([sys.executable, "-c", WATCH, json.dumps([str(a) for a in args])], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                       "COLUMNS": "120"})
    line = [line for line in done.stdout.splitlines() if line.startswith("IMPORTED ")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    return done, json.loads(line[-1].removeprefix("IMPORTED "))


def llama_state(dtype: torch.dtype = torch.float32, layers: int = 3, hidden: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    state = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=generator)}
    for i in range(layers):
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(hidden, generator=generator) * 2 - 0.5
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(hidden, hidden, generator=generator)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.rand(hidden, generator=generator)
    state["model.norm.weight"] = torch.rand(hidden, generator=generator)
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def bn_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    state = {"conv.weight": torch.randn(8, 3, 3, 3, generator=generator)}
    for name in ("bn1", "layer.bn2"):
        state.update({f"{name}.weight": torch.rand(8, generator=generator) - 0.2,
                      f"{name}.bias": torch.randn(8, generator=generator),
                      f"{name}.running_mean": torch.randn(8, generator=generator),
                      f"{name}.running_var": torch.rand(8, generator=generator) + 0.1,
                      f"{name}.num_batches_tracked": torch.tensor(7)})
    return state


def sharded_folder(folder: Path, state: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir()
    names = list(state)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: state[name].contiguous() for name in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def gammas(out: Path) -> dict[str, np.ndarray]:
    with h5py.File(out) as f:
        g = f["checkpoints/000/bn"]
        offsets = g["offsets"][:]
        return {name: g["gamma"][offsets[i]:offsets[i + 1]] for i, name in enumerate(g["names"].asstr()[:])}


def as_float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.double().numpy()


@pytest.mark.parametrize("form", ["safetensors", "sharded folder", "torch zip", "torch legacy"])
def test_the_static_probe_never_imports_torch(tmp_path, form):
    state = llama_state(torch.bfloat16) if form in ("safetensors", "sharded folder") else bn_state()
    if form == "safetensors":
        path = tmp_path / "m.safetensors"
        save_file(state, str(path))
    elif form == "sharded folder":
        path = sharded_folder(tmp_path / "m", state)
    else:
        path = tmp_path / "m.pt"
        torch.save({"state_dict": state, "epoch": 3}, path, _use_new_zipfile_serialization=form == "torch zip")
    done, imported = run_probe_process("probe", path, "--out", tmp_path / "probe.h5")
    assert done.returncode == 0, done.stderr
    assert imported == [], f"a static probe of a {form} imported {imported}"
    expected = {name.removeprefix("model.").removesuffix(".weight"): as_float64(tensor) for name, tensor in state.items()
                if name.endswith("norm.weight") or (name.endswith(".weight") and "bn" in name)}
    found = gammas(tmp_path / "probe.h5")
    assert set(found) == set(expected)
    for name, gamma in expected.items():
        np.testing.assert_array_equal(found[name], gamma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_is_read_exactly_from_safetensors(tmp_path, dtype):
    state = llama_state(dtype)
    save_file(state, str(tmp_path / "m.safetensors"))
    with open_tensors(tmp_path / "m.safetensors") as file:
        assert file.kind == "safetensors" and file.stripped == ["model."]
        for name, tensor in state.items():
            value = file.tensors[name.removeprefix("model.")]
            assert FileTensors.shape(value) == tuple(tensor.shape)
            assert FileTensors.dtype(value) == str(dtype).removeprefix("torch.")
            read = FileTensors.read(value)
            assert isinstance(read, np.ndarray)
            np.testing.assert_array_equal(read.astype(np.float64), as_float64(tensor))


def test_a_view_into_a_larger_storage_reads_its_own_elements(tmp_path):
    """torch.save keeps a view's whole storage with an offset and strides: the reader follows them."""
    base = torch.arange(100, dtype=torch.float32) / 7
    state = {"bn.weight": base[10:30:2], "bn.bias": base[1:11], "bn.running_mean": base[50:60],
             "bn.running_var": base[60:70], "grid.weight": base.view(10, 10).t()}
    torch.save(state, tmp_path / "views.pt")
    with open_tensors(tmp_path / "views.pt") as file:
        for name, tensor in state.items():
            np.testing.assert_array_equal(FileTensors.read(file.tensors[name]), tensor.numpy())


def test_a_tensor_that_reaches_past_its_storage_is_one_line(tmp_path, capsys):
    """A forged archive: a 4-element storage under a tensor of 8 elements."""
    from cli_helpers import assert_one_line_error, run_cli
    from probe_helpers import forged_bn_archive

    def forge(pickle: bytes) -> bytes:
        # Each tensor's size is pickled as a one-element tuple (K 4 = BININT1 4 before TUPLE1): make it 8.
        assert pickle.count(b"K\x04\x85") >= 4
        return pickle.replace(b"K\x04\x85", b"K\x08\x85")

    path = forged_bn_archive(tmp_path / "m.pt", forge)
    code, _, err = run_cli(capsys, "probe", path, "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, "of shape (8,) reaches past its storage (4 elements of float32)")


def test_the_whole_process_bench_runs_shrunk(tmp_path):
    """bench/static_probe.py --cases process (the issue's end-to-end goals), at a tiny size, so that it keeps
    working."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "static_probe.py"), "--cases", "process", "--llm",
                           "2,256,512,1000", "--llm70", "3,256,512,1000,64", "--repeat", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bnprobe probe 70B-shaped folder" in done.stdout and "goals (each under 1 s" in done.stdout, done.stdout
