"""torch.save's files read without torch and without running them: the zip archive (a pickle, `data.pkl`, whose
tensors name storages, and each storage's raw bytes in its own uncompressed entry `data/KEY`) and the legacy
format (pickles one after another, then each storage's element count and bytes). The pickle is read by
bnprobe.files.inert_pickle; here each storage it names is found in the file, checked against the bytes the file
holds for it, and given the offset its bytes start at. Nothing is read of a tensor until it is asked for
(bnprobe.files.file_tensors reads it with numpy).
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from bnprobe.core.errors import BnprobeError, first_line, printable
from bnprobe.files.inert_pickle import ITEMSIZE, MAX_PICKLE_BYTES, Storage, inert_load, pickle_end

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy files begin with a pickle of this number
LEGACY_PROTOCOL = 1001
LOCAL_HEADER = 30  # bytes of a zip entry's local header before its name and extra field


def read_archive(path: Path) -> Any:
    """The object a torch.save zip archive holds, its tensors as StoredTensors (see the module)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            pickles = [info for info in infos if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1]
            if len(pickles) != 1:
                raise BnprobeError(f"{path} is not a torch.save archive (no single ARCHIVE/data.pkl in it)")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise BnprobeError(f"{path}: its pickle is {pickles[0].file_size:,} bytes, more than the "
                                   f"{MAX_PICKLE_BYTES >> 20} MiB bnprobe reads (a state dict's takes ~200 bytes a "
                                   f"tensor)")
            prefix = pickles[0].filename[: -len("data.pkl")]
            data = archive.read(pickles[0])
            names = {info.filename: info for info in infos}
            order = names.get(prefix + "byteorder")
            byteorder = archive.read(order).decode("ascii", "replace") if order and order.file_size < 16 else "little"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise BnprobeError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged: not a complete zip "
                           f"archive, {first_line(exc)})") from None
    if byteorder not in ("little", "big"):
        raise BnprobeError(f"{path}: its byteorder record says {printable(byteorder)!r}, not little or big")
    size = os.stat(path).st_size
    found: dict[str, Storage] = {}

    def storage(wanted: Storage) -> Storage:
        if wanted.key in found:
            return found[wanted.key]
        info = names.get(f"{prefix}data/{wanted.key}")
        if info is None:
            raise BnprobeError(f"a tensor's storage data/{printable(wanted.key)} is not in the archive")
        if info.compress_type != zipfile.ZIP_STORED:
            raise BnprobeError(f"storage data/{printable(wanted.key)} is compressed (torch.save stores them as "
                               f"they are)")
        need = wanted.numel * ITEMSIZE.get(wanted.dtype, 1)
        if info.file_size < need:
            raise BnprobeError(f"storage data/{printable(wanted.key)} declares {need:,} bytes, the archive holds "
                               f"{info.file_size:,}")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            head = f.read(LOCAL_HEADER)
        if len(head) != LOCAL_HEADER or head[:4] != b"PK\x03\x04":
            raise BnprobeError(f"storage data/{printable(wanted.key)}: damaged zip entry header")
        name_length, extra_length = struct.unpack("<HH", head[26:30])
        wanted.start = info.header_offset + LOCAL_HEADER + name_length + extra_length
        if wanted.start + need > size:
            raise BnprobeError(f"storage data/{printable(wanted.key)} runs past the file's end")
        wanted.byteorder = byteorder
        found[wanted.key] = wanted
        return wanted

    return inert_load(data, storage, str(path))


def _legacy_pickles(path: Path, head: bytes, storage: Any) -> tuple[Any, Any, int]:
    """A legacy file's object and storage keys from its first bytes `head`, and where its storages begin."""
    none = lambda wanted: wanted  # noqa: E731 - the file's other pickles name no storage
    position = 0

    def next_pickle(names_storages: bool) -> Any:
        nonlocal position
        end = pickle_end(head, position, str(path))
        obj = inert_load(head[position:end], storage if names_storages else none, str(path))
        position = end
        return obj

    if next_pickle(False) != LEGACY_MAGIC:
        raise BnprobeError(f"{path} is a pickle, not a torch.save file (no torch magic number)")
    if next_pickle(False) != LEGACY_PROTOCOL:
        raise BnprobeError(f"{path}: a torch legacy file of another protocol version")
    next_pickle(False)  # sys_info: byte order and sizes (little-endian assumed, as torch does)
    obj = next_pickle(True)
    keys = next_pickle(False)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise BnprobeError(f"{path}: damaged torch legacy file (no list of storage keys after the pickle)")
    return obj, keys, position


def read_legacy(path: Path) -> Any:
    """The object a legacy torch.save file holds (see the module), its tensors as StoredTensors."""
    size = os.stat(path).st_size
    storages: dict[str, Storage] = {}

    def storage(wanted: Storage) -> Storage:
        return storages.setdefault(wanted.key, wanted)

    # The pickles come first, of unknown length: read 1 MiB of the file, more (to MAX_PICKLE_BYTES) if they need it.
    wanted, limit = 1 << 20, MAX_PICKLE_BYTES + (1 << 16)
    while True:
        try:
            with open(path, "rb") as f:
                head = f.read(wanted)
        except OSError as exc:
            raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
        try:
            obj, keys, position = _legacy_pickles(path, head, storage)
            break
        except BnprobeError:
            if len(head) < wanted or wanted >= limit:
                raise
            storages.clear()
            wanted = min(8 * wanted, limit)
    try:
        with open(path, "rb") as f:
            for key in keys:
                f.seek(position)
                count_bytes = f.read(8)
                if len(count_bytes) != 8:
                    raise BnprobeError(f"{path} ends early (storage {printable(key[:40])} is missing)")
                count = int.from_bytes(count_bytes, "little")
                held = storages.get(key)
                if held is None or count != held.numel:
                    declared = f"its tensors declare {held.numel:,}" if held else "no tensor names it"
                    raise BnprobeError(f"{path}: damaged torch legacy file (storage {printable(key[:40])} holds "
                                       f"{count:,} elements, {declared})")
                held.start = position + 8
                position += 8 + count * ITEMSIZE.get(held.dtype, 1)
                if position > size:
                    raise BnprobeError(f"{path} ends early (storage {printable(key[:40])} runs past its end)")
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    missing = [key for key, held in storages.items() if held.start < 0]
    if missing:
        raise BnprobeError(f"{path}: damaged torch legacy file (storage {printable(missing[0][:40])} has no bytes)")
    return obj
