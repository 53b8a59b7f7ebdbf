"""GGUF files (llama.cpp's format: how most people run LLMs locally), read without torch and without the `gguf`
package: its header, its metadata, where each tensor lies, and, lazily, the bytes of the tensors asked for.

The layout (versions 2 and 3; version 3 may be big-endian, told by its version number read backwards):
`GGUF`, version u32, tensor count u64, metadata count u64; each metadata entry a string key, a value type u32 and
a value (integers, floats, bool, a string: u64 length + UTF-8 bytes, or an array: item type u32, count u64,
items); each tensor a string name, its number of dimensions u32, each dimension u64 (ne[0] first: the
fastest-varying, so numpy's shape is the reverse), its ggml type u32 and its offset u64 into the data section,
which starts at the next multiple of `general.alignment` (32 by default) after the last tensor's entry.

A file comes from anywhere, so every count, length and offset is checked against the bytes the file has before
anything is read or allocated (a count of 2^60 strings is refused, not looped over), names and keys are bounded
and decoded with replacement, arrays nest at most MAX_NESTING deep, and of a long array only its type and count
are kept. Each fault is one line naming the file. The norm tensors of a quantized file are F32: they are read as
numpy arrays; a quantized tensor's shape is known from its entry, its bytes are never read.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bnprobe.core.errors import BnprobeError, printable

MAGIC = b"GGUF"
SUFFIX = ".gguf"
VERSIONS = (2, 3)  # version 1 (before August 2023) had 32-bit counts; llama.cpp no longer reads it either
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 1024  # a tensor's name (llama.cpp's own limit is 63)
MAX_KEY_BYTES = 1 << 16
MAX_KEPT_STRING = 1 << 16  # a longer string value (a chat template can be long) is kept as its length alone
MAX_KEPT_ARRAY = 64  # a longer array (a tokenizer's vocabulary) is kept as its type and count alone
MAX_NESTING = 3  # arrays of arrays of arrays, no deeper
MAX_TENSORS = 1 << 20
MAX_ENTRIES = 1 << 20
MAX_PARTS = 512  # a split model's parts (gguf-split), as many as a sharded checkpoint's shards
# gguf-split's names for a split model's parts: PREFIX-00001-of-00003.gguf.
PART_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf", re.IGNORECASE)
MAX_ARRAY_ITEMS = 1 << 28  # the largest vocabularies and merge lists have a few hundred thousand

# Metadata value types: struct format of a scalar, or "s" (string) and "a" (array).
VALUE_TYPES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 8: "s", 9: "a", 10: "Q", 11: "q",
               12: "d"}
VALUE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool",
               8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
# ggml types: name, elements per block, bytes per block (ggml.h / the gguf package's GGML_QUANT_SIZES).
QK_K = 256
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210), 15: ("Q8_K", QK_K, 292),
    16: ("IQ2_XXS", QK_K, 66), 17: ("IQ2_XS", QK_K, 74), 18: ("IQ3_XXS", QK_K, 98), 19: ("IQ1_S", QK_K, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", QK_K, 110), 22: ("IQ2_S", QK_K, 82), 23: ("IQ4_XS", QK_K, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", QK_K, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", QK_K, 54), 35: ("TQ2_0", QK_K, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# The types read as numbers (numpy's dtype, byte order added); every other type is quantized.
PLAIN_TYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "BF16": "u2", "I8": "i1", "I16": "i2", "I32": "i4",
               "I64": "i8"}


def is_gguf(path: Path) -> bool:
    """By name, or by its first four bytes (b"GGUF")."""
    if path.suffix.lower() == SUFFIX:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False  # the reader that is tried next says why in one line


def gguf_in_folder(folder: Path) -> Optional[Path]:
    """The one .gguf file of a folder, or the first part of the one split model it holds (None: there is none);
    several (one model in several quantizations, as published) are one line asking for one of them."""
    found = sorted(path for path in folder.glob("*" + SUFFIX) if path.is_file())
    parts = {match.group(1, 3) for match in (PART_NAME.fullmatch(path.name) for path in found) if match}
    if len(found) > 1 and len(parts) == 1 and all(PART_NAME.fullmatch(path.name) for path in found):
        return found[0]  # PREFIX-00001-of-0000N.gguf (a missing part is for read_model to say)
    if len(found) > 1:
        names = ", ".join(printable(path.name) for path in found[:4]) + (", ..." if len(found) > 4 else "")
        raise BnprobeError(f"{folder} holds {len(found)} GGUF files ({names}); pass the one to probe")
    return found[0] if found else None


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its item type, its count, and its items where it is short (MAX_KEPT_ARRAY)."""

    item_type: str
    count: int
    items: Optional[list]


# ggml's plain types as torch names them (quantized types keep their ggml names)
GGML_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
               "I16": "int16", "I32": "int32", "I64": "int64"}


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, its bytes not read: tensor[:] (or .read()) reads them as numpy."""

    path: Path
    name: str
    shape: tuple[int, ...]  # numpy's order: the file's dimensions reversed
    type: str  # ggml type: F32, F16, BF16, Q4_0, ...
    start: int  # where its bytes start in the file
    nbytes: int
    byteorder: str  # "<" or ">"

    @property
    def quantized(self) -> bool:
        return self.type not in PLAIN_TYPES

    @property
    def dtype(self) -> str:
        """As torch names it (float32, ...; bfloat16 is read as float32), or the ggml type of a quantized one."""
        return GGML_DTYPES.get(self.type, self.type)

    def get_shape(self) -> list[int]:  # as a safetensors slice says it
        return list(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.read()[key]

    def read(self) -> np.ndarray:
        """Its numbers: F32/F16/F64 and integers as stored, BF16 as float32 (exactly). A quantized tensor is one
        line: its bytes are blocks of scaled codes, not numbers."""
        if self.quantized:
            raise BnprobeError(f"{self.path}: tensor {printable(self.name)} is quantized ({self.type}); bnprobe "
                               f"reads the F32, F16, BF16 and F64 tensors of a GGUF file (its norms), not quantized "
                               f"ones")
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                data = f.read(self.nbytes)
        except OSError as exc:
            raise BnprobeError(f"cannot read {self.path} ({exc.strerror or exc})") from None
        if len(data) != self.nbytes:  # the file was cut short since its header was read
            raise BnprobeError(f"{self.path}: tensor {printable(self.name)} ends past the end of the file")
        array = np.frombuffer(data, dtype=self.byteorder + PLAIN_TYPES[self.type]).reshape(self.shape)
        if self.type == "BF16":  # the upper half of a float32
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(array.dtype.newbyteorder("="))


@dataclass
class GGUFFile:
    """What a GGUF file's header says: its metadata and its tensors, in the file's order."""

    path: Path
    version: int
    byteorder: str
    alignment: int
    metadata: dict[str, Any]  # key -> int, float, bool, str (or its length, for a long one) or GGUFArray
    tensors: dict[str, GGUFTensor]
    parts: int = 1  # a split model read whole (read_model): its parts


def read_model(path: Path) -> GGUFFile:
    """A GGUF model: one file, or every part of a split one (gguf-split: `split.count` parts named
    PREFIX-0000i-of-0000N.gguf in one folder, the metadata in the first) as one file of all their tensors,
    whichever part `path` names. Each part's header is checked as read_gguf checks it, and the parts together:
    all there, numbered as named, the tensor count the first one states, no tensor twice."""
    file = read_gguf(path)
    count = file.metadata.get("split.count", 1)
    if count in (0, 1):  # (a model in one part may say so)
        return file
    match = PART_NAME.fullmatch(path.name)
    if not (isinstance(count, int) and 1 < count <= MAX_PARTS) or not match or int(match.group(3)) != count:
        raise BnprobeError(f"{path}: a part of a split GGUF model (split.count {printable(repr(count))[:20]}), not "
                           f"named as gguf-split names its parts (PREFIX-00001-of-0000N.gguf, at most {MAX_PARTS})")
    names = [path.with_name(f"{match.group(1)}-{i:05d}-of-{count:05d}{path.suffix}") for i in range(1, count + 1)]
    missing = [name.name for name in names if not name.is_file()]
    if missing:
        raise BnprobeError(f"{path}: part {printable(missing[0])} of this split GGUF model is missing ({len(missing)} "
                           f"of {count} parts are)")
    parts = [file if name == path else read_gguf(name) for name in names]
    tensors: dict[str, GGUFTensor] = {}
    for number, part in enumerate(parts):
        if part.metadata.get("split.no") != number or part.metadata.get("split.count") != count:
            raise BnprobeError(f"{part.path}: its split.no and split.count do not say part {number + 1} of {count}, "
                               f"as its name does")
        twice = set(tensors) & set(part.tensors)
        if twice:
            raise BnprobeError(f"{part.path}: tensor {printable(min(twice))} is in an earlier part too")
        tensors.update(part.tensors)
    stated = parts[0].metadata.get("split.tensors.count")
    if stated != len(tensors):
        raise BnprobeError(f"{names[0]}: the split model's parts hold {len(tensors):,} tensors, its first part says "
                           f"{printable(repr(stated))[:20]}")
    first = parts[0]
    return GGUFFile(first.path, first.version, first.byteorder, first.alignment, first.metadata, tensors, count)


class _Reader:
    """The header, read from a memory map with every length checked against the bytes left."""

    def __init__(self, path: Path, data: Any, size: int) -> None:
        self.path, self.data, self.size, self.pos, self.order = path, data, size, 0, "<"

    def fail(self, why: str) -> BnprobeError:
        return BnprobeError(f"{self.path} is not a readable GGUF file ({why})")

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            raise self.fail(f"{what} needs {count:,} bytes at byte {self.pos:,}, past the end of the file "
                            f"({self.size:,} bytes): truncated or damaged")

    def scalar(self, fmt: str, what: str) -> Any:
        width = struct.calcsize(fmt)
        self.need(width, what)
        value = struct.unpack_from(self.order + fmt, self.data, self.pos)[0]
        self.pos += width
        return value

    def string(self, limit: int, what: str) -> Optional[str]:
        """A string of at most `limit` bytes (longer: its length is checked and it is skipped, None)."""
        length = self.scalar("Q", what)
        self.need(length, f"{what} ({length:,} bytes)")
        start = self.pos
        self.pos += length
        return bytes(self.data[start:self.pos]).decode("utf-8", "replace") if length <= limit else None

    def count(self, what: str, item_bytes: int, cap: int) -> int:
        """A u64 count of items of at least `item_bytes` each, checked against the bytes left and `cap`."""
        count = self.scalar("Q", what)
        if count > cap:
            raise self.fail(f"{what} is {count:,}, more than bnprobe reads ({cap:,})")
        if count * item_bytes > self.size - self.pos:
            raise self.fail(f"{what} is {count:,}, more than the {self.size - self.pos:,} bytes left could "
                            f"hold: truncated or damaged")
        return count

    def value(self, kind: int, what: str, depth: int = 0) -> Any:
        fmt = VALUE_TYPES.get(kind)
        if fmt is None:
            raise self.fail(f"{what} has the unknown value type {kind}")
        if fmt == "s":
            start = self.pos
            text = self.string(MAX_KEPT_STRING, what)
            return text if text is not None else f"<{self.pos - start - 8:,} bytes>"
        if fmt != "a":
            value = self.scalar("B" if fmt == "?" else fmt, what)
            return bool(value) if fmt == "?" else value
        if depth == MAX_NESTING:
            raise self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        item = self.scalar("I", f"the item type of {what}")
        item_fmt = VALUE_TYPES.get(item)
        if item_fmt is None:
            raise self.fail(f"{what} is an array of the unknown value type {item}")
        least = {"s": 8, "a": 12}.get(item_fmt) or struct.calcsize("B" if item_fmt == "?" else item_fmt)
        count = self.count(f"the item count of {what}", least, MAX_ARRAY_ITEMS)
        if item_fmt not in "sa":  # numbers: skipped at once, kept when few
            items = ([self.value(item, what, depth + 1) for _ in range(count)] if count <= MAX_KEPT_ARRAY
                     else self.skip(count * least, what))
        elif count <= MAX_KEPT_ARRAY:
            items = [self.value(item, f"{what}[{i}]", depth + 1) for i in range(count)]
        elif item_fmt == "s":  # a vocabulary: each string's length checked, nothing kept
            items = self.skip_strings(count, what)
        else:  # many arrays: each checked, nothing kept
            items = None
            for i in range(count):
                self.value(item, f"{what}[{i}]", depth + 1)
        return GGUFArray(VALUE_NAMES[item], count, items)

    def skip_strings(self, count: int, what: str) -> None:
        unpack, data, pos, size = struct.Struct(self.order + "Q").unpack_from, self.data, self.pos, self.size
        for i in range(count):  # (the hot loop of a 128k-token vocabulary: locals only)
            if pos + 8 > size or pos + 8 + unpack(data, pos)[0] > size:
                raise self.fail(f"{what}[{i}] (a string) runs past the end of the file ({size:,} bytes): "
                                f"truncated or damaged")
            pos += 8 + unpack(data, pos)[0]
        self.pos = pos

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count


def read_gguf(path: Path) -> GGUFFile:
    """A GGUF file's header, checked as the module says; no tensor's bytes are read."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            if size < 24:
                head = f.read(4)
                why = "not a GGUF file: it does not start with GGUF" if head != MAGIC[:len(head)] else "truncated"
                raise BnprobeError(f"{path} is not a readable GGUF file ({why}: {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, data, size)
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None


def _parse(path: Path, data: Any, size: int) -> GGUFFile:
    reader = _Reader(path, data, size)
    if data[:4] != MAGIC:
        raise reader.fail(f"not a GGUF file: it starts with {bytes(data[:4])!r}, not {MAGIC!r}")
    reader.pos = 4
    version = reader.scalar("I", "the version")
    if version not in VERSIONS and struct.unpack(">I", struct.pack("<I", version))[0] in VERSIONS:
        reader.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]  # a big-endian file
    if version not in VERSIONS:
        old = " (version 1 is from before August 2023: convert the model again)" if version == 1 else ""
        raise reader.fail(f"GGUF version {version}; bnprobe reads versions {' and '.join(map(str, VERSIONS))}{old}")
    tensor_count = reader.count("its tensor count", 24, MAX_TENSORS)  # name length, dims, type, offset
    entries = reader.count("its metadata count", 13, MAX_ENTRIES)  # key length, type, a byte
    metadata: dict[str, Any] = {}
    for i in range(entries):
        key = reader.string(MAX_KEY_BYTES, f"metadata key {i}")
        if key is None:
            raise reader.fail(f"metadata key {i} is longer than {MAX_KEY_BYTES:,} bytes")
        if key in metadata:
            raise reader.fail(f"metadata key {printable(key)!r} appears twice")
        metadata[key] = reader.value(reader.scalar("I", f"the type of metadata {printable(key)!r}"),
                                     f"metadata {printable(key)!r}")
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not (isinstance(alignment, int) and not isinstance(alignment, bool) and 0 < alignment <= 1 << 30
            and alignment & (alignment - 1) == 0):
        raise reader.fail(f"general.alignment must be a power of 2, not {printable(repr(alignment))[:40]}")
    infos = []
    for i in range(tensor_count):
        name = reader.string(MAX_NAME_BYTES, f"the name of tensor {i}")
        if name is None:
            raise reader.fail(f"the name of tensor {i} is longer than {MAX_NAME_BYTES:,} bytes")
        what = f"tensor {printable(name)!r}"
        dims = reader.scalar("I", f"the dimension count of {what}")
        if dims > MAX_DIMS:
            raise reader.fail(f"{what} has {dims:,} dimensions (GGUF allows at most {MAX_DIMS})")
        ne = [reader.scalar("Q", f"the dimensions of {what}") for _ in range(dims)]
        kind, offset = reader.scalar("I", f"the type of {what}"), reader.scalar("Q", f"the offset of {what}")
        infos.append((name, what, ne, kind, offset))
    start = -(-reader.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, what, ne, kind, offset in infos:
        tensors[name] = _tensor(reader, name, what, ne, kind, offset, start, alignment)
    if len(tensors) != len(infos):
        raise reader.fail(f"{len(infos) - len(tensors)} tensor name(s) appear twice")
    return GGUFFile(path, version, reader.order, alignment, metadata, tensors)


def _tensor(reader: _Reader, name: str, what: str, ne: list[int], kind: int, offset: int, start: int,
            alignment: int) -> GGUFTensor:
    """One tensor's entry, checked: a known type, whole blocks, its bytes aligned and inside the file."""
    if kind not in GGML_TYPES:
        raise reader.fail(f"{what} has the unknown ggml type {kind}")
    type_name, block, block_bytes = GGML_TYPES[kind]
    elements = math.prod(ne)
    if elements >= 1 << 63:
        raise reader.fail(f"{what} claims {elements:,} elements")
    if ne and ne[0] % block:
        raise reader.fail(f"{what} ({type_name}, blocks of {block}) has rows of {ne[0]:,} elements")
    nbytes = elements // block * block_bytes
    if offset % alignment:
        raise reader.fail(f"the offset {offset:,} of {what} is not a multiple of the alignment {alignment}")
    if start + offset + nbytes > reader.size:
        raise reader.fail(f"{what} ({nbytes:,} bytes at offset {offset:,} of the data, which starts at byte "
                          f"{start:,}) ends past the end of the file ({reader.size:,} bytes): truncated or damaged")
    return GGUFTensor(reader.path, name, tuple(reversed(ne)), type_name, start + offset, nbytes, reader.order)


# What the probe's output says of the model, from the metadata: (attribute, key under the architecture's name).
ARCH_FACTS = (("gguf_blocks", "block_count"), ("gguf_embedding_length", "embedding_length"),
              ("gguf_rms_epsilon", "attention.layer_norm_rms_epsilon"),
              ("gguf_norm_epsilon", "attention.layer_norm_epsilon"))


def model_facts(file: GGUFFile) -> dict[str, Any]:
    """The model as its metadata describes it, as plain values (probe.h5's attributes): the GGUF version, the
    architecture (`general.architecture`: llama, gemma2, qwen2, ...), its name, block count, embedding length,
    norm ε, and how many tensors of each ggml type the file holds (quantized files keep their norms F32)."""
    meta = file.metadata
    arch = meta.get("general.architecture")
    arch = arch[:100] if isinstance(arch, str) and arch else "unknown"
    facts: dict[str, Any] = {"gguf_version": file.version, "gguf_architecture": arch,
                             **({"gguf_parts": file.parts} if file.parts > 1 else {})}
    if isinstance(meta.get("general.name"), str):
        facts["gguf_name"] = meta["general.name"][:200]
    for attr, key in ARCH_FACTS:
        value = meta.get(f"{arch}.{key}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            facts[attr] = value
    counts: dict[str, int] = {}
    for tensor in file.tensors.values():
        counts[tensor.type] = counts.get(tensor.type, 0) + 1
    facts["gguf_tensor_types"] = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda c: -c[1]))
    facts["gguf_quantized_tensors"] = sum(tensor.quantized for tensor in file.tensors.values())
    return facts


def facts_line(facts: dict[str, Any]) -> str:
    """model_facts in one line: `GGUF v3, llama "Llama 2 7B", 32 blocks, embedding length 4096, RMS ε 1e-05;
    tensors: 225 Q4_0, 65 F32, 1 Q6_K (quantized tensors' bytes are not read)`."""
    split = f" (split in {facts['gguf_parts']} parts)" if "gguf_parts" in facts else ""
    parts = [f"GGUF v{facts['gguf_version']}{split}, architecture {facts['gguf_architecture']}"
             + (f" ({facts['gguf_name']!r})" if "gguf_name" in facts else "")]
    shown = (("gguf_blocks", "{:,} blocks"), ("gguf_embedding_length", "embedding length {:,}"),
             ("gguf_rms_epsilon", "RMS ε {:.3g}"), ("gguf_norm_epsilon", "LayerNorm ε {:.3g}"))
    parts += [text.format(facts[key]) for key, text in shown if key in facts]
    quantized = " (quantized tensors' bytes are not read)" if facts.get("gguf_quantized_tensors") else ""
    return printable(", ".join(parts) + f"; tensors: {facts['gguf_tensor_types'] or 'none'}{quantized}")
