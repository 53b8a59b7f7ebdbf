"""Which tensors of a state dict belong to a normalisation layer, from their names and shapes alone (torch-free:
the static probe decides before it reads a byte of any tensor).

A module is the prefix its tensors share (`stages.0.downsample.0` for `stages.0.downsample.0.weight`), and it
is read from what it holds, whatever it is called:

- BatchNorm (any kind: nn.BatchNorm*, SyncBatchNorm, timm's BatchNormAct2d, torchvision's and timm's
  FrozenBatchNorm2d, InstanceNorm with running statistics): `running_mean` and `running_var` (+
  `num_batches_tracked`), and `weight` (γ) and `bias` (β) when affine, all 1-D of one length;
- an affine norm (LayerNorm, GroupNorm, LayerNorm2d, timm's and Hugging Face's GlobalResponseNorm, norm+act
  classes, ...): a `weight` and a `bias` (or, in older files, a `gamma` and a `beta`) of one shape and nothing
  else, under ANY name, inside nn.Sequential too (`stem.1`). Their shape is 1-D or the several dimensions of a
  LayerNorm's normalized_shape (nn.LayerNorm([1, 264]): (1, 264); a GRN: (1, 1, 1, C)): a Linear's or a conv's
  weight never has its bias's shape, so the pair alone tells;
- EvoNorm (timm): a `weight` and a `bias` with its `v` and/or `running_var`, all 1-D of one length;
- an RMSNorm, or a LayerNorm without bias: a `weight` alone, under a name that says norm (NORM_NAME: `norm`,
  `ln_1`, `input_layernorm`, `gn`, `rms`, ...; for an item of a list, its list's name: `norms.0`), of one
  dimension (or of one dimension above 1: (1, 1, C)).

A `weight` alone that is a vector under a name that says nothing (an item of nn.Sequential: `stem.2`) is
ambiguous: an RMSNorm, a LayerNorm without bias, a PReLU, a per-channel scale all store exactly that. It is not
counted as a norm but listed as an "unnamed scale", for the user to judge. One under a name that says what it
is not (NOT_NORM_NAME: `act`, `prelu`, `scale`, `ls1`, ...) is not listed.

What is not a norm's is left alone: weight-standardised convs' gains (NFNets), LayerScale's `gamma`, ResMLP's
`alpha`/`beta`, embeddings and projections.

Fed names alone (a sharded checkpoint, before its shards are opened), `candidate_names` picks every tensor
that may belong to such a layer (a superset); `find_norms`, fed the names and shapes of those (and of any other
tensor), decides.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import BATCHNORM, SCALE_ONLY, SCALE_SHIFT

Shape = tuple[int, ...]

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# The names of a scale and its shift: PyTorch's, and TF-era files' (BERT's LayerNorm.gamma/beta, timm's first GRN).
PAIRS = (("weight", "bias"), ("gamma", "beta"))
EVONORM_EXTRAS = ("v", "running_var")
# The last part of a norm's module name in the usual conventions, any case: *norm* (norm1, fc_norm, q_norm,
# LayerNorm, input_layernorm, post_attention_layernorm, final_layer_norm, rmsnorm, group_norm, pre_layrnorm),
# GPT-2's and CLIP's ln_1, ln_f, ln_post, RWKV's ln0, GroupNorm's gn, gn1, and *rms* (rms, rms_1).
NORM_NAME = re.compile(r"norm|^ln(_?[a-z0-9]+)?$|^[bg]n_?\d*$|rms", re.IGNORECASE)
# Names that say a lone vector is not a norm's: an activation's (PReLU), a layer scale's, an embedding's.
NOT_NORM_NAME = re.compile(r"act|relu|lu$|scale|^ls_?\d*$|gamma|alpha|embed|token|^pos|gate|temperature",
                           re.IGNORECASE)


@dataclass(frozen=True)
class Layer:
    """One normalisation layer: its module name (prefix), kind (PROBE_NORM_KINDS) and its tensors by role."""

    name: str
    kind: str
    scale: Optional[str] = None  # full tensor names; None: absent
    shift: Optional[str] = None
    running_mean: Optional[str] = None
    running_var: Optional[str] = None
    counter: Optional[str] = None  # num_batches_tracked


@dataclass
class Found:
    """The normalisation layers of a state dict in the order of their first tensor, the BatchNorm layers without
    γ among them (stats-only: scale None), and the unnamed scales (full tensor name, shape)."""

    layers: list[Layer] = field(default_factory=list)
    unnamed: list[tuple[str, Shape]] = field(default_factory=list)

    @property
    def tensor_names(self) -> set[str]:
        return {name for layer in self.layers for name in (layer.scale, layer.shift, layer.running_mean,
                                                           layer.running_var, layer.counter) if name}


def groups(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """prefix -> leaf -> full name, in the names' order."""
    found: dict[str, dict[str, str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        found.setdefault(prefix, {})[leaf] = name
    return found


def own_name(prefix: str) -> str:
    """What a module is called: its last part, or for an item of a list or nn.Sequential (`norms.0`,
    `q_layernorm.norms.1`), the list's name; "" for an item of an unnamed list (`0`) or the top level."""
    parts = prefix.split(".")
    while parts and parts[-1].isdigit():
        parts.pop()
    return parts[-1] if parts else ""


def indexed(prefix: str) -> bool:
    """An item of a list or nn.Sequential: its name is a number, which says nothing of what it is."""
    return prefix.rpartition(".")[2].isdigit()


def named_like_a_norm(prefix: str) -> bool:
    return bool(NORM_NAME.search(own_name(prefix)))


def _vector_like(shape: Shape) -> bool:
    """1-D, or several dimensions of which one at most is above 1 ((1, 264), (1, 1, 1, C)): one value per
    channel, however a LayerNorm's normalized_shape or a broadcast layout shapes it."""
    return len(shape) >= 1 and sum(size > 1 for size in shape) <= 1


def _pair(leaves: Mapping[str, str]) -> Optional[tuple[str, str]]:
    """The (scale, shift) leaves when the module holds exactly one such pair."""
    return next(((scale, shift) for scale, shift in PAIRS if set(leaves) == {scale, shift}), None)


def _evonorm(leaves: Mapping[str, str]) -> bool:
    return {"weight", "bias"} < set(leaves) <= {"weight", "bias", *EVONORM_EXTRAS} and "running_mean" not in leaves


def _is_bn(leaves: Mapping[str, str]) -> bool:
    return ("running_mean" in leaves or "running_var" in leaves) and not _evonorm(leaves)


def _lone_scale(prefix: str, leaves: Mapping[str, str]) -> bool:
    """A `weight` alone that may be a norm's (named like one) or an unnamed scale (an item of a list)."""
    return set(leaves) == {"weight"} and (named_like_a_norm(prefix) or indexed(prefix))


def layer_kind(batchnorm: bool, shift: bool) -> str:
    """What a normalisation layer is, as far as what it holds tells (PROBE_NORM_KINDS): BatchNorm (running
    statistics of its own); a scale and a shift per channel and no BatchNorm statistics, LayerNorm/GroupNorm-like
    (neither tensors nor names tell the two apart); a scale alone, RMSNorm-like (or a LayerNorm without bias). The
    one rule for a file's tensors (find_norms) and a model's modules (forward_probe.module_kind)."""
    if batchnorm:
        return BATCHNORM
    return SCALE_SHIFT if shift else SCALE_ONLY


def _named_norm(leaves: Mapping[str, str], shapes: Mapping[str, Shape]) -> Optional[tuple[str, str, Optional[str]]]:
    """A module named like a norm that holds a vector `weight` (and a `bias` of its shape) besides other tensors
    (I-BERT's IntLayerNorm keeps a `shift`, quantised norms their scales): (kind, scale, shift); None if not."""
    if "weight" not in leaves or not _vector_like(shapes[leaves["weight"]]):
        return None
    if "bias" in leaves and shapes[leaves["bias"]] != shapes[leaves["weight"]]:
        return None
    return layer_kind(False, "bias" in leaves), leaves["weight"], leaves.get("bias")


def candidate_names(names: Sequence[str], norms: str = "all", unnamed: bool = True) -> set[str]:
    """The names of every tensor that may belong to a normalisation layer (or, with `unnamed`, be an unnamed
    scale), by the names alone: what a file is opened for (find_norms decides once the shapes are known). A
    sharded checkpoint asks without `unnamed`: a list's lone weight (a Linear without bias as often as not) would
    open its shard for a scale that is not counted."""
    chosen: set[str] = set()
    for prefix, leaves in groups(names).items():
        if _is_bn(leaves):
            chosen.update(name for leaf, name in leaves.items() if leaf in BN_TENSORS)
        elif norms == "all" and (_pair(leaves) or _evonorm(leaves) or (
                _lone_scale(prefix, leaves) and (unnamed or named_like_a_norm(prefix)))):
            chosen.update(leaves.values())
        elif norms == "all" and named_like_a_norm(prefix) and "weight" in leaves:
            chosen.update(name for leaf, name in leaves.items() if leaf in ("weight", "bias"))
    return chosen


def _bn_layer(prefix: str, leaves: Mapping[str, str], shapes: Mapping[str, Shape], source: str) -> Layer:
    name = prefix or "(top level)"
    parts = {leaf: full for leaf, full in leaves.items() if leaf in BN_TENSORS}
    vectors = {leaf: shapes[parts[leaf]] for leaf in BN_TENSORS[:4] if leaf in parts}
    counter = parts.get("num_batches_tracked")
    if ("running_mean" not in parts or "running_var" not in parts or ("weight" in parts) != ("bias" in parts)
            or len(set(vectors.values())) != 1 or len(next(iter(vectors.values()))) != 1
            or (counter is not None and len(shapes[counter]) > 1)):
        shown = ", ".join(f"{leaf} {shapes[full]}" for leaf, full in parts.items())
        raise BnprobeError(
            f"{source}: inconsistent BatchNorm tensors at {name}: {shown} (a BatchNorm layer has running_mean and "
            f"running_var, and weight and bias when affine, all 1-D of one length)")
    return Layer(name, layer_kind(True, "bias" in parts), parts.get("weight"), parts.get("bias"), parts["running_mean"],
                 parts["running_var"], counter)


def find_norms(shapes: Mapping[str, Shape], norms: str = "all", source: str = "checkpoint") -> Found:
    """The normalisation layers among these tensors (name -> shape, in the file's order; BatchNorm alone for
    norms="bn"), and the unnamed scales. A BatchNorm's tensors that do not fit together are a damaged file:
    BnprobeError naming `source`."""
    found = Found()
    for prefix, leaves in groups(list(shapes)).items():
        name = prefix or "(top level)"
        if _is_bn(leaves):
            found.layers.append(_bn_layer(prefix, leaves, shapes, source))
        elif norms != "all":
            continue
        elif (pair := _pair(leaves)) is not None:
            scale, shift = (shapes[leaves[leaf]] for leaf in pair)
            if scale == shift and len(scale) >= 1:
                found.layers.append(Layer(name, layer_kind(False, True), leaves[pair[0]], leaves[pair[1]]))
        elif _evonorm(leaves):
            if len({shapes[full] for full in leaves.values()}) == 1 and len(shapes[leaves["weight"]]) == 1:
                found.layers.append(Layer(name, layer_kind(False, True), leaves["weight"], leaves["bias"],
                                          running_var=leaves.get("running_var")))
        elif named_like_a_norm(prefix) and (scale := _named_norm(leaves, shapes)) is not None:
            found.layers.append(Layer(name, scale[0], *scale[1:]))
        elif (_lone_scale(prefix, leaves) and _vector_like(shapes[leaves["weight"]])
              and not NOT_NORM_NAME.search(own_name(prefix))):  # in a list, under a name that says nothing
            found.unnamed.append((leaves["weight"], shapes[leaves["weight"]]))
    return found
