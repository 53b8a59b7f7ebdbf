"""The static probe: the γ and β of every normalisation layer of a checkpoint, from the file alone, with no model
code and no data.

Most checkpoints come from elsewhere (torchvision, timm, Lightning, the Hugging Face hub), and every number
about γ and β is already in the file. A layer is found by its tensors alone:

- BatchNorm: a prefix owning `running_mean` and `running_var` (+ `num_batches_tracked`), and `weight` (γ) and
  `bias` (β) when it is affine, all 1-D of one length;
- an affine norm without running statistics (`--norms all`, the default): a prefix named like a norm
  (NORM_NAME: `norm`, `ln_1`, `LayerNorm`, `input_layernorm`, `gn`, ...) whose only tensors are a 1-D `weight`
  and, optionally, a 1-D `bias` of the same length: "LayerNorm/GroupNorm-like" with a bias, "RMSNorm-like"
  without (bnprobe.core.formats.NORM_KINDS; the tensors cannot tell LayerNorm from GroupNorm).

Depth is the file's order, which is registration order (input to output for the usual architectures).
Safetensors files and sharded checkpoints keep no order: their layers come in natural order of their names
(`layer2` before `layer10`), and where transformer blocks number them (`layers.N`, `h.N`, `blocks.N`,
`encoder.layer.N`), block by block, with the layers outside the blocks before them (embeddings, stems) or after
them (final norms): `block_order`.

Files are read without torch and lazily (bnprobe.files.file_tensors): a safetensors file through its header, a
torch.save file through bnprobe's inert unpickler (pickled objects are stood in for, never run), and of a
sharded checkpoint only the shards holding a norm's tensor; only the norm tensors' bytes are ever read, with
numpy (bench/static_probe.py). A norm layer wider than MAX_NORM_CHANNELS, or norms of more than
MAX_NORM_TOTAL channels in all, are refused before a byte of them is read: the shapes come from the file, and a
sparse file can declare a 1e12-element norm in 8 KB.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bnprobe.analysis.measured import NormStats, ProbeResult
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import BATCHNORM, SCALE_ONLY, SCALE_SHIFT
from bnprobe.files.file_tensors import FLOATING, FileTensors, checkpoint_file, checkpoint_label, open_tensors

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
AFFINE_TENSORS = ("weight", "bias")
# The last part of a norm's module name in the usual conventions, any case: *norm* (norm1, fc_norm, q_norm,
# LayerNorm, input_layernorm, post_attention_layernorm, final_layer_norm, rmsnorm, group_norm), GPT-2's and
# CLIP's ln_1, ln_f, ln_post, and GroupNorm's gn, gn1.
NORM_NAME = re.compile(r"norm|^ln(_?[a-z0-9]+)?$|^gn_?\d*$", re.IGNORECASE)
# A transformer block: `layers.N.`, `h.N.` (GPT-2), `blocks.N.` (timm), `layer.N.` (BERT's encoder.layer.N).
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Outside the blocks, what comes before them: embeddings, stems, patch embeddings, pre-norms (norm_pre, ln_pre,
# pre_layrnorm, embeddings.LayerNorm); every other layer outside the blocks is taken to follow them.
INPUT_SIDE = re.compile(r"embed|stem|patch|(^|[._])pre([._]|$)|^pre_", re.IGNORECASE)
ORDER_NOTES = {
    "file": "the file's order (registration order: input to output for the usual architectures)",
    "names": "natural order of their names ({} keeps no registration order)",
    "blocks": "the transformer blocks' order (layers.N, h.N, blocks.N: numeric order of N), layers outside them "
              "before (embeddings, stems) or after (final norms), else natural order of the names",
}
NORMS = ("all", "bn")  # --norms
# The widest normalisation layer read: the widest of published models have tens of thousands of channels
# (Llama 3.1 405B: 16,384; a LayerNorm over a 256x56x56 feature map: 802,816 elements); 2**20 leaves room and
# keeps one layer's four float64 columns under 32 MiB.
MAX_NORM_CHANNELS = 1 << 20
# Every norm layer of one checkpoint together: Llama 3.1 405B's 253 norms hold 4.1M channels; 2**24 is four times
# that (0.5 GiB of float64 columns at most).
MAX_NORM_TOTAL = 1 << 24
KIND_NOTE = ("BN = BatchNorm; LN/GN = LayerNorm/GroupNorm-like: a scale and a shift per channel, no running "
             "statistics (the names and the tensors cannot tell LayerNorm from GroupNorm); RMS = RMSNorm-like: a "
             "scale alone (or a LayerNorm without bias)")


def _shapes_text(parts: dict[str, Any]) -> str:
    return ", ".join(f"{leaf} {FileTensors.shape(value)}" for leaf, value in parts.items())


def _groups(names: list[str]) -> dict[str, dict[str, str]]:
    """prefix -> leaf -> full name, in the names' order."""
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = name
    return groups


def _is_bn(leaves: dict[str, Any]) -> bool:
    return "running_mean" in leaves or "running_var" in leaves


def _is_affine_norm(prefix: str, leaves: dict[str, Any]) -> bool:
    return "weight" in leaves and set(leaves) <= set(AFFINE_TENSORS) and bool(
        NORM_NAME.search(prefix.rpartition(".")[2]))


def norm_tensor_names(names: list[str], norms: str = "all") -> set[str]:
    """The names of the tensors that may belong to a normalisation layer, by their names alone (the shapes are
    checked once they are open): what a sharded checkpoint opens its shards for."""
    chosen = set()
    for prefix, leaves in _groups(names).items():
        if _is_bn(leaves):
            chosen.update(name for leaf, name in leaves.items() if leaf in BN_TENSORS)
        elif norms == "all" and _is_affine_norm(prefix, leaves):
            chosen.update(leaves.values())
    return chosen


def _read(path: Path, name: str, parts: dict[str, Any]) -> list[Optional[np.ndarray]]:
    """(weight, bias, running_mean, running_var) of one layer, read (None where absent) as numpy arrays, each
    checked to hold floating-point numbers before a byte of it is read."""
    for leaf in BN_TENSORS[:4]:
        if leaf in parts and FileTensors.dtype(parts[leaf]) not in FLOATING:
            raise BnprobeError(f"{path}: {name}.{leaf} holds {FileTensors.dtype(parts[leaf])}, not the "
                               f"floating-point numbers of a normalisation layer")
    return [FileTensors.read(parts[leaf]) if leaf in parts else None for leaf in BN_TENSORS[:4]]


class _Budget:
    """The channels read so far, against MAX_NORM_CHANNELS per layer and MAX_NORM_TOTAL in all."""

    def __init__(self, path: Path) -> None:
        self.path, self.total = path, 0

    def take(self, name: str, shape: tuple[int, ...]) -> None:
        channels = math.prod(shape)
        if channels > MAX_NORM_CHANNELS:
            raise BnprobeError(f"{self.path}: norm layer {printable(name)} declares {channels:,} channels, more than "
                               f"the {MAX_NORM_CHANNELS:,} bnprobe reads (no normalisation layer of a published "
                               f"model is a tenth as wide); a damaged or forged file")
        self.total += channels
        if self.total > MAX_NORM_TOTAL:
            raise BnprobeError(f"{self.path}: its norm layers declare more than {MAX_NORM_TOTAL:,} channels in all "
                               f"(at {printable(name)}), more than bnprobe reads (the largest published models "
                               f"have about 4 million)")


def norms_from_tensors(file: FileTensors, path: Path, norms: str = "all") -> NormStats:
    """Every normalisation layer of a state dict (BatchNorm alone for norms="bn"), from its tensors alone, in
    depth order (none: empty)."""
    layers: list[tuple[str, list[Optional[np.ndarray]]]] = []
    kinds: list[str] = []
    stats_only: list[tuple[str, int]] = []
    budget = _Budget(path)
    for prefix, leaves in _groups(list(file.tensors)).items():
        name = prefix or "(top level)"
        if _is_bn(leaves):
            parts = {leaf: file.tensors[full] for leaf, full in leaves.items() if leaf in BN_TENSORS}
            vectors = {leaf: FileTensors.shape(parts[leaf]) for leaf in BN_TENSORS[:4] if leaf in parts}
            counter = parts.get("num_batches_tracked")
            if ("running_mean" not in parts or "running_var" not in parts or ("weight" in parts) != ("bias" in parts)
                    or len(set(vectors.values())) != 1 or len(next(iter(vectors.values()))) != 1
                    or (counter is not None and len(FileTensors.shape(counter)) > 1)):
                raise BnprobeError(
                    f"{path}: inconsistent BatchNorm tensors at {name}: {_shapes_text(parts)} (a BatchNorm layer "
                    f"has running_mean and running_var, and weight and bias when affine, all 1-D of one length)")
            if "weight" in parts:
                budget.take(name, vectors["weight"])
                layers.append((name, _read(path, name, parts)))
                kinds.append(BATCHNORM)
            else:
                stats_only.append((name, vectors["running_mean"][0]))
        elif norms == "all" and _is_affine_norm(prefix, leaves):
            shapes = {FileTensors.shape(file.tensors[full]) for full in leaves.values()}
            if len(shapes) != 1 or len(next(iter(shapes))) != 1:
                continue  # a module named like a norm that is not one (a projection's 2-D weight)
            budget.take(name, next(iter(shapes)))
            layers.append((name, _read(path, name, {leaf: file.tensors[full] for leaf, full in leaves.items()})))
            kinds.append(SCALE_SHIFT if "bias" in leaves else SCALE_ONLY)
    return NormStats.from_tensors(layers, stats_only, kinds)


def bn_from_tensors(file: FileTensors, path: Path) -> NormStats:
    """The BatchNorm layers of a state dict (a run's checkpoint, read for the report)."""
    return norms_from_tensors(file, path, "bn")


def block_order(names: list[str]) -> list[int]:
    """The depth order of layers named in natural order, where transformer blocks number them (BLOCK): the
    layers before the blocks (INPUT_SIDE), each stack of blocks in order of first appearance and numeric order of
    its blocks, then the other layers; within each, the given order. Unchanged without blocks."""
    stacks: dict[str, int] = {}
    keys = []
    for position, name in enumerate(names):
        block = BLOCK.search(name)
        if block:
            stack = stacks.setdefault(name[:block.start(1)], len(stacks))
            keys.append((1, stack, int(block.group(1)), position))
        else:
            keys.append((0 if INPUT_SIDE.search(name) else 2, 0, 0, position))
    return sorted(range(len(names)), key=keys.__getitem__) if stacks else list(range(len(names)))


def static_probe(path: Path | str, norms: str = "all") -> Optional[ProbeResult]:
    """Probe one checkpoint (a file, a run directory, a Hugging Face model folder or its index) from its tensors
    alone; None for a bnprobe run's checkpoint."""
    file = checkpoint_file(path)
    with open_tensors(file, lambda names: norm_tensor_names(names, norms)) as tensors:
        if tensors is None:
            return None
        stats = norms_from_tensors(tensors, file, norms)
        if not stats.names and not stats.stats_only:
            names = tensors.names
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            what = ("a BatchNorm layer's (running_mean and running_var, with weight and bias, all 1-D of one length)"
                    if norms == "bn" else
                    "a normalisation layer's (BatchNorm: running_mean and running_var, with weight and bias, all "
                    "1-D of one length; or a module named like a norm, such as norm, ln_1 or input_layernorm, "
                    "whose only tensors are a 1-D weight and bias)")
            raise BnprobeError(f"{file}: {len(names)} tensor{'s' if len(names) != 1 else ''} (state dict at "
                               f"{tensors.where}), none of them {what}: {shown}")
        order = tensors.order
        if order == "names":  # no registration order: the blocks' numbers give it where there are blocks
            depth = block_order(stats.names)
            if depth != sorted(depth):
                stats, order = stats.take(depth), "blocks"
        attrs = {"source": "file", "file_format": tensors.kind, "state_dict_key": tensors.where,
                 "stripped_prefixes": ",".join(tensors.stripped) or "none", "tensors": len(tensors.names),
                 "layer_order": order,
                 **({"shards": tensors.shards[1], "shards_read": tensors.shards[0]} if tensors.shards else {}),
                 **({"stood_in": tensors.stood_in} if tensors.stood_in else {})}
    nan = float("nan")
    label = Path(os.path.abspath(path)).name if Path(path).is_dir() else checkpoint_label(file)
    return ProbeResult(label, str(file.resolve()), attrs, stats, sites=[], loss=nan, accuracy=nan, images=0,
                       forward_pass=False)
