"""Where the normalisation layers go and which have γ/β: BN placement (`--bn full|none|every-k`), the BN layers
of a model in depth order, and γ/β removed from chosen layers (`--bn-affine-off`)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Callable

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError

NormLayer = Callable[[int], nn.Module]  # channels -> a BatchNorm (or what stands in its place)


class EveryKthNorm:
    """A norm_layer factory that returns BatchNorm2d on every k-th call and nn.Identity otherwise."""

    def __init__(self, k: int):
        self.k, self.calls = k, 0

    def __call__(self, channels: int) -> nn.Module:
        self.calls += 1
        return nn.BatchNorm2d(channels) if self.calls % self.k == 0 else nn.Identity()


def norm_layer_for(bn: str, every: int = 1) -> NormLayer:
    if bn == "full":
        return nn.BatchNorm2d
    if bn == "none":
        return lambda channels: nn.Identity()
    if bn == "every-k":
        if every < 1:
            raise BnprobeError(f"--bn-every must be >= 1, got {every}")
        return EveryKthNorm(every)
    raise BnprobeError(f"--bn must be one of full, none, every-k; got {bn!r}")


def bn_layers(model: nn.Module, with_gamma: bool = False) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of `model` (every _BatchNorm: 1d, 2d, 3d, SyncBatchNorm) as (name, module), in
    module order: the order probes, ablations and telemetry report depth in. `with_gamma`: only those with γ
    and β (affine; --bn-affine-off takes them away)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and (m.affine or not with_gamma)]


def remove_bn_affine(model: nn.Module, patterns: str) -> list[str]:
    """Drop gamma and beta from the BN layers whose names match any comma-separated glob in `patterns`."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    layers = dict(bn_layers(model))
    removed = []
    for glob in globs:
        matched = [name for name in layers if fnmatchcase(name, glob)]
        if not matched:
            raise BnprobeError(f"--bn-affine-off: {glob!r} matches no BN layer (e.g. {', '.join(list(layers)[:3])})")
        removed += matched
    for name in dict.fromkeys(removed):
        layer = layers[name]
        layer.affine = False
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)
    return list(dict.fromkeys(removed))
