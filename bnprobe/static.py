"""The static probe: BatchNorm's γ and β from a checkpoint file alone, with no model code and no data.

Most checkpoints come from elsewhere (torchvision, timm, Lightning, the Hugging Face hub), and every number
about γ and β is already in the file. A BN layer is found by its tensors alone: a prefix owning
`running_mean` and `running_var` (+ `num_batches_tracked`), and `weight` (γ) and `bias` (β) when it is
affine, all 1-D of one length. Layer order is the file's order, which is registration order (input to
output for the usual architectures); safetensors files keep no order, so their layers come in natural
order of their names (`layer2` before `layer10`).

Files are read lazily: a torch zip archive is memory-mapped (torch.load(mmap=True)) and a safetensors file
opened with safe_open, so only the BN tensors' bytes are ever read and a 1 GB checkpoint costs little
memory (bench/static_probe.py). Torch files are read with weights_only=True: pickled code is refused.
"""

from __future__ import annotations

import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from bnprobe.errors import BnprobeError
from bnprobe.formats import EXPORT_FORMATS
from bnprobe.loading import (STRIPPED_PREFIXES, checkpoint_file, checkpoint_label, extract_state_dict,
                             is_bnprobe_checkpoint, strip_prefixes)
from bnprobe.probe import BNStats, ProbeResult
from bnprobe.runs import read_checkpoint

SAFETENSORS_SUFFIX = ".safetensors"
# Stripped when every key has one: DataParallel/DDP, torch.compile, and a LightningModule's `self.model`.
STATIC_PREFIXES = STRIPPED_PREFIXES + ("model.",)
BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
ORDER_NOTES = {
    "file": "the file's order (registration order: input to output for the usual architectures)",
    "names": "natural order of their names (a safetensors file keeps no registration order)",
}


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


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: one line
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BnprobeError(f"{path} is not a readable safetensors file ({text})")
    with handle as f:
        yield f


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (a bnprobe export names its format there)."""
    with _open_safetensors(path) as f:
        return f.metadata() or {}


def _is_export(metadata: dict[str, str]) -> bool:
    return metadata.get("format") in EXPORT_FORMATS


def read_weights(path: Path) -> Any:
    """A checkpoint's whole content for building a model: a safetensors file as a dict of tensors (a run bnprobe
    exported as the run's checkpoint), any other file through read_checkpoint (weights_only=True)."""
    if not is_safetensors(path):
        return read_checkpoint(path)
    with _open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if _is_export(metadata):
            from bnprobe.export import read_export

            return read_export(path, f, metadata)
        return {name: f.get_tensor(name) for name in f.keys()}


@dataclass
class FileTensors:
    """A file's state dict, read lazily: names (prefixes stripped) to tensors whose bytes are not read yet."""

    tensors: dict[str, Any]  # memory-mapped torch.Tensor, or a safetensors slice
    kind: str  # "torch zip", "torch legacy", "safetensors"
    where: str  # where the state dict sat: "(top level)", "state_dict", ...
    stripped: list[str]
    order: str  # a key of ORDER_NOTES

    @staticmethod
    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value.get_shape())

    @staticmethod
    def read(value: Any) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else value[:]


@contextmanager
def open_tensors(path: Path) -> Iterator[Optional[FileTensors]]:
    """The tensors of a checkpoint file, open for reading; None for a bnprobe run's checkpoint or export (it is
    probed with its model and data as always)."""
    if is_safetensors(path):
        with _open_safetensors(path) as f:
            if _is_export(f.metadata() or {}):
                yield None  # a run bnprobe exported: probed as the run
                return
            names = sorted(f.keys(), key=_natural_key)
            tensors, stripped = strip_prefixes({name: f.get_slice(name) for name in names}, STATIC_PREFIXES)
            yield FileTensors(tensors, "safetensors", "(top level)", stripped, "names")
        return
    with open(path, "rb") as f:
        kind = "torch zip" if f.read(4) == b"PK\x03\x04" else "torch legacy"
    obj = read_checkpoint(path, lazy=True)
    if is_bnprobe_checkpoint(obj):
        yield None
        return
    state, where = extract_state_dict(obj, path)
    tensors, stripped = strip_prefixes(state, STATIC_PREFIXES)
    yield FileTensors(tensors, kind, where, stripped, "file")


def _shapes_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{leaf} {FileTensors.shape(value)}" for leaf, value in parts.items())


def bn_from_tensors(file: FileTensors, path: Path) -> BNStats:
    """Every BatchNorm layer of a state dict, from its tensors alone, in the file's order."""
    groups: dict[str, dict[str, Any]] = {}
    for name, value in file.tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in BN_TENSORS:
            groups.setdefault(prefix, {})[leaf] = value
    affine: list[tuple[str, list[torch.Tensor]]] = []
    stats_only: list[tuple[str, int]] = []
    for prefix, parts in groups.items():
        if "running_mean" not in parts and "running_var" not in parts:
            continue  # a conv's or linear layer's weight and bias
        name = prefix or "(top level)"
        vectors = {leaf: FileTensors.shape(parts[leaf]) for leaf in BN_TENSORS[:4] if leaf in parts}
        counter = parts.get("num_batches_tracked")
        if ("running_mean" not in parts or "running_var" not in parts or ("weight" in parts) != ("bias" in parts)
                or len(set(vectors.values())) != 1 or len(next(iter(vectors.values()))) != 1
                or (counter is not None and len(FileTensors.shape(counter)) > 1)):
            raise BnprobeError(
                f"{path}: inconsistent BatchNorm tensors at {name}: {_shapes_text(parts)} (a BatchNorm layer has "
                f"running_mean and running_var, and weight and bias when affine, all 1-D of one length)")
        if "weight" in parts:
            affine.append((name, [FileTensors.read(parts[leaf]) for leaf in BN_TENSORS[:4]]))
        else:
            stats_only.append((name, vectors["running_mean"][0]))
    if not affine and not stats_only:
        names = list(file.tensors)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise BnprobeError(
            f"{path}: {len(names)} tensor{'s' if len(names) != 1 else ''} (state dict at {file.where}), none of "
            f"them a BatchNorm layer's (running_mean and running_var, with weight and bias, all 1-D of one "
            f"length): {shown}")
    return BNStats.from_tensors(affine, stats_only)


def static_probe(path: Path | str) -> Optional[ProbeResult]:
    """Probe one checkpoint file from its tensors alone; None for a bnprobe run's checkpoint."""
    file = checkpoint_file(path)
    with open_tensors(file) as tensors:
        if tensors is None:
            return None
        bn = bn_from_tensors(tensors, file)
        attrs = {"source": "file", "file_format": tensors.kind, "state_dict_key": tensors.where,
                 "stripped_prefixes": ",".join(tensors.stripped) or "none", "tensors": len(tensors.tensors),
                 "layer_order": tensors.order}
    nan = float("nan")
    return ProbeResult(checkpoint_label(file), str(file.resolve()), attrs, bn, sites=[], loss=nan, accuracy=nan,
                       images=0, forward_pass=False)
