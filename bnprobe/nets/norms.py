"""Where the normalisation layers go, which kind they are and which have γ/β: placement (`--bn full|none|every-k`)
of the kind `--norm` chooses (BatchNorm, GroupNorm, LayerNorm as GroupNorm of one group), a model's norm layers in
depth order, and γ/β removed from chosen layers (`--bn-affine-off`)."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from functools import partial
from typing import Callable, Optional

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError

NormLayer = Callable[[int], nn.Module]  # channels -> a norm layer (or what stands in its place)
# The layers whose γ/β bnprobe trains, probes and clamps. LayerNorm's γ may be more than one channel wide
# (normalized_shape (C, H, W)): every element is then one "channel".
NORM_TYPES = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


class EveryKthNorm:
    """A norm_layer factory that returns `make(channels)` on every k-th call and nn.Identity otherwise."""

    def __init__(self, k: int, make: NormLayer = nn.BatchNorm2d):
        self.k, self.make, self.calls = k, make, 0

    def __call__(self, channels: int) -> nn.Module:
        self.calls += 1
        return self.make(channels) if self.calls % self.k == 0 else nn.Identity()


def group_norm(groups: int, channels: int) -> nn.GroupNorm:
    """GroupNorm of `groups` groups, or of one per channel where the layer has fewer channels."""
    groups = min(groups, channels)
    if channels % groups:
        raise BnprobeError(f"--norm-groups {groups} does not divide a layer's {channels} channels; "
                           f"pick a divisor of every layer's width (16 and its divisors fit every bnprobe model)")
    return nn.GroupNorm(groups, channels)


def norm_factory(norm: str = "batch", groups: int = 16) -> NormLayer:
    """channels -> the layer `--norm` names; `layer` is GroupNorm of one group: LayerNorm over (C, H, W) with a
    γ/β per channel, the usual LayerNorm of conv nets."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return partial(group_norm, groups)
    if norm == "layer":
        return partial(nn.GroupNorm, 1)
    raise BnprobeError(f"--norm must be one of batch, group, layer; got {norm!r}")


def norm_layer_for(bn: str, every: int = 1, norm: str = "batch", groups: int = 16) -> NormLayer:
    make = norm_factory(norm, groups)
    if bn == "full":
        return make
    if bn == "none":
        return lambda channels: nn.Identity()
    if bn == "every-k":
        if every < 1:
            raise BnprobeError(f"--bn-every must be >= 1, got {every}")
        return EveryKthNorm(every, make)
    raise BnprobeError(f"--bn must be one of full, none, every-k; got {bn!r}")


def norm_kind(module: nn.Module) -> Optional[str]:
    """bn, gn or ln (None: not a norm layer). GroupNorm of one group normalises like LayerNorm over (C, H, W),
    which is what `--norm layer` builds; telemetry's parameter groups and the report name layers by it."""
    if isinstance(module, _BatchNorm):
        return "bn"
    if isinstance(module, nn.GroupNorm):
        return "ln" if module.num_groups == 1 else "gn"
    if isinstance(module, nn.LayerNorm):
        return "ln"
    return None


def has_affine(module: nn.Module) -> bool:
    """Whether a norm layer has γ (BN's affine, LayerNorm's elementwise_affine; --bn-affine-off takes it away)."""
    return getattr(module, "weight", None) is not None


def norm_layers(model: nn.Module, with_gamma: bool = False) -> list[tuple[str, nn.Module]]:
    """Every normalisation layer of `model` (BatchNorm of any dimension, GroupNorm, LayerNorm) as (name, module),
    in module order: the order probes, ablations and telemetry report depth in. `with_gamma`: only those with γ."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, NORM_TYPES) and (has_affine(m) or not with_gamma)]


def bn_layers(model: nn.Module, with_gamma: bool = False) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers among norm_layers (every _BatchNorm: 1d, 2d, 3d, SyncBatchNorm): those with running
    statistics, which fold into a conv."""
    return [(name, m) for name, m in norm_layers(model, with_gamma) if isinstance(m, _BatchNorm)]


def norm_channels(module: nn.Module) -> int:
    """A norm layer's channels: the γ it has or would have (LayerNorm: every element of its normalized_shape)."""
    if isinstance(module, nn.LayerNorm):
        return math.prod(module.normalized_shape)
    return module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features


def remove_norm_affine(model: nn.Module, patterns: str) -> list[str]:
    """Drop gamma and beta from the norm layers whose names match any comma-separated glob in `patterns`."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    layers = dict(norm_layers(model))
    removed = []
    for glob in globs:
        matched = [name for name in layers if fnmatchcase(name, glob)]
        if not matched:
            raise BnprobeError(f"--bn-affine-off: {glob!r} matches no norm layer (e.g. {', '.join(list(layers)[:3])})")
        removed += matched
    for name in dict.fromkeys(removed):
        layer = layers[name]
        if isinstance(layer, nn.LayerNorm):
            layer.elementwise_affine = False
        else:
            layer.affine = False
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)
    return list(dict.fromkeys(removed))
