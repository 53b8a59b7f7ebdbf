"""Checkpoints as Hugging Face publishes them: a model folder (what `save_pretrained` writes and the hub serves)
or its index file, `model.safetensors.index.json` or `pytorch_model.bin.index.json`, whose `weight_map` names
the shard file that holds each tensor. Read here without torch; bnprobe.files.checkpoints opens the shards.

An index comes from anywhere, so it is checked before any shard is opened: its size (schema.read_json), a JSON
object whose `weight_map` maps tensor names to shard files, at most MAX_SHARDS shards, and each shard a relative
path that stays in the index's folder (no absolute path, no `..`, no link leading elsewhere) to a regular file
that exists. Each fault is one line naming the index.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bnprobe.core.errors import NAME_MAX, PATH_MAX, BnprobeError, printable
from bnprobe.core.formats import CHECKPOINT_FILE
from bnprobe.files.schema import json_type, read_json, regular_file

# The names `save_pretrained` gives, safetensors first: both are often published side by side, and a
# safetensors shard holds no pickle at all.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")  # an unsharded model folder
INDEX_SUFFIX = ".index.json"
# Each shard holding a norm tensor stays open (memory-mapped) while it is probed, and a process may open 1,024
# files by default; the most sharded published checkpoints have a few hundred (Llama 3.1 405B: 191).
MAX_SHARDS = 512
# A shard is a relative path of plain parts: no drive (`C:`), no backslash, no `.`/`..`, no control character.
SAFE_PART = re.compile(r"[^\\/:\x00-\x1f]+")


@dataclass
class ShardIndex:
    path: Path  # the index file
    kind: str  # "safetensors" or "torch": what its shards are
    shards: list[Path]  # each shard once, in the order the index first names them
    where: dict[str, Path]  # tensor name -> the shard holding it, in the index's order


def model_folder_file(folder: Path) -> Optional[Path]:
    """The index of a Hugging Face model folder (or, unsharded, its weights file); None when it has neither."""
    return next((folder / name for name in INDEX_FILES + SINGLE_FILES if (folder / name).is_file()), None)


def not_a_run(path: Path, command: str) -> Optional[BnprobeError]:
    """The one line for a Hugging Face model folder (or its index or weights file) given to a command that takes a
    bnprobe run (`command`: inspect, export); None when `path` is no such thing."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT_FILE).exists() or model_folder_file(path) is None:
            return None
    elif not (is_index(path) or path.name in SINGLE_FILES) or (path.parent / CHECKPOINT_FILE).exists():
        return None
    return BnprobeError(f"{path} is a Hugging Face model, not a bnprobe run: {command} takes a run directory "
                        f"(runs/<name>); `bnprobe probe {path}` reads its normalisation layers from the files alone")


def is_index(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def _broken(path: Path, why: str) -> BnprobeError:
    return BnprobeError(f"{path} is not a usable checkpoint index ({why})")


def read_index(path: Path) -> ShardIndex:
    """A checkpoint index, checked as the module says; no shard is opened."""
    # Read whole, so bounded: schema.read_json's 64 MiB, far above the few MB of the largest published indexes.
    index = read_json(path, "a checkpoint index (the largest published are a few MB)")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        if not isinstance(index, dict):
            found = json_type(index)
        elif "weight_map" not in index:
            found = "it has no weight_map"
        else:
            found = f"its weight_map is {'empty' if isinstance(weight_map, dict) else json_type(weight_map)}"
        raise _broken(path, f"a JSON object with a weight_map of tensor names to shard files expected; {found}")
    shards: dict[str, Path] = {}
    where = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise _broken(path, f"tensor {printable(name)} maps to {json_type(shard)}, not a shard's file name")
        if shard not in shards:
            if len(shards) == MAX_SHARDS:
                raise _broken(path, f"more than {MAX_SHARDS} shards")
            shards[shard] = _shard_path(path, shard, weight_map)
        where[name] = shards[shard]
    kinds = {"safetensors" if shard.endswith(".safetensors") else "torch" for shard in shards}
    if len(kinds) > 1:
        raise _broken(path, "its shards mix safetensors and torch files")
    return ShardIndex(path, kinds.pop(), list(shards.values()), where)


def _shard_path(index: Path, shard: str, weight_map: dict) -> Path:
    """The shard's file, if `shard` names one inside the index's folder (see the module's docstring)."""
    parts = shard.split("/")
    if not all(SAFE_PART.fullmatch(part) and part not in (".", "..") for part in parts):
        raise _broken(index, f"shard {printable(shard)!r} is not a relative path inside the index's folder")
    # Any call on a longer name or path fails: OSError, File name too long.
    if len(shard.encode("utf-8", "surrogatepass")) > PATH_MAX or any(
            len(part.encode("utf-8", "surrogatepass")) > NAME_MAX for part in parts):
        raise _broken(index, f"shard {printable(shard, limit=100)!r} is longer than a file system allows "
                             f"({NAME_MAX} bytes a name, {PATH_MAX:,} a path)")
    path = index.parent.joinpath(*parts)
    if os.path.islink(path):  # a link that leads nowhere is not "missing": say which fault it is
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python 3.11 raises it for a loop
            raise _broken(index, f"shard {printable(shard)} is a symbolic link in a loop") from None
        except OSError as exc:
            why = "in a loop" if exc.errno == errno.ELOOP else "to a file that does not exist"
            raise _broken(index, f"shard {printable(shard)} is a symbolic link {why}") from None
    if not path.exists():
        tensors = sum(value == shard for value in weight_map.values())
        raise BnprobeError(f"{index}: shard {printable(shard)} is missing (the index places {tensors:,} "
                           f"tensor{'s' if tensors != 1 else ''} in it)")
    # Links may lead where the index's own file is: the hub's cache links both into one blobs/ folder.
    homes = (index.parent.resolve(), index.resolve().parent)
    if not any(path.resolve().is_relative_to(home) for home in homes):
        raise _broken(index, f"shard {printable(shard)} links out of the index's folder")
    return regular_file(path)
