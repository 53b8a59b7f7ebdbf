"""The compact export's codec (format `bnprobe-compact`, docs/export-format.md), shared by the exporter
(bnprobe.analysis.export) and the reader (bnprobe.files.checkpoints).

A BN-only network is fully described by its seed and its trained BN parameters (Frankle's point): the frozen
tensors are the initialisation `nets.registry.from_config` draws from the config's seed. A compact file stores
only the trainable tensors, the masked elements of random-features tensors and the buffers (BN running
statistics), packed into one flat tensor per dtype in an order derived from the regenerated model
(`packed_layout`), so it holds no per-tensor header; SHA-256 digests of the frozen tensors as regenerated, of the
layout and of the stored tensors let a reader refuse anything but the exact weights.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from bnprobe.core.errors import BnprobeError
from bnprobe.nets.freeze import random_feature_masks, trainable_parameter_names
from bnprobe.nets.registry import from_config


def regenerate(config: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(initial state dict, random-feature masks, names a compact file stores whole: the trainable parameters
    and the buffers) as `config` draws them."""
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        model = from_config(config)
    masks = {}
    if config.random_features:  # the trainer's own draw (bnprobe.training.train), on the CPU
        masks = random_feature_masks(model, config.random_features, torch.Generator().manual_seed(config.seed + 1))
    stored = trainable_parameter_names(model, config.freeze) | {name for name, _ in model.named_buffers()}
    return {k: v.detach() for k, v in model.state_dict().items()}, masks, stored


def _sha256(entries: Iterable[tuple[str, tuple[int, ...], torch.Tensor]]) -> str:
    """SHA-256 of (name, shape, tensor) entries: each name, dtype, shape and the tensor's bytes."""
    digest = hashlib.sha256()
    for name, shape, tensor in entries:
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_digest(initial: dict[str, torch.Tensor], stored: set[str], masks: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every frozen tensor (the frozen elements of random-features tensors), names sorted."""
    return _sha256((name, initial[name].shape, initial[name][~masks[name]] if name in masks else initial[name])
                   for name in sorted(set(initial) - stored))


def stored_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors a file stores (the packed ones of a compact file), names sorted."""
    return _sha256((name, tensors[name].shape, tensors[name]) for name in sorted(tensors))


def packed_layout(initial: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                  stored: set[str]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what a compact file stores, in its order: the whole tensors (names sorted), then
    the trained elements of each random-features tensor (in mask order). The file holds only its digest."""
    layout = [(name, initial[name].dtype, tuple(initial[name].shape)) for name in sorted(stored - set(masks))]
    return layout + [(name, initial[name].dtype, (int(masks[name].sum()),)) for name in sorted(masks)]


def layout_digest(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> str:
    return hashlib.sha256("".join(f"{name}|{dtype}|{shape}\n" for name, dtype, shape in layout).encode()).hexdigest()


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def pack(layout: list, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout's tensors one after another, in one flat tensor per dtype (named by the dtype)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, dtype, _ in layout:
        groups.setdefault(_dtype_key(dtype), []).append(values[name].reshape(-1))
    return {key: torch.cat(parts) for key, parts in groups.items()}


def unpack(layout: list, packed: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """pack's inverse, every size checked against the file's tensors (a damaged file is one line)."""
    used = dict.fromkeys(packed, 0)
    values = {}
    for name, dtype, shape in layout:
        key, count = _dtype_key(dtype), math.prod(shape)
        flat = packed.get(key)
        if flat is None or flat.dtype != dtype or flat.dim() != 1 or used[key] + count > flat.numel():
            break
        values[name] = flat[used[key]:used[key] + count].reshape(shape).clone()
        used[key] += count
    if len(values) != len(layout) or any(used[key] != packed[key].numel() for key in packed):
        found = ", ".join(f"{key} {tuple(t.shape)}" for key, t in packed.items()) or "none"
        raise BnprobeError(f"{path}: damaged compact file: its packed tensors ({found}) do not hold the "
                           f"{len(layout)} tensors its model stores")
    return values


def stored_verified(metadata: dict[str, str]) -> bool:
    """Whether a file's stored tensors are checked against its stored_sha256: every version but 2, which had none."""
    return metadata.get("version") != "2"
