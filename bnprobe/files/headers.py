"""What a checkpoint file says about itself, read without torch: torch.save's first bytes, a safetensors file's
JSON header, a bnprobe export's metadata. bnprobe.files.checkpoints opens the tensors behind them; the report
reads exports' headers here alone (it never imports torch)."""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bnprobe.core.config import check_settings
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.formats import EXPORT_FORMATS
from bnprobe.files.schema import json_type, regular_file

SAFETENSORS_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own cap on its JSON header


def torch_file_kind(path: Path) -> str:
    """What a file's first bytes say torch.save made of it: "zip" (its archive), "pickle" (the legacy format:
    PROTO 0x80 and a protocol number), or "" (anything else, an empty file included), which is never handed
    to an unpickler. Reads 4 bytes, with no torch import."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    if head == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    return ""


def check_complete(path: Path) -> str:
    """A torch file's kind ("zip" or "pickle"), checked as far as it can be without reading its tensors: a zip
    archive keeps its central directory at the end, so opening it catches a copy cut short (a legacy pickle has
    no such cheap check and is taken as it is). Anything else is one line."""
    kind = torch_file_kind(regular_file(path))
    if not kind:
        raise BnprobeError(f"{path} is empty" if not os.stat(path).st_size else
                           f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    if kind == "zip":
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise BnprobeError(f"{path} is truncated or damaged (not a complete zip archive: {first_line(exc)})")
    return kind


def is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then the JSON header."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False  # read_checkpoint says why in one line
    return len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size


@dataclass
class ExportHeader:
    """What a bnprobe export's header says, read without torch: enough for the report's table."""

    format: str  # FULL_FORMAT or COMPACT_FORMAT
    config: dict[str, Any]  # TrainConfig's types checked; unknown or missing settings left to the caller
    epoch: int
    metadata: dict[str, str]
    numbers: int  # elements stored in the file
    full_bytes: Optional[int]  # a compact file: the full state dict's bytes as safetensors


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, checked: a regular file, 8 bytes of little-endian length within the file
    and safetensors' own cap, a JSON object whose `__metadata__` maps text to text and whose every tensor has a
    dtype, a shape and data inside the file. No tensor data is read."""
    regular_file(path)
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise BnprobeError(f"{path} is not a safetensors file (no header length in its first 8 bytes)")
            data = f.read(length)
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    try:
        header = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON, an integer of 4,300+ digits
        raise BnprobeError(f"{path} is not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise BnprobeError(f"{path} is not a safetensors file (its header is {json_type(header)}, not an object)")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BnprobeError(f"{path}: the safetensors metadata must map names to text")
    room = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(entry.get("dtype"), str) and _naturals(shape) and _naturals(offsets) and len(offsets) == 2
                and offsets[0] <= offsets[1] <= room):
            raise BnprobeError(f"{path}: damaged safetensors header at tensor {name!r} (a dtype, a shape and "
                               f"data_offsets inside the file's {room:,} bytes of data)")
    return header


def _naturals(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def export_fields(metadata: dict[str, str], path: Path) -> tuple[dict[str, Any], int]:
    """(config, epoch) from a bnprobe export's metadata; one line naming the file when they are damaged."""
    try:
        config = json.loads(metadata["config"])
        epoch = int(metadata.get("epoch", 0))
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        raise BnprobeError(f"{path}: damaged bnprobe export metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise BnprobeError(f"{path}: damaged bnprobe export metadata (its config is {json_type(config)})")
    check_settings(config, f"{path}: config")
    return config, epoch


def read_export_header(path: Path) -> Optional[ExportHeader]:
    """A `bnprobe export` file's header; None for any other safetensors file."""
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", {})
    if metadata.get("format") not in EXPORT_FORMATS:
        return None
    config, epoch = export_fields(metadata, path)
    full_bytes = metadata.get("full_bytes")
    if full_bytes is not None and not full_bytes.isdigit():
        raise BnprobeError(f"{path}: damaged bnprobe export metadata (full_bytes {full_bytes[:20]!r})")
    return ExportHeader(metadata["format"], config, epoch, metadata,
                        sum(math.prod(entry["shape"]) for entry in header.values()),
                        int(full_bytes) if full_bytes is not None else None)
