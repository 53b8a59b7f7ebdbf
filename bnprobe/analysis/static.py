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

from pathlib import Path
from typing import Any, Optional

import torch

from bnprobe.analysis.measured import BNStats, ProbeResult
from bnprobe.core.errors import BnprobeError
from bnprobe.files.checkpoints import FileTensors, checkpoint_file, checkpoint_label, open_tensors

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
ORDER_NOTES = {
    "file": "the file's order (registration order: input to output for the usual architectures)",
    "names": "natural order of their names (a safetensors file keeps no registration order)",
}


def _shapes_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{leaf} {FileTensors.shape(value)}" for leaf, value in parts.items())


def bn_from_tensors(file: FileTensors, path: Path) -> BNStats:
    """Every BatchNorm layer of a state dict, from its tensors alone, in the file's order (none: empty)."""
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
    return BNStats.from_tensors(affine, stats_only)


def static_probe(path: Path | str) -> Optional[ProbeResult]:
    """Probe one checkpoint file from its tensors alone; None for a bnprobe run's checkpoint."""
    file = checkpoint_file(path)
    with open_tensors(file) as tensors:
        if tensors is None:
            return None
        bn = bn_from_tensors(tensors, file)
        if not bn.names and not bn.stats_only:
            names = list(tensors.tensors)
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise BnprobeError(
                f"{file}: {len(names)} tensor{'s' if len(names) != 1 else ''} (state dict at {tensors.where}), none "
                f"of them a BatchNorm layer's (running_mean and running_var, with weight and bias, all 1-D of one "
                f"length): {shown}")
        attrs = {"source": "file", "file_format": tensors.kind, "state_dict_key": tensors.where,
                 "stripped_prefixes": ",".join(tensors.stripped) or "none", "tensors": len(tensors.tensors),
                 "layer_order": tensors.order}
    nan = float("nan")
    return ProbeResult(checkpoint_label(file), str(file.resolve()), attrs, bn, sites=[], loss=nan, accuracy=nan,
                       images=0, forward_pass=False)
