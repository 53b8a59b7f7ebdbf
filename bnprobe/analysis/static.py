"""The static probe: the γ and β of every normalisation layer of a checkpoint, from the file alone, with no model
code and no data.

Most checkpoints come from elsewhere (torchvision, timm, Lightning, the Hugging Face hub), and every number
about γ and β is already in the file. A layer is found by its tensors' names and shapes alone
(bnprobe.analysis.norm_finder): BatchNorm by its running statistics; an affine norm by a `weight` and a `bias` of
one shape under any name (`stem.1` in nn.Sequential, a LayerNorm over (1, 264)); an RMSNorm by a `weight` alone
under a norm's name. "LayerNorm/GroupNorm-like" with a bias, "RMSNorm-like" without (bnprobe.core.formats.PROBE_NORM_KINDS;
the tensors cannot tell LayerNorm from GroupNorm). A weight alone in a list is listed as an unnamed scale, not
counted. γ is the effective scale: + 1 for the Gemma family's RMSNorms (bnprobe.analysis.conventions).

Depth is the file's order, which is registration order (input to output for the usual architectures).
Safetensors files and sharded checkpoints keep no order: their layers come in natural order of their names
(`layer2` before `layer10`), and where transformer blocks number them (`layers.N`, `h.N`, `blocks.N`,
`encoder.layer.N`), block by block, with the layers outside the blocks before them (embeddings, stems) or after
them (final norms): `block_order`.
A GGUF file (bnprobe.files.gguf) has llama.cpp's names (`blk.N.attn_norm`, `output_norm`, ...) in its
converter's order, often `blk.10` before `blk.2`: its blocks too come in numeric order of N ("file blocks").

Files are read without torch and lazily (bnprobe.files.file_tensors): a safetensors file through its header, a
torch.save file through bnprobe's inert unpickler (pickled objects are stood in for, never run), a GGUF file
through bnprobe.files.gguf, and of a sharded checkpoint only the shards holding a norm's tensor; only the norm
tensors' bytes are ever read, with numpy (bench/static_probe.py). A norm layer wider than MAX_NORM_CHANNELS, or
norms of more than MAX_NORM_TOTAL channels in all, are refused before a byte of them is read: the shapes come
from the file, and a sparse file can declare a 1e12-element norm in 8 KB.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bnprobe.analysis.conventions import effective, scale_convention
from bnprobe.analysis.probe_results import NormStats, ProbeResult
from bnprobe.analysis.norm_finder import BN_TENSORS, Found, candidate_names, find_norms
from bnprobe.core.errors import BnprobeError, listing, printable
from bnprobe.core.options import check_scale_offset
from bnprobe.files.file_tensors import FLOATING, FileTensors, checkpoint_file, checkpoint_label, open_tensors
from bnprobe.files.shards import is_index

# A transformer block: `layers.N.`, `h.N.` (GPT-2), `blocks.N.` (timm), `layer.N.` (BERT's encoder.layer.N),
# `blk.N.` (GGUF).
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|blk)\.(\d+)\.")
# Outside the blocks, what comes before them: embeddings, stems, patch embeddings, pre-norms (norm_pre, ln_pre,
# pre_layrnorm, embeddings.LayerNorm); every other layer outside the blocks is taken to follow them.
INPUT_SIDE = re.compile(r"embed|embd|stem|patch|(^|[._])pre([._]|$)|^pre_", re.IGNORECASE)
ORDER_NOTES = {
    "file": "the file's order (registration order: input to output for the usual architectures)",
    "names": "natural order of their names ({} keeps no registration order)",
    "blocks": "the transformer blocks' order (layers.N, h.N, blocks.N: numeric order of N), layers outside them "
              "before (embeddings, stems) or after (final norms), else natural order of the names",
    "file blocks": "the blocks' order (blk.N: numeric order of N, which a GGUF converter may not keep), within a "
                   "block the file's order, token_embd_norm before the blocks and output_norm after",
}
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


def _read(path: Path, name: str, parts: dict[str, Any]) -> list[Optional[np.ndarray]]:
    """(weight, bias, running_mean, running_var) of one layer, read (None where absent) as numpy arrays, each
    checked to hold floating-point numbers before a byte of it is read."""
    for leaf, value in zip(BN_TENSORS[:4], parts.values()):
        if value is not None and FileTensors.dtype(value) not in FLOATING:
            raise BnprobeError(f"{path}: {name}.{leaf} holds {FileTensors.dtype(value)}, not the "
                               f"floating-point numbers of a normalisation layer")
    return [None if value is None else FileTensors.read(value) for value in parts.values()]


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


def find_in(file: FileTensors, path: Path, norms: str = "all") -> Found:
    """The normalisation layers and unnamed scales among a file's (selected) tensors, by names and shapes."""
    return find_norms({name: FileTensors.shape(value) for name, value in file.tensors.items()}, norms, str(path))


def norms_from_tensors(file: FileTensors, path: Path, norms: str = "all", found: Optional[Found] = None) -> NormStats:
    """Every normalisation layer of a state dict (BatchNorm alone for norms="bn"), from its tensors alone, in
    depth order (none: empty); each layer's γ, β, ... flat over its shape (a LayerNorm over (1, 264): 264)."""
    found = found if found is not None else find_in(file, path, norms)
    layers: list[tuple[str, list[Optional[np.ndarray]]]] = []
    kinds: list[str] = []
    stats_only: list[tuple[str, int]] = []
    budget = _Budget(path)
    for layer in found.layers:
        if layer.scale is None:  # BatchNorm without affine: its running statistics alone
            stats_only.append((layer.name, FileTensors.shape(file.tensors[layer.running_mean])[0]))
            continue
        parts = {leaf: None if full is None else file.tensors[full] for leaf, full in
                 zip(BN_TENSORS[:4], (layer.scale, layer.shift, layer.running_mean, layer.running_var))}
        budget.take(layer.name, FileTensors.shape(parts["weight"]))
        layers.append((layer.name, _read(path, layer.name, parts)))
        kinds.append(layer.kind)
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


def static_probe(path: Path | str, norms: str = "all", scale_offset: Optional[float] = None) -> Optional[ProbeResult]:
    """Probe one checkpoint (a file, a run directory, a Hugging Face model folder or its index) from its tensors
    alone; None for a bnprobe run's checkpoint. γ is the effective scale (bnprobe.analysis.conventions): stored + 1
    for the Gemma family's RMSNorms, or as `scale_offset` says."""
    file = checkpoint_file(path)
    check_scale_offset(scale_offset)
    sharded = is_index(file)  # its shards are opened for the norms alone, not for unnamed scales
    with open_tensors(file, lambda names: candidate_names(names, norms, unnamed=not sharded)) as tensors:
        if tensors is None:
            return None
        found = find_in(tensors, file, norms)
        stats = norms_from_tensors(tensors, file, norms, found)
        unnamed = [f"{name.removesuffix('.weight')} {shape}" for name, shape in found.unnamed]
        if not stats.names and not stats.stats_only:
            names = tensors.names
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            what = ("a BatchNorm layer's (running_mean and running_var, with weight and bias, all 1-D of one length)"
                    if norms == "bn" else
                    "a normalisation layer's (BatchNorm: running_mean and running_var, with weight and bias, all "
                    "1-D of one length; a weight and a bias of one shape; or a weight alone under a norm's name, "
                    "such as norm, ln_1 or input_layernorm)")
            scales = (f"; {len(unnamed)} unnamed scale{'s' if len(unnamed) != 1 else ''} (a weight alone in a list "
                      f"or nn.Sequential: an RMSNorm, a PReLU or a per-channel scale, not counted): "
                      f"{listing(unnamed, 3)}" if unnamed and norms == "all" else "")
            raise BnprobeError(f"{file}: no normalisation layer: {len(names)} tensor{'s' if len(names) != 1 else ''} "
                               f"(state dict at {tensors.where}), none of them {what}: {shown}{scales}")
        convention = scale_convention(file, tensors.kind, scale_offset)
        stats.gamma, shifted = effective(stats.gamma, stats.kinds, convention)
        order = tensors.order
        # No registration order (names), or a GGUF converter's (it keeps its source's, often blk.10 before blk.2):
        # the blocks' numbers give it where there are blocks.
        if order == "names" or tensors.kind == "gguf":
            depth = block_order(stats.names)
            if depth != sorted(depth):
                stats, order = stats.take(depth), "blocks" if order == "names" else "file blocks"
        attrs = {"source": "file", "file_format": tensors.kind, "state_dict_key": tensors.where,
                 "stripped_prefixes": ",".join(tensors.stripped) or "none", "tensors": len(tensors.names),
                 "layer_order": order, **tensors.about, "scale_offset": convention.offset,
                 "scale_convention": f"{convention.text}: {convention.why}"
                                     + (f" ({shifted} layer{'s' if shifted != 1 else ''} shifted)" if shifted else ""),
                 "unnamed_scales": len(unnamed), **({"unnamed_scale_names": listing(unnamed, 20)} if unnamed else {}),
                 **({"shards": tensors.shards[1], "shards_read": tensors.shards[0]} if tensors.shards else {}),
                 **({"stood_in": tensors.stood_in} if tensors.stood_in else {})}
    nan = float("nan")
    label = checkpoint_label(file, path)
    return ProbeResult(label, str(file.resolve()), attrs, stats, sites=[], loss=nan, accuracy=nan, images=0,
                       forward_pass=False)
