"""HDF5 storage. HDF5 itself never writes to disk (it crashes on a full one): a new file is built in memory
and its bytes written to a temporary file renamed into place; a file that grows (telemetry.h5, every epoch)
is updated in place through a journal, at a cost proportional to the bytes that change, not to the file.
Either way a crash at any moment leaves a complete file: the previous one, or the new one. The schemas
themselves are documented in docs/hdf5-schema.md; reading them back goes through bnprobe.files.schema.

The journal (`NAME.journal` beside the file): HDF5 writes the update into an in-memory overlay of the file
(`_Overlay`). On success the new bytes past the file's end (new chunks) are appended to it, unseen by the
old state, which ends before them; the bytes that change within the old file (small: metadata) are written
to the journal (atomically: temp + rename), then copied into the file in place, and the journal removed. A
full disk is met while appending or journaling, before anything the old state reads has changed. A kill
before the journal exists leaves the old state; after, file and journal hold the whole new state: the next
writer finishes the copy (`recover`), and readers (`read_view`) read the file through the journal, so none
ever sees a torn update.
"""

from __future__ import annotations

import bisect
import fcntl
import io
import os
import stat
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import h5py
import numpy as np

from bnprobe.core.errors import BnprobeError
from bnprobe.files.atomic import _disk_full, atomic_write

COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)


JOURNAL_MAGIC = b"bnprobe-journal 1\n"
_HEADER, _EXTENT = struct.Struct("<QQ"), struct.Struct("<QQ")  # (file size, extents), (offset, length)


@contextmanager
def atomic_h5(path: Path, **options: Any) -> Iterator[h5py.File]:
    """A new HDF5 file in memory (h5py.File `options`, e.g. libver), written over `path` atomically on success."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", **options) as f:
        yield f
    journal_path(path).unlink(missing_ok=True)  # a kill's pending update of the old file: never of this one
    atomic_write(Path(path), lambda out: out.write(buffer.getbuffer()))


@contextmanager
def appending_h5(path: Path) -> Iterator[h5py.File]:
    """`path` open for update; on success its changes are committed in place through the journal (see the
    module docstring), at a cost proportional to the bytes HDF5 changed."""
    path = Path(path)
    recover(path)
    with _Overlay(path) as overlay:
        with h5py.File(overlay, "r+") as f:
            yield f
        if overlay.extents or overlay.size != overlay.base_size:
            _commit(path, overlay)


def journal_path(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".journal")


def read_view(path: Path) -> Any:
    """What h5py.File should open to read `path`: the path itself, or, while a journal is pending (a kill
    interrupted its commit), the file seen through it (a file object)."""
    journal = journal_path(path)
    if not journal.exists():
        return path
    overlay = _Overlay(path, shared=True)  # read the journal under the lock: then it matches the file
    try:
        overlay.size, overlay.extents = _read_journal(journal)
    except FileNotFoundError:  # a writer finished it meanwhile
        overlay.close()
        return path
    except BaseException:
        overlay.close()
        raise
    overlay.starts = sorted(overlay.extents)
    return overlay


def recover(path: Path) -> None:
    """Finish the commit a kill interrupted: copy a pending journal into `path`, then remove it."""
    journal = journal_path(path)
    if journal.exists():
        size, extents = _read_journal(journal)
        _apply(path, size, extents)
        journal.unlink()


def _commit(path: Path, overlay: "_Overlay") -> None:
    """New bytes past the file's old end go straight into it (the old state never reads them); the journal
    holds only the bytes that change in place (metadata: a few hundred per dataset), then they are applied."""
    tail, changed = {}, {}
    for start, data in overlay.extents.items():
        cut = max(0, min(len(data), overlay.base_size - start))
        if cut:
            changed.update(_differences(start, data[:cut], os.pread(overlay.fd, cut, start)))
        if cut < len(data):
            tail[start + cut] = data[cut:]
    with open(path, "r+b") as f:
        try:
            for start, data in tail.items():  # a full disk is met here or in the journal, before any change
                os.pwrite(f.fileno(), data, start)
            if overlay.size > overlay.base_size:  # to the new size even where HDF5 wrote nothing (yet)
                os.ftruncate(f.fileno(), overlay.size)
            os.fdatasync(f.fileno())
            atomic_write(journal_path(path), lambda out: _write_journal(out, overlay.size, changed))
        except BaseException as exc:
            if not journal_path(path).exists():  # (if it was renamed into place, the new state needs them)
                os.ftruncate(f.fileno(), overlay.base_size)  # the new bytes, unseen, are dropped again
            if _disk_full(exc):
                raise BnprobeError(f"cannot write {path}: no space left on device") from None
            raise
    _apply(path, overlay.size, changed)
    journal_path(path).unlink()


def _differences(start: int, new: bytes, old: bytes, gap: int = 32) -> dict[int, bytes]:
    """The runs of `new` that differ from `old` (runs closer than `gap` joined), by offset from `start`: HDF5
    rewrites a whole object header or index block where a few bytes changed (a size, a checksum)."""
    at = np.flatnonzero(np.frombuffer(new, np.uint8) != np.frombuffer(old, np.uint8))
    if not len(at):
        return {}
    breaks = np.flatnonzero(np.diff(at) > gap)
    firsts, lasts = at[np.r_[0, breaks + 1]], at[np.r_[breaks, len(at) - 1]]
    return {start + int(a): bytes(new[a:b + 1]) for a, b in zip(firsts, lasts)}


def _apply(path: Path, size: int, extents: Mapping[int, bytes]) -> None:
    """Write `extents` into `path` in place and set its size; exclusive of readers (HDF5 holds a shared flock
    on a file it has open for reading, and so does read_view), so none reads it half-written."""
    with open(path, "r+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a reader (a notebook's h5py.File, say) has it open: say why we stall
            warnings.warn(f"{path} is open in another process; waiting for it to close the file to finish "
                          f"this update (the data is safe in {journal_path(path).name} meanwhile)", stacklevel=2)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        for offset, data in extents.items():
            os.pwrite(f.fileno(), data, offset)
        os.ftruncate(f.fileno(), size)
        os.fsync(f.fileno())


def _write_journal(out, size: int, extents: Mapping[int, bytes]) -> None:
    crc = 0
    for part in (JOURNAL_MAGIC, _HEADER.pack(size, len(extents)),
                 *(b for offset, data in extents.items() for b in (_EXTENT.pack(offset, len(data)), data))):
        out.write(part)
        crc = zlib.crc32(part, crc)
    out.write(struct.pack("<I", crc))


def _read_journal(journal: Path) -> tuple[int, dict[int, bytes]]:
    """(file size, {offset: bytes}) of a journal, each extent within the file (which its update has already
    extended); anything else (damaged, not a regular file, larger than the file can need) is a one-line
    BnprobeError, found before the journal is read or opened."""
    def damaged(why: str):
        # Not recovered by itself: an update is applied only once its journal is whole on disk (fsync, then
        # rename), so a damaged one was damaged afterwards, and whether the writer had begun to apply it (a
        # torn file, which only the journal completes) cannot be known. Without it the file reads as it was
        # before the update, when that was not begun (a kill before the checkpoint: a resume trains it again).
        name = journal.with_suffix("").name
        raise BnprobeError(f"{journal} is damaged ({why}), so the update of {name} it holds cannot be completed; "
                           f"move it aside (mv {journal} {journal}.damaged) to read {name} as it was before that "
                           f"update (only that update is lost: an unfinished run's train --resume trains its epoch "
                           f"again; a finished run keeps its checkpoint and metrics, without that epoch's telemetry)")

    info, file_size = os.stat(journal), os.stat(journal.with_suffix("")).st_size
    if not stat.S_ISREG(info.st_mode) or info.st_size > 2 * file_size + (1 << 20):  # a FIFO would block
        damaged("not a journal bnprobe wrote")
    if not info.st_size:
        damaged("it is empty")
    data = memoryview(journal.read_bytes())
    body, crc = data[:-4], data[-4:]
    if len(data) < len(JOURNAL_MAGIC) + _HEADER.size + 4 or bytes(body[:len(JOURNAL_MAGIC)]) != JOURNAL_MAGIC \
            or struct.unpack("<I", crc)[0] != zlib.crc32(body):
        damaged("its checksum does not match")
    at = len(JOURNAL_MAGIC)
    size, count = _HEADER.unpack_from(body, at)
    at += _HEADER.size
    extents = {}
    for _ in range(count):
        offset, length = _EXTENT.unpack_from(body, at)
        at += _EXTENT.size
        extents[offset] = bytes(body[at:at + length])
        at += length
        if offset + length > size or len(extents[offset]) != length:
            damaged("an extent lies outside the file")
    if size > file_size:
        damaged("the file is shorter than the update it holds")
    return size, extents


class _Overlay:
    """A file object for h5py's fileobj driver: reads `path` (read-only), keeps every write in memory as
    non-overlapping extents {offset: bytearray}, so HDF5 never writes to the disk itself."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        if shared:  # a reader: _apply waits for it to close
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        self.base_size = self.size = os.fstat(self.fd).st_size
        self.extents: dict[int, bytearray] = {}
        self.starts: list[int] = []  # sorted keys of extents
        self.pos = 0

    def __repr__(self) -> str:  # h5py names the file by it (f.filename, in error messages)
        return str(self.path)

    def __enter__(self) -> "_Overlay":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    __del__ = close  # a reader's overlay ends with the h5py.File that holds it

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        lo = self.pos
        n = max(0, min(len(view), self.size - lo))
        got = os.preadv(self.fd, [view[:n]], lo) if n else 0
        view[got:n] = bytes(n - got)  # past the file's end on disk: zeros, as HDF5 expects
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        while i < len(self.starts) and self.starts[i] < lo + n:
            start = self.starts[i]
            data = self.extents[start]
            a, b = max(start, lo), min(start + len(data), lo + n)
            if a < b:
                view[a - lo:b - lo] = data[a - start:b - start]
            i += 1
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buffer = bytearray(max(0, self.size - self.pos) if n < 0 else n)
        return bytes(buffer[:self.readinto(buffer)])

    def write(self, data: Any) -> int:
        data = bytes(data)  # h5py passes a view of HDF5's own buffer
        lo, hi = self.pos, self.pos + len(data)
        i = max(0, bisect.bisect_right(self.starts, lo) - 1)
        touching = []  # extents that overlap or abut [lo, hi): merged into one
        while i < len(self.starts) and self.starts[i] <= hi:
            start = self.starts[i]
            if start + len(self.extents[start]) >= lo:
                touching.append((start, self.extents.pop(start)))
                del self.starts[i]
            else:
                i += 1
        first = min([lo] + [s for s, _ in touching])
        merged = bytearray(max([hi] + [s + len(d) for s, d in touching]) - first)
        for start, old in touching:
            merged[start - first:start - first + len(old)] = old
        merged[lo - first:hi - first] = data
        bisect.insort(self.starts, first)
        self.extents[first] = merged
        self.pos, self.size = hi, max(self.size, hi)
        return len(data)

    def truncate(self, size: Optional[int] = None) -> int:
        self.size = self.pos if size is None else size
        for start in [s for s in self.starts if s + len(self.extents[s]) > self.size]:
            if start >= self.size:
                del self.extents[start]
                self.starts.remove(start)
            else:
                self.extents[start] = self.extents[start][:self.size - start]
        return self.size

    def flush(self) -> None:
        pass


def file_format(f) -> str:
    """The file's `format` attribute; "" when it has none, or one that is not text."""
    try:
        value = f.attrs.get("format", "")
    except (OSError, TypeError, ValueError):  # a type h5py cannot map
        return ""
    value = value.decode(errors="replace") if isinstance(value, bytes) else value
    return value if isinstance(value, str) else ""


def h5_format(path: Path) -> str:
    """The `format` attribute of an HDF5 file (e.g. "bnprobe-probe"); "" for anything else."""
    if not Path(path).is_file():  # never open a FIFO or device: that could block
        return ""
    try:
        with h5py.File(path, "r") as f:
            return file_format(f)
    except (OSError, ValueError):
        return ""


def check_replaceable(path: Path, kind: str) -> None:
    """Before any slow work: an existing `path` is replaced only by a file of its own kind (its `format`
    attribute is `kind`), so an --out naming a run's checkpoint.pt or telemetry.h5 destroys nothing."""
    path = Path(path)
    if not os.path.lexists(path) or path.is_dir():  # nothing to lose; replacing() answers a folder
        return
    found = h5_format(path)
    if found != kind:
        what = f"a {found} file" if found else "not a file bnprobe wrote"
        raise BnprobeError(f"will not replace {path}: it is {what}, and only a {kind} file is replaced by this "
                           f"command; name another output file")


def provenance(**options: Any) -> dict[str, str]:
    """Attributes saying what wrote a result file: bnprobe's and torch's versions, and each options dataclass
    given (e.g. load=LoadOptions, probe=ProbeOptions) as JSON in `options_json`. torch's version is the loaded
    torch's, or, where nothing needed torch (a static probe), the installed one's, read without importing it."""
    import dataclasses
    import importlib.metadata
    import json
    import sys

    from bnprobe import __version__

    settings = {name: dataclasses.asdict(value) for name, value in options.items()}
    torch = sys.modules.get("torch")
    try:
        version = str(torch.__version__) if torch else importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    return {"bnprobe_version": __version__, "torch_version": version,  # a str subclass h5py refuses
            "options_json": json.dumps(settings, sort_keys=True, default=str)}


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Store plain values as HDF5 attributes; None becomes the string 'none' (HDF5 has no null)."""
    for key, value in attrs.items():
        obj.attrs[key] = "none" if value is None else value


def append_rows(group: h5py.Group, name: str, rows: np.ndarray, **attrs: Any) -> h5py.Dataset:
    """Append along axis 0 to a chunked, compressed, resizable dataset (created on first use). A chunk holds
    the first append (within 1 MiB), and at least 256 bytes: appends like it then write new chunks, and rewrite
    at most a small partial one, so an append in place (appending_h5) costs about its own rows."""
    rows = np.asarray(rows)
    if name not in group:
        row_bytes = max(1, rows[0].nbytes if len(rows) else 1)
        chunk_rows = max(1, min(max(len(rows), -(-256 // row_bytes)), (1 << 20) // row_bytes))
        dataset = group.create_dataset(
            name, data=rows, maxshape=(None, *rows.shape[1:]), chunks=(chunk_rows, *rows.shape[1:]), **COMPRESSION
        )
        set_attrs(dataset, attrs)
        return dataset
    dataset = group[name]
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows
    return dataset


def write_array(group: h5py.Group, name: str, data: np.ndarray, **attrs: Any) -> h5py.Dataset:
    """Write a whole array (replacing any dataset of that name), compressed when it is worth it."""
    if name in group:
        del group[name]
    data = np.asarray(data)
    options = COMPRESSION if data.size >= 256 else {}
    if data.dtype.kind in "UO":  # text: variable-length UTF-8, readable by any HDF5 tool (no filters on vlen)
        options = {"dtype": h5py.string_dtype()}
        data = data.astype(object)
    dataset = group.create_dataset(name, data=data, **options)
    set_attrs(dataset, attrs)
    return dataset
