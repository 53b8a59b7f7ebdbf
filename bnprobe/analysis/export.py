"""`bnprobe export RUN -o model.safetensors [--compact]`: a run's model as a safetensors file.

Without `--compact` the file is the plain full state dict (loadable by any tool). `--compact` writes only what
training changed, plus the seed that regenerates the rest (bnprobe.files.compact: the packing and its hashes;
docs/export-format.md). Both carry the run's config, seed, torch version and a SHA-256 of the stored tensors;
bnprobe.files.checkpoints reads them back as the run's checkpoint, every hash checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import COMPACT_FORMAT, EXPORT_FORMATS, EXPORT_VERSION, FULL_FORMAT
from bnprobe.files import schema
from bnprobe.files.atomic import atomic_write
from bnprobe.files.checkpoints import check_checkpoint, read_checkpoint, read_metadata
from bnprobe.files.file_tensors import checkpoint_file, is_bnprobe_checkpoint
from bnprobe.files.compact import frozen_digest, layout_digest, pack, packed_layout, regenerate, stored_digest
from bnprobe.files.headers import is_safetensors
from bnprobe.files.shards import not_a_run


def _exported(path: Path) -> bool:
    """Whether `export -o` may replace this file: one bnprobe exported (by its metadata)."""
    try:
        return (path.is_file() and is_safetensors(path)
                and read_metadata(path).get("format") in EXPORT_FORMATS)
    except BnprobeError:
        return False


def export_run(run: Path, out: Path, compact: bool) -> tuple[int, int]:
    """Write the export; return (its bytes, the bytes of the full state dict as safetensors)."""
    if out.suffix != ".safetensors":
        raise BnprobeError(f"-o must name a .safetensors file, got {out}")
    schema.check_outside_runs(out)  # a file bnprobe did not write would make train --overwrite refuse the run
    if out.exists() and not _exported(out):
        raise BnprobeError(f"will not replace {out}: it is not a model bnprobe exported")
    model_folder = not_a_run(run, "export")
    if model_folder is not None:
        raise model_folder
    file = checkpoint_file(run)
    obj = read_checkpoint(file)
    if not is_bnprobe_checkpoint(obj):
        raise BnprobeError(f"{file} is not a bnprobe run's checkpoint; export takes a run directory or its "
                           f"checkpoint.pt")
    config = check_checkpoint(obj, file)
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


def describe(size: int, full: int, compact: bool) -> str:
    if not compact:
        return f"{size:,} bytes (the full state dict)"
    return f"{size:,} bytes instead of {full:,} for the full state dict ({full / max(1, size):.0f}x smaller)"
