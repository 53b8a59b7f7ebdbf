"""Issue 32 point 2: pickles holding foreign objects read without running them (bnprobe.files.inert_pickle).

A Lightning-style checkpoint whose hyper_parameters hold omegaconf-like objects (classes defined here and saved
under module names nothing can import), an argparse.Namespace, a pathlib.Path and numpy scalars: torch.load
(weights_only=True) refuses it, `bnprobe probe FILE` reads its tensors and says what it stood in for, and the
torch reader falls back to the same inert reader. And payloads whose REDUCE or BUILD would leave a file behind
(os.system, eval, exec, builtins.getattr, subprocess, a class's __setstate__): each is live (an ordinary
pickle.loads runs it), and bnprobe's readers leave no trace of it."""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import forged_bn_archive

from bnprobe.core.errors import BnprobeError
from bnprobe.files.checkpoints import read_checkpoint
from bnprobe.files.file_tensors import FileTensors, open_tensors
from bnprobe.files.inert_pickle import MAX_PICKLE_BYTES, Stand, inert_load


class DictConfig:
    """omegaconf's DictConfig as it pickles: state through __getstate__, nested nodes."""

    def __init__(self, content: dict):
        self._content = {key: ValueNode(value) for key, value in content.items()}
        self._metadata = {"flags": {"readonly": False}}

    def __getstate__(self):
        return {"_content": self._content, "_metadata": self._metadata, "_parent": None}

    def __setstate__(self, state):
        self.__dict__.update(state)


class ListConfig(DictConfig):
    def __init__(self, items: list):
        self._content = [ValueNode(item) for item in items]
        self._metadata = {}


class ValueNode:
    def __init__(self, value):
        self._val = value


# Where the classes claim to live: modules that exist only while the checkpoint is written.
FAKE = {"omegaconf.dictconfig": {"DictConfig": DictConfig}, "omegaconf.listconfig": {"ListConfig": ListConfig},
        "omegaconf.nodes": {"ValueNode": ValueNode}}


def save_foreign(obj, path: Path) -> None:
    """torch.save (default pickle protocol) with the classes under FAKE's module names, importable nowhere after."""
    saved = {}
    for module, classes in FAKE.items():
        fake = types.ModuleType(module)
        for name, cls in classes.items():
            saved[cls] = (cls.__module__, cls.__qualname__)
            cls.__module__, cls.__qualname__ = module, name
            setattr(fake, name, cls)
        sys.modules[module] = fake
    sys.modules.setdefault("omegaconf", types.ModuleType("omegaconf"))
    try:
        torch.save(obj, path)
    finally:
        for module in [*FAKE, "omegaconf"]:
            sys.modules.pop(module, None)
        for cls, (module, name) in saved.items():
            cls.__module__, cls.__qualname__ = module, name


def bn_model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {"model.conv.weight": torch.randn(6, 3, 3, 3, generator=generator)}
    for name in ("bn1", "block.bn2"):
        state.update({f"model.{name}.weight": torch.rand(6, generator=generator) - 0.2,
                      f"model.{name}.bias": torch.randn(6, generator=generator),
                      f"model.{name}.running_mean": torch.randn(6, generator=generator),
                      f"model.{name}.running_var": torch.rand(6, generator=generator) + 0.1,
                      f"model.{name}.num_batches_tracked": torch.tensor(11)})
    state["model.ln_f.weight"] = torch.rand(6, generator=generator).to(torch.bfloat16)
    return state


def lightning_checkpoint() -> dict:
    config = DictConfig({"lr": 0.1, "layers": ListConfig([1, 2, 3]), "name": "resnet"})
    return {"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.4.0",
            "state_dict": bn_model_state(),
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}},
                                  "param_groups": [{"lr": np.float64(0.1), "params": [0]}]}],
            "hyper_parameters": {"config": config, "args": argparse.Namespace(seed=1, out=pathlib.Path("/runs/a")),
                                 "root": pathlib.PurePosixPath("/data"), "warmup": np.int64(5),
                                 "betas": (np.float32(0.9), 0.999)}}


def test_a_lightning_hydra_checkpoint_is_read_and_its_objects_stood_in_for(capsys, tmp_path):
    path = tmp_path / "lit.ckpt"
    checkpoint = lightning_checkpoint()
    save_foreign(checkpoint, path)
    with pytest.raises(Exception, match="Weights only load failed"):  # what bnprobe used to stop at
        torch.load(path, weights_only=True)
    code, out, err = run_cli(capsys, "probe", path, "--out", tmp_path / "probe.h5", "--taus", "0.1")
    assert code == 0, err
    assert "omegaconf" not in sys.modules  # never imported
    state = checkpoint["state_dict"]
    with h5py.File(tmp_path / "probe.h5") as f:
        g = f["checkpoints/000"]
        assert list(g["bn/names"].asstr()[:]) == ["bn1", "block.bn2", "ln_f"]
        offsets = g["bn/offsets"][:]
        for i, name in enumerate(["bn1", "block.bn2", "ln_f"]):
            np.testing.assert_array_equal(g["bn/gamma"][offsets[i]:offsets[i + 1]],
                                          state[f"model.{name}.weight"].double().numpy())
        np.testing.assert_array_equal(g["bn/running_var"][offsets[1]:offsets[2]],
                                      state["model.block.bn2.running_var"].double().numpy())
        assert "omegaconf objects" in g.attrs["stood_in"]
    # One line says what was stood in for, and where: omegaconf's 1 DictConfig, 1 ListConfig and 6 nodes.
    line = next(line for line in out.splitlines() if "stood in for" in line)
    assert "8 omegaconf objects" in line and "in hyper_parameters" in line and "numpy" in line
    assert "argparse object" in line and "pathlib objects" in line


def test_the_torch_reader_falls_back_to_the_inert_one(tmp_path):
    path = tmp_path / "lit.ckpt"
    checkpoint = lightning_checkpoint()
    save_foreign(checkpoint, path)
    obj = read_checkpoint(path)
    for name, tensor in checkpoint["state_dict"].items():
        assert obj["state_dict"][name].dtype == tensor.dtype
        assert torch.equal(obj["state_dict"][name], tensor)
    assert torch.equal(obj["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.ones(3))
    config = obj["hyper_parameters"]["config"]
    assert isinstance(config, Stand) and (config.module, config.qualname) == ("omegaconf.dictconfig", "DictConfig")
    assert isinstance(obj["hyper_parameters"]["warmup"], Stand) and obj["epoch"] == 9


# ---- payloads: each live, each leaving no trace through bnprobe ---------------------------------------------


class Reduces:
    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


class BoundMethod:
    """Unpickles as builtins.getattr(Path(marker), "touch"): a bound method, called by the REDUCE around it."""

    def __init__(self, marker):
        self.marker = marker

    def __call__(self):
        pass

    def __reduce__(self):
        return getattr, (Path(self.marker), "touch")


class WritesOnSetstate:
    """BUILD calls its __setstate__, which writes the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __getstate__(self):
        return {"marker": self.marker}

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")


PAYLOADS = {
    "os.system": lambda m: Reduces(os.system, (f"touch {m}",)),
    "eval": lambda m: Reduces(eval, (f"open({str(m)!r}, 'w').close()",)),
    "exec": lambda m: Reduces(exec, (f"open({str(m)!r}, 'w').close()",)),
    "builtins.getattr": lambda m: Reduces(BoundMethod(m), ()),
    "subprocess.call": lambda m: Reduces(subprocess.call, (["touch", str(m)],)),
    "subprocess.Popen": lambda m: Reduces(subprocess.Popen, (["touch", str(m)],)),
    "a class's __setstate__": lambda m: WritesOnSetstate(m),
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_no_payload_runs_through_any_reader(capsys, tmp_path, payload):
    marker = tmp_path / "ran"
    state = bn_model_state()
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "extra": PAYLOADS[payload](marker)}, path)
    legacy = tmp_path / "evil-legacy.pt"
    torch.save({"state_dict": state, "extra": PAYLOADS[payload](marker)}, legacy, _use_new_zipfile_serialization=False)
    for file in (path, legacy):
        code, out, err = run_cli(capsys, "probe", file, "--out", tmp_path / "probe.h5", "--brief")
        assert code == 0, err
        assert "stood in for" in out
        with open_tensors(file) as tensors:
            np.testing.assert_array_equal(FileTensors.read(tensors.tensors["bn1.weight"]),
                                          state["model.bn1.weight"].numpy())
        assert torch.equal(read_checkpoint(file)["state_dict"]["model.bn1.weight"], state["model.bn1.weight"])
    assert not marker.exists()
    # The payload is live: an ordinary unpickler runs it.
    pickle.loads(pickle.dumps(PAYLOADS[payload](marker)))
    for _ in range(100):  # (a process started by Popen may take a moment)
        if marker.exists():
            break
        import time

        time.sleep(0.05)
    assert marker.exists()


def test_a_payload_in_place_of_the_state_dict_is_one_line_naming_it(capsys, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": Reduces(os.system, (f"touch {marker}",))}, tmp_path / "evil.pt")
    code, _, err = run_cli(capsys, "probe", tmp_path / "evil.pt", "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, "holds no state dict")
    assert "1 posix object in state_dict stood in for" in err and not marker.exists()


# ---- bounds ------------------------------------------------------------------------------------------------


def test_a_pickle_over_the_size_bound_is_refused_before_it_is_read():
    with pytest.raises(BnprobeError, match="more than the 64 MiB bnprobe reads"):
        inert_load(b"\x80\x02" + b"N" * MAX_PICKLE_BYTES + b".", lambda s: s, "x.pkl")


def test_a_deeply_nested_pickle_is_read_and_walked_without_recursion():
    from bnprobe.files.inert_pickle import stand_note

    depth = 200_000  # 100,000 lists, each appended to the one below it: [[[...]]]
    data = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    obj = inert_load(data, lambda s: s, "deep.pkl")
    assert isinstance(obj, list) and stand_note(obj) == ""


def test_a_storage_larger_than_its_archive_entry_is_refused(capsys, tmp_path):
    def forge(pickle: bytes) -> bytes:
        # The first storage's element count (BININT1 4 after its location 'cpu', later ones a memo's) made 10**6.
        forged, changed = re.subn(rb"cpuq(.)K\x04t", lambda m: b"cpuq" + m.group(1) + b"J@B\x0f\x00t", pickle,
                                  flags=re.S)
        assert changed == 1
        return forged

    path = forged_bn_archive(tmp_path / "m.pt", forge)
    code, _, err = run_cli(capsys, "probe", path, "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, "declares 4,000,000 bytes, the archive holds 16")


def test_a_forged_bytearray_length_is_one_line(tmp_path):
    """BYTEARRAY8 claiming 2**59 bytes: CPython's unpickler would fail to free it cleanly and print a second line
    on stderr; its opcodes are walked first, and protocol 5's buffers refused (torch.save never writes them)."""
    import zipfile

    from conftest import REPO

    path = tmp_path / "m.pt"
    torch.save({"bn.weight": torch.ones(4)}, path)
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = entries[name][:-1] + b"\x96" + (1 << 59).to_bytes(8, "little") + b"ab."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    done = subprocess.run([sys.executable, "-m", "bnprobe", "probe", str(path), "--out", str(tmp_path / "p.h5")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "not a readable pickle (expected 576460752303423488 bytes in a bytearray8" in done.stderr
