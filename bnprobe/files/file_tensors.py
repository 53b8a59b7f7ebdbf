"""A checkpoint's tensors read without torch: what the static probe (`bnprobe probe FILE`) reads, and nothing else.

A safetensors file through its JSON header (bnprobe.files.headers), a torch.save zip archive or legacy file
through bnprobe's inert unpickler (bnprobe.files.torch_archive: pickled objects are stood in for, never run), a
Hugging Face index through its shards (bnprobe.files.shards: only the shards holding a tensor asked for are
opened). Every tensor is a StoredTensor: where its bytes are, its dtype and shape, nothing read; FileTensors.read
reads exactly its bytes with numpy, in chunks of CHUNK_BYTES (bfloat16 as float32: its 16 bits are float32's
upper half), so what a probe holds is the tensors it asked for, whatever the file declares.

bnprobe.files.checkpoints (with torch) builds models from the same files; it finds the state dict inside a file
with the same rules (find_state_dict, strip_prefixes).
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import CHECKPOINT_FILE, CHECKPOINT_FORMAT, EXPORT_FORMATS
from bnprobe.files.gguf import GGUFTensor, gguf_in_folder, is_gguf, model_facts, read_model
from bnprobe.files.headers import is_safetensors, read_safetensors_header, torch_file_kind
from bnprobe.files.inert_pickle import ITEMSIZE, Storage, StoredTensor, stand_note
from bnprobe.files.shards import ShardIndex, is_index, model_folder_file, read_index
from bnprobe.files.torch_archive import read_archive, read_legacy

# In order of preference: a file with both a model and its EMA copy (timm's state_dict_ema) gives the model.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params",
                   "ema", "model_ema", "state_dict_ema")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile: stripped when every key has one
# A file read for its tensors alone (no model to fit them to) also loses a LightningModule's `self.model`.
STATIC_PREFIXES = STRIPPED_PREFIXES + ("model.",)
# safetensors' dtype codes, as torch names them.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOATING = ("float64", "float32", "float16", "bfloat16")
NUMPY_DTYPES = {"float64": "f8", "float32": "f4", "float16": "f2", "bfloat16": "u2", "int64": "i8", "int32": "i4",
                "int16": "i2", "int8": "i1", "uint8": "u1", "bool": "?", "complex64": "c8", "complex128": "c16"}
CHUNK_BYTES = 4 << 20  # one read of a tensor's bytes: memory stays near what the result itself takes


# ---- what a path is --------------------------------------------------------------------------------------------


def checkpoint_file(path: Path | str) -> Path:
    """A checkpoint file, a run directory's checkpoint.pt, or a Hugging Face model folder's index (or weights)."""
    path = Path(path)
    if path.is_dir():
        inner = path / CHECKPOINT_FILE
        inner = inner if inner.is_file() else model_folder_file(path) or gguf_in_folder(path)
        if inner is None:
            raise BnprobeError(f"{path} is a directory without {CHECKPOINT_FILE}, a Hugging Face model's index or "
                               f"weights, or a GGUF file; pass a checkpoint file, a run directory or a model folder")
        return inner
    if not path.exists():
        raise BnprobeError(f"no such checkpoint: {path}")
    if not path.is_file():
        raise BnprobeError(f"{path} is not a regular file")
    return path


def checkpoint_label(file: Path, given: Optional[Path | str] = None) -> str:
    """The short name tables use: a folder given as such (`given`, what checkpoint_file resolved to `file`), a run's
    checkpoint.pt and a model's index by their folder's name, any other file by its stem."""
    if given is not None and Path(given).is_dir():
        return Path(os.path.abspath(given)).name
    if is_index(file):
        return Path(os.path.abspath(file)).parent.name  # (not resolved: the hub's cache links it into blobs/)
    return file.parent.name if file.name == CHECKPOINT_FILE else file.stem


def is_bnprobe_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and "config" in obj


# ---- the state dict inside a file ------------------------------------------------------------------------------


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_state_dict(obj: Any, path: Path, is_tensor: Callable[[Any], bool]) -> tuple[dict[str, Any], str]:
    """The state dict inside a checkpoint: bare, or under a common key (searched two levels deep)."""
    def tensors(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(
            isinstance(k, str) and is_tensor(v) for k, v in value.items())

    if tensors(obj):
        return dict(obj), "(top level)"
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if tensors(obj.get(key)):
                return dict(obj[key]), key
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict):
                for key2 in STATE_DICT_KEYS:
                    if tensors(inner.get(key2)):
                        return dict(inner[key2]), f"{key}.{key2}"
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        raise BnprobeError(
            f"{path} holds no state dict (looked at the top level and under {', '.join(STATE_DICT_KEYS)}; "
            f"its keys: {keys})"
        )
    kind = f"a stand-in for {obj.module}.{obj.qualname}" if hasattr(obj, "qualname") else f"a {type(obj).__name__}"
    raise BnprobeError(f"{path} holds {printable(kind)}, not a state dict")


def strip_prefixes(state: dict[str, Any], prefixes: Sequence[str] = STRIPPED_PREFIXES) -> tuple[dict[str, Any], list[str]]:
    """Remove `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile), or other `prefixes`, when every key
    has one."""
    stripped = []
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def walk_tensors(obj: Any, is_tensor: Callable[[Any], bool]) -> Iterator[tuple[str, Any]]:
    """(where, tensor) for every tensor in a loaded checkpoint, as `key.key[i]`. Walked without recursion, each
    container once (a file's nesting, even a list holding itself, is the file's choice)."""
    pending, seen = deque([("", obj)]), set()
    while pending:
        where, value = pending.popleft()
        if is_tensor(value):
            yield where, value
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            if isinstance(value, dict):
                pending.extend((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
            else:
                pending.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def refuse_unreadable(path: Path, found: list[str]) -> None:
    """One line naming the tensors that hold no data bnprobe can read (`where (why)`), if any."""
    if found:
        shown = ", ".join(found[:4]) + (f", ... ({len(found) - 4} more)" if len(found) > 4 else "")
        raise BnprobeError(f"{path} holds tensors bnprobe cannot read: {shown}; it reads dense tensors that hold "
                           f"their data (tensor.to_dense(); a model built on the meta device has none)")


# ---- reading a tensor's bytes ------------------------------------------------------------------------------------


def read_elements(path: Path, start: int, dtype: str, count: int, byteorder: str = "little") -> np.ndarray:
    """`count` elements of `dtype` at byte `start` of the file, read in chunks of CHUNK_BYTES into one array (in
    the machine's byte order; bfloat16 as float32)."""
    code = ("<" if byteorder == "little" else ">") + NUMPY_DTYPES[dtype]
    raw = np.empty(count, dtype=np.dtype(code))
    view = raw.view(np.uint8)
    with open(path, "rb") as f:
        f.seek(start)
        for at in range(0, view.size, CHUNK_BYTES):
            if f.readinto(memoryview(view[at:at + CHUNK_BYTES])) != min(CHUNK_BYTES, view.size - at):
                raise BnprobeError(f"{path} ends early (a tensor's bytes at {start:,} run past its end)")
    if dtype == "bfloat16":  # float32's upper 16 bits
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False)


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def attach_reader(path: Path, tensor: StoredTensor, where: str) -> StoredTensor:
    """Give a StoredTensor of `path` its reader, once its elements are checked to lie within its storage."""
    storage, itemsize = tensor.storage, ITEMSIZE.get(tensor.dtype, 1)
    if tensor.unreadable or storage is None:
        return tensor
    if tensor.dtype not in NUMPY_DTYPES:
        tensor.unreadable = tensor.dtype or "no dtype"
        return tensor
    last = tensor.offset + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride))
    if tensor.numel and (last + 1) * itemsize > storage.numel * ITEMSIZE.get(storage.dtype, 1):
        raise BnprobeError(f"{path}: tensor {printable(where)} of shape {tensor.shape} reaches past its storage "
                           f"({storage.numel:,} elements of {storage.dtype})")
    start = storage.start + tensor.offset * itemsize

    def read() -> np.ndarray:
        if not tensor.numel or _contiguous(tensor.shape, tensor.stride):
            return read_elements(path, start, tensor.dtype, tensor.numel, storage.byteorder).reshape(tensor.shape)
        # A view with gaps: the span it covers, mapped, and its elements picked (no more than that span is touched).
        span = np.memmap(path, dtype=np.dtype(("<" if storage.byteorder == "little" else ">")
                                              + NUMPY_DTYPES[tensor.dtype]), mode="r", offset=start, shape=(last - tensor.offset + 1,))
        picked = np.lib.stride_tricks.as_strided(span, tensor.shape, [s * span.itemsize for s in tensor.stride]).copy()
        del span
        picked = picked.astype(picked.dtype.newbyteorder("="), copy=False)
        return (picked.astype(np.uint32) << 16).view(np.float32) if tensor.dtype == "bfloat16" else picked

    tensor.read = read
    return tensor


def is_stored(value: Any) -> bool:
    return isinstance(value, StoredTensor)


# ---- the file as tensors ----------------------------------------------------------------------------------------


Select = Callable[[list[str]], set[str]]  # a file's tensor names (prefixes stripped) -> the ones to open


@dataclass
class FileTensors:
    """A file's state dict, read lazily: names (prefixes stripped) to tensors whose bytes are not read yet."""

    tensors: dict[str, Any]  # StoredTensor, GGUFTensor (or, from bnprobe's own checkpoints, a torch.Tensor)
    kind: str  # "torch zip", "torch legacy", "safetensors", "sharded safetensors", "sharded torch", "gguf"
    where: str  # where the state dict sat: "(top level)", "state_dict", ...
    stripped: list[str]
    order: str  # what the tensors' order follows: "file" (registration order) or "names" (natural order)
    names: Optional[list[str]] = None  # every tensor's name, in that order (default: those of `tensors`)
    shards: Optional[tuple[int, int]] = None  # a sharded checkpoint: (shards opened, shards in its index)
    stood_in: str = ""  # what the inert unpickler stood in for, in one line (inert_pickle.stand_note)
    about: dict[str, Any] = field(default_factory=dict)  # what the file says of its model (GGUF: model_facts)

    def __post_init__(self) -> None:
        self.names = list(self.tensors) if self.names is None else self.names

    @staticmethod
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape)

    @staticmethod
    def dtype(value: Any) -> str:
        """As torch names it, without "torch.": float32, bfloat16, int64, ..."""
        if isinstance(value, StoredTensor):
            return value.dtype
        return str(getattr(value, "dtype", "?")).removeprefix("torch.")

    @staticmethod
    def read(value: Any) -> np.ndarray:
        """The tensor's numbers as a numpy array (bfloat16 as float32): its bytes read now, and only those."""
        if isinstance(value, (StoredTensor, GGUFTensor)):
            return value.read()
        if hasattr(value, "detach"):  # a torch.Tensor (a bnprobe checkpoint read by the report): no torch import
            value = value.detach().cpu()
            return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
        return np.asarray(value)


def _selected(names: list[str], tensors: dict[str, Any], select: Optional[Select]) -> dict[str, Any]:
    chosen = set(names) if select is None else select(names)
    return {name: tensors[name] for name in names if name in chosen}


def safetensors_tensors(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """A safetensors file's tensors (in the header's order) and metadata, from its header alone."""
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", {})
    with open(path, "rb") as f:
        base = 8 + int.from_bytes(f.read(8), "little")
    tensors = {}
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"])
        shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
        numel = math.prod(shape)
        if dtype in ITEMSIZE and end - begin != numel * ITEMSIZE[dtype]:
            raise BnprobeError(f"{path}: damaged safetensors header at tensor {printable(name)} ({end - begin:,} "
                               f"bytes for {numel:,} elements of {dtype})")
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        storage = Storage(name, dtype, numel, "file", base + begin)
        tensor = StoredTensor(storage, 0, shape, stride, dtype)
        tensors[name] = attach_reader(path, tensor, name) if dtype in NUMPY_DTYPES else StoredTensor(
            None, 0, shape, stride, dtype, unreadable=dtype)
    return tensors, metadata


def torch_tensors(path: Path) -> tuple[Any, str]:
    """A torch.save file's object, read inertly, every tensor given its reader; its kind."""
    kind = torch_file_kind(path)
    if not kind:
        raise BnprobeError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    obj = read_archive(path) if kind == "zip" else read_legacy(path)
    unreadable = []
    for where, tensor in walk_tensors(obj, is_stored):
        attach_reader(path, tensor, where)
        if tensor.unreadable:
            unreadable.append(f"{where or '(top level)'} ({tensor.unreadable})")
    refuse_unreadable(path, unreadable)
    return obj, "torch zip" if kind == "zip" else "torch legacy"


@contextmanager
def open_tensors(path: Path, select: Optional[Select] = None) -> Iterator[Optional[FileTensors]]:
    """The tensors of a checkpoint file (or a sharded checkpoint's index), ready to read: those `select` picks
    from the names, all by default. None for a bnprobe run's checkpoint or export (it is probed with its model
    and data as always). Nothing is held open: each read opens the file."""
    if is_index(path):
        yield _open_shards(read_index(path), select)
        return
    if is_gguf(path):  # no prefixes, no nesting: GGUF's own names (blk.N.attn_norm.weight), in the file's order
        gguf = read_model(path)  # (every part of a split model)
        names = list(gguf.tensors)
        yield FileTensors(_selected(names, gguf.tensors, select), "gguf", "(top level)", [], "file", names,
                          about=model_facts(gguf))
        return
    if is_safetensors(path):
        tensors, metadata = safetensors_tensors(path)
        if metadata.get("format") in EXPORT_FORMATS:
            yield None  # a run bnprobe exported: probed as the run
            return
        names = sorted(tensors, key=natural_key)
        state, stripped = strip_prefixes({name: tensors[name] for name in names}, STATIC_PREFIXES)
        yield FileTensors(_selected(list(state), state, select), "safetensors", "(top level)", stripped, "names",
                          list(state))
        return
    obj, kind = torch_tensors(path)
    if is_bnprobe_checkpoint(obj):
        yield None
        return
    state, where = _state_dict(obj, path)
    tensors, stripped = strip_prefixes(state, STATIC_PREFIXES)
    yield FileTensors(_selected(list(tensors), tensors, select), kind, where, stripped, "file", list(tensors),
                      stood_in=stand_note(obj))


def _state_dict(obj: Any, path: Path) -> tuple[dict[str, Any], str]:
    """find_state_dict on an inertly read object; where there is none, the error also says what was stood in
    for (a pickled object where the tensors were expected)."""
    try:
        return find_state_dict(obj, path, is_stored)
    except BnprobeError as exc:
        note = stand_note(obj)
        raise BnprobeError(f"{exc}{'; ' + note if note else ''}") from None


def _open_shards(index: ShardIndex, select: Optional[Select]) -> FileTensors:
    """A sharded checkpoint's tensors: the index says which shard holds each, and only the shards holding a
    tensor `select` picks are opened. The index keeps no registration order: names come in natural order."""
    original, stripped = strip_prefixes({name: name for name in index.where}, STATIC_PREFIXES)
    names = sorted(original, key=natural_key)
    wanted = _selected(names, original, select)
    needed = {index.where[wanted[name]] for name in wanted}
    tensors: dict[str, Any] = {}
    notes = []
    for shard in (shard for shard in index.shards if shard in needed):
        if index.kind == "safetensors":
            held = safetensors_tensors(shard)[0]
        else:
            obj = torch_tensors(shard)[0]
            held = _state_dict(obj, shard)[0]
            notes.append(stand_note(obj))
        for name, key in wanted.items():
            if index.where[key] == shard:
                if key not in held:
                    raise BnprobeError(f"{index.path}: shard {printable(shard.name)} does not hold "
                                       f"{printable(key)}, which the index places in it")
                tensors[name] = held[key]
    return FileTensors({name: tensors[name] for name in wanted}, f"sharded {index.kind}", "(top level)",
                       stripped, "names", names, (len(needed), len(index.shards)),
                       stood_in="; ".join(note for note in notes if note)[:500])
