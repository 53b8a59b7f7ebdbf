import errno
import os
import shutil
import threading

import h5py
import numpy as np
import pytest

from bnprobe.core.errors import BnprobeError
from bnprobe.files.schema import open_h5
from bnprobe.files.store import _differences, append_rows, appending_h5, atomic_h5, journal_path, write_array
from bnprobe.training.telemetry import FILE_OPTIONS as TELEMETRY_OPTIONS


def _contents(path) -> dict:
    """Every dataset of an HDF5 file, read through bnprobe's reader (which sees a pending journal)."""
    found = {}
    with open_h5(path) as f:
        f.visititems(lambda name, obj: found.update({name: obj[:].tolist()}) if isinstance(obj, h5py.Dataset) else None)
    return found


def _layers(path, layers=6, channels=64):
    """A small telemetry-like file: per layer a (1, C) snapshot; the same layout bnprobe creates."""
    rng = np.random.default_rng(0)
    with atomic_h5(path, **TELEMETRY_OPTIONS) as f:
        for i in range(layers):
            append_rows(f.require_group(f"bn/l{i}"), "gamma", rng.random((1, channels), dtype=np.float32), units="1")
        append_rows(f.require_group("epochs"), "loss", np.array([0.5]))


def _append_epoch(path, value: float):
    rng = np.random.default_rng(int(value))
    with appending_h5(path) as f:
        for name in f["bn"]:
            append_rows(f["bn"][name], "gamma", rng.random((1, f["bn"][name]["gamma"].shape[1]), dtype=np.float32))
        append_rows(f["epochs"], "loss", np.array([value]))


def test_append_in_place(tmp_path):
    path = tmp_path / "t.h5"
    with atomic_h5(path) as f:
        append_rows(f.require_group("g"), "x", np.arange(6.0).reshape(3, 2), units="1")
    for i in range(3):
        with appending_h5(path) as f:
            append_rows(f["g"], "x", np.full((2, 2), i))
            write_array(f, "w", np.arange(1000 + i))
    with h5py.File(path, "r") as f:
        assert f["g/x"][:].tolist() == np.arange(6.0).reshape(3, 2).tolist() + [[i, i] for i in range(3) for _ in "ab"]
        assert f["g/x"].attrs["units"] == "1" and f["g/x"].compression == "gzip" and f["w"][-1] == 1001
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def _bytes_written() -> int:
    """Every byte this process has passed to write(2), pwrite(2) and the like."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_an_append_costs_its_rows_not_the_file(tmp_path):
    path = tmp_path / "t.h5"
    _layers(path, channels=1024)
    for epoch in range(30):
        _append_epoch(path, epoch)
    size, written = path.stat().st_size, _bytes_written()
    _append_epoch(path, 30.0)
    written = _bytes_written() - written
    new_rows = 6 * 1024 * 4  # random float32: gzip hardly shrinks them
    assert 0.8 * new_rows < path.stat().st_size - size < 1.2 * new_rows
    assert written < 1.25 * new_rows < size / 10  # the rows, and the few metadata bytes that change (twice)


def test_only_the_differing_bytes_are_journaled():
    rng = np.random.default_rng(1)
    old = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
    new = bytearray(old)
    for at in (3, 30, 31, 2000, 4999):
        new[at] ^= 0xFF
    runs = _differences(100, bytes(new), old)
    assert {k: len(v) for k, v in runs.items()} == {103: 29, 2100: 1, 5099: 1}  # 3..31 joined (gap <= 32)
    patched = bytearray(old)
    for at, data in runs.items():
        patched[at - 100:at - 100 + len(data)] = data
    assert bytes(patched) == bytes(new) and _differences(0, old, old) == {}


def test_a_failed_update_leaves_the_previous_file(tmp_path):
    path = tmp_path / "t.h5"
    _layers(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with appending_h5(path) as f:
            write_array(f, "a", np.arange(10))
            raise RuntimeError("failed mid-update")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


@pytest.mark.parametrize("where", ["new bytes", "journal"])
def test_a_full_disk_during_an_update_is_one_line_and_changes_nothing(tmp_path, monkeypatch, where):
    path = tmp_path / "t.h5"
    _layers(path)
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "new bytes":
        monkeypatch.setattr(os, "pwrite", full)
    else:
        real_open = open
        monkeypatch.setattr("bnprobe.files.atomic.open", lambda *a, **k: type("F", (), {
            "__enter__": lambda self: self, "__exit__": lambda self, *e: real_open(a[0], "wb").close(),
            "write": full})(), raising=False)
    with pytest.raises(BnprobeError, match="no space left on device") as caught:
        _append_epoch(path, 1.0)
    assert "\n" not in str(caught.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]


def test_a_kill_at_any_point_of_an_append_leaves_the_old_or_the_new_file(tmp_path, monkeypatch):
    """Every state a kill -9 can leave: the folder copied before each system call that changes a file (and
    halfway through each pwrite). Read, each is exactly the old or the new file, never a torn one; the next
    append (a resumed run) then continues from it."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "t.h5"
    _layers(path)
    _append_epoch(path, 1.0)
    old = _contents(path)
    states, copying = [], []

    def keep():
        if not copying:
            copying.append(1)
            shutil.copytree(run, tmp_path / f"state{len(states)}")
            states.append(tmp_path / f"state{len(states)}")
            copying.clear()

    def hook(name):
        real = getattr(os, name)

        def call(*args, **kwargs):
            keep()
            if name == "pwrite" and not copying:
                real(args[0], bytes(args[1])[:len(args[1]) // 2], args[2])
                keep()
            return real(*args, **kwargs)
        monkeypatch.setattr(os, name, call)

    for name in ("pwrite", "ftruncate", "replace", "unlink"):
        hook(name)
    _append_epoch(path, 2.0)
    keep()
    monkeypatch.undo()
    new = _contents(path)
    assert new != old and len(states) > 10
    seen = []
    for state in states:
        journal = (state / "t.h5.journal").exists()
        contents = _contents(state / "t.h5")
        assert contents in (old, new), state
        seen.append((journal, contents == new))
        _append_epoch(state / "t.h5", 3.0)  # recovers, then appends
        after = _contents(state / "t.h5")
        assert after["epochs/loss"] == contents["epochs/loss"] + [3.0]
        assert not (state / "t.h5.journal").exists()
    assert {(False, False), (True, True), (False, True)} <= set(seen)  # old; torn file read through the journal; new


def test_an_update_waits_for_a_reader_to_close_the_file(tmp_path):
    path = tmp_path / "t.h5"
    _layers(path)
    reader = h5py.File(path, "r")  # HDF5 holds a shared flock while the file is open
    writer = threading.Thread(target=_append_epoch, args=(path, 1.0))
    with pytest.warns(UserWarning, match="open in another process; waiting"):  # the stall is explained
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive() and reader["epochs/loss"][:].tolist() == [0.5]  # waiting, the file as it was
        reader.close()
        writer.join(timeout=30)
    assert not writer.is_alive() and _contents(path)["epochs/loss"] == [0.5, 1.0]


def test_a_new_file_drops_the_journal_of_the_one_it_replaces(tmp_path):
    path = tmp_path / "t.h5"
    _layers(path)
    _append_epoch(path, 1.0)
    journal_path(path).write_bytes(b"stale")  # a kill's leftover: applying it to a new file would tear it
    _layers(path)
    assert not journal_path(path).exists() and _contents(path)["epochs/loss"] == [0.5]


@pytest.mark.parametrize("journal", ["checksum", "fifo", "large", "empty", "garbage"])
def test_a_damaged_journal_is_one_line_saying_how_to_recover(tmp_path, journal):
    path = tmp_path / "t.h5"
    _layers(path)
    before = _contents(path)
    if journal == "fifo":
        os.mkfifo(journal_path(path))  # never opened: it would block
    elif journal in ("empty", "garbage"):
        journal_path(path).write_bytes(b"" if journal == "empty" else b"\x00garbage" * 10)
    else:
        size = 30 if journal == "checksum" else 3 * path.stat().st_size + (1 << 20)
        journal_path(path).write_bytes(b"bnprobe-journal 1\n" + bytes(size))
    for action in (lambda: open_h5(path), lambda: _append_epoch(path, 1.0)):
        with pytest.raises(BnprobeError, match="t.h5.journal is damaged") as raised:
            action()
        # issue 21 (15): a 0-byte journal made the file unreadable with no hint
        assert f"move it aside (mv {journal_path(path)} {journal_path(path)}.damaged) to read t.h5 as it was" \
               in str(raised.value) and "\n" not in str(raised.value)
    journal_path(path).rename(tmp_path / "t.h5.journal.damaged")  # as the message says
    assert _contents(path) == before


def test_open_h5_errors(tmp_path):
    with pytest.raises(BnprobeError, match="no such file"):
        open_h5(tmp_path / "missing.h5")
    (tmp_path / "bad.h5").write_text("not hdf5")
    with pytest.raises(BnprobeError, match="not a readable HDF5 file"):
        open_h5(tmp_path / "bad.h5")


def test_many_strings_are_stored_uncompressed(tmp_path):
    # variable-length strings take no filters: a deep model's 465 parameter names once crashed h5py's writer
    names = [f"layer3.{i}.bn3.bias" for i in range(465)]
    with atomic_h5(tmp_path / "n.h5") as f:
        write_array(f, "name", names)
    with h5py.File(tmp_path / "n.h5", "r") as f:
        assert list(f["name"].asstr()[:]) == names
