"""`bnprobe export RUN -o model.safetensors [--compact]`: a run's model as a safetensors file.

A BN-only network is fully described by its seed and its trained BN parameters (Frankle's point): the
frozen tensors are the initialisation `models.from_config` draws from `config.seed`. `--compact` writes only what
training changed (the trainable tensors, the masked elements of random-features tensors, and the buffers:
BN running statistics), plus the run's config, seed, torch version and a SHA-256 of the frozen tensors as
regenerated from the seed. Every export (version 3) also holds a SHA-256 of the tensors it stores, checked on
every read. Its tensors are packed into one flat tensor per dtype, in an order derived from the
regenerated model (packed_layout), so the file holds no per-tensor header (safetensors' ~80 bytes a tensor were
most of a BN-only file) and its size approaches that of the numbers it stores (docs/export-format.md). Reading
a compact file regenerates those tensors on the CPU (fork_rng, a seeded init: independent of the device and of
threads) and checks the hash: if another torch version drew other numbers, that is a one-line error, never
silently different weights. Without `--compact` the file is the plain full state dict (loadable by any tool),
with the same metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch

from bnprobe import runs, schema
from bnprobe.errors import BnprobeError, first_line, printable
from bnprobe.formats import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, COMPACT_FORMAT, EXPORT_FORMATS, EXPORT_VERSION,
                             EXPORT_VERSIONS, FULL_FORMAT)



def regenerate(config: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(initial state dict, random-feature masks, names a compact file stores whole: the trainable parameters
    and the buffers) as `config` draws them."""
    from bnprobe.data import get_dataset_spec
    from bnprobe.freeze import random_feature_masks, trainable_parameter_names
    from bnprobe.models import from_config

    spec = get_dataset_spec(config.dataset)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        model = from_config(config, spec.channels, spec.num_classes)
    masks = {}
    if config.random_features:  # the trainer's own draw (bnprobe.train), on the CPU
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


def _exported(path: Path) -> bool:
    """Whether `export -o` may replace this file: one bnprobe exported (by its metadata)."""
    from bnprobe.static import is_safetensors, read_metadata

    try:
        return (path.is_file() and is_safetensors(path)
                and read_metadata(path).get("format") in EXPORT_FORMATS)
    except BnprobeError:
        return False


def export_run(run: Path, out: Path, compact: bool) -> tuple[int, int]:
    """Write the export; return (its bytes, the bytes of the full state dict as safetensors)."""
    from safetensors.torch import save

    from bnprobe.atomic import atomic_write
    from bnprobe.loading import checkpoint_file, is_bnprobe_checkpoint

    if out.suffix != ".safetensors":
        raise BnprobeError(f"-o must name a .safetensors file, got {out}")
    schema.check_outside_runs(out)  # a file bnprobe did not write would make train --overwrite refuse the run
    if out.exists() and not _exported(out):
        raise BnprobeError(f"will not replace {out}: it is not a model bnprobe exported")
    file = checkpoint_file(run)
    obj = runs.read_checkpoint(file)
    if not is_bnprobe_checkpoint(obj):
        raise BnprobeError(f"{file} is not a bnprobe run's checkpoint; export takes a run directory or its "
                           f"checkpoint.pt")
    config = runs.check_checkpoint(obj, file)
    state = {k: v.detach().cpu().contiguous() for k, v in obj["model"].items()}
    metadata = {"format": FULL_FORMAT, "version": EXPORT_VERSION, "config": json.dumps(obj["config"], sort_keys=True),
                "seed": str(config.seed), "torch": torch.__version__, "epoch": str(obj.get("epoch", 0))}
    if isinstance(obj.get("normalization"), dict):
        metadata["normalization"] = json.dumps({k: v.tolist() for k, v in obj["normalization"].items()})
    full = save(state, metadata={**metadata, "stored_sha256": stored_digest(state)})
    tensors = state
    if compact:
        initial, masks, stored = regenerate(config)
        if set(initial) != set(state):
            raise BnprobeError(f"{file}: its tensors do not match {config.model} as its config builds it")
        for name in sorted(set(initial) - stored):
            frozen = ~masks[name] if name in masks else torch.ones_like(state[name], dtype=torch.bool)
            if not torch.equal(state[name][frozen], initial[name][frozen]):
                raise BnprobeError(f"{file}: {name} is frozen but differs from its initialisation by seed "
                                   f"{config.seed} (another torch version?); export it without --compact")
        layout = packed_layout(initial, masks, stored)
        tensors = pack(layout, {name: state[name][masks[name]] if name in masks else state[name]
                                for name, _, _ in layout})
        metadata = {**metadata, "format": COMPACT_FORMAT, "frozen_sha256": frozen_digest(initial, stored, masks),
                    "layout_sha256": layout_digest(layout), "full_bytes": str(len(full)),
                    "stored_sha256": stored_digest(tensors)}
    data = full if not compact else save(tensors, metadata=metadata)
    atomic_write(out, lambda f: f.write(data))
    return len(data), len(full)


def read_export(path: Path, f: Any, metadata: dict[str, str]) -> dict[str, Any]:
    """An exported run (open safetensors handle `f`) as the bnprobe checkpoint it came from: its config checked as
    `train` checks one (the model's size counted before it is built), its stored tensors against their hash
    (version 3), and the frozen tensors of a compact file regenerated from the seed and checked against theirs."""
    from bnprobe.config import TrainConfig

    config_dict, epoch = schema.export_fields(metadata, path)
    # The exporter's data folder is a path on another machine (a forged one could point a download anywhere):
    # the data comes from this user's --data-dir, $BNPROBE_DATA_DIR or ./data.
    config_dict = {**config_dict, "data_dir": ""}
    config = TrainConfig.from_dict(config_dict, f"{path}: config")
    config.check_model(f"{path}: config")
    version = metadata.get("version")
    if metadata["format"] == COMPACT_FORMAT and version not in EXPORT_VERSIONS:
        raise BnprobeError(f"{path}: a compact file of format version {version}; this bnprobe reads versions "
                           f"{' and '.join(EXPORT_VERSIONS)}")
    tensors = {name: f.get_tensor(name) for name in f.keys()}
    if stored_verified(metadata) and stored_digest(tensors) != metadata.get("stored_sha256"):
        raise BnprobeError(f"{path}: its stored tensors do not match the file's hash of them (changed or damaged "
                           f"since it was exported); refusing to run with them")
    if metadata["format"] == COMPACT_FORMAT:
        initial, masks, stored = regenerate(config)
        if frozen_digest(initial, stored, masks) != metadata.get("frozen_sha256"):
            raise BnprobeError(
                f"{path}: the frozen tensors regenerated from seed {config.seed} do not match the file's hash "
                f"(exported with torch {metadata.get('torch', '?')}, this is torch {torch.__version__}: the random "
                f"stream changed); refusing to run with different weights")
        layout = packed_layout(initial, masks, stored)
        if layout_digest(layout) != metadata.get("layout_sha256"):
            raise BnprobeError(f"{path}: the tensors {config.model} stores are not the ones the file packed "
                               f"(exported by another bnprobe version?)")
        values = unpack(layout, tensors, path)
        state = {}
        for name, initial_tensor in initial.items():
            if name in masks:
                tensor = initial_tensor.clone()
                tensor[masks[name]] = values[name]
                state[name] = tensor
            else:
                state[name] = values.get(name, initial_tensor)
        tensors = state
    checkpoint: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                  "config": config_dict, "model": tensors, "epoch": epoch,
                                  "history": []}  # an export keeps the weights, not the training history
    if "normalization" in metadata:  # its shapes and values are checked with the checkpoint (runs.check_checkpoint)
        try:
            norm = json.loads(metadata["normalization"])
            checkpoint["normalization"] = {key: torch.tensor(norm[key], dtype=torch.float32) for key in ("mean", "std")}
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, RecursionError) as exc:
            raise BnprobeError(f"{path}: damaged bnprobe export metadata (normalization: "
                               f"{first_line(exc, typed=True)})") from None
    return checkpoint


def stored_verified(metadata: dict[str, str]) -> bool:
    """Whether a file's stored tensors are checked against its stored_sha256: every version but 2, which had none."""
    return metadata.get("version") != "2"


def describe(size: int, full: int, compact: bool) -> str:
    if not compact:
        return f"{size:,} bytes (the full state dict)"
    return f"{size:,} bytes instead of {full:,} for the full state dict ({full / max(1, size):.0f}x smaller)"


def inspect_export(path: Path) -> Any:
    """`bnprobe inspect model.safetensors`: what an exported run holds, its frozen tensors regenerated and checked."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table
    from safetensors import safe_open

    from bnprobe.config import TrainConfig
    from bnprobe.static import read_metadata, read_weights

    metadata = read_metadata(path)
    if metadata.get("format") not in EXPORT_FORMATS:
        raise BnprobeError(f"{path} is not a model bnprobe exported; inspect takes a run directory or an export")
    compact = metadata.get("format") == COMPACT_FORMAT
    checkpoint = read_weights(path)  # a compact file's frozen tensors: regenerated, and the hash checked
    config = TrainConfig.from_dict(checkpoint["config"])
    with safe_open(str(path), framework="pt") as f:
        stored = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    total = sum(t.numel() for t in checkpoint["model"].values())
    table = Table(title=f"{escape(printable(path.name))}: a bnprobe run, exported", box=box.SIMPLE_HEAD,
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in (
        ("kind", "compact: the seed plus what trained" if compact else "the full state dict"),
        ("model / data / freeze", f"{config.model} / {config.dataset} / {config.freeze}"
                                  + (f" + {config.random_features} random features" if config.random_features else "")),
        ("seed, epoch", f"{config.seed}, {checkpoint['epoch']}"),
        ("exported with", f"torch {metadata.get('torch', '?')} (this is torch {torch.__version__})"),
        ("numbers stored", f"{stored:,} of {total:,}"),
        ("file", f"{path.stat().st_size:,} bytes"),
        ("frozen tensors", f"regenerated from seed {config.seed}; SHA-256 matches" if compact else "stored"),
        ("stored tensors", "SHA-256 matches" if stored_verified(metadata)
         else "not verified (a version 2 file holds no hash of them)"),
    ):
        table.add_row(name, escape(printable(value)))  # the file's metadata and config, as they are
    return table
