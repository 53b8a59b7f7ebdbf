"""Bottleneck ResNet-50/101/152/200 (torchvision's `ResNet`/`Bottleneck`) adapted to 32x32 inputs.

As in Frankle et al. (2020): the 7x7 stride-2 stem and the max-pool are replaced by a 3x3 stride-1 conv,
so a 32x32 image reaches the last stage at 4x4. Shortcuts are torchvision's 1x1 conv + BN (option B).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from bnprobe.core.errors import BnprobeError
from bnprobe.core.modelnames import BOTTLENECK_RESNET_DEPTHS
from bnprobe.nets.norms import NormLayer
from bnprobe.nets.registry import register_model

LAYERS = dict(zip(BOTTLENECK_RESNET_DEPTHS, ([3, 4, 6, 3], [3, 4, 23, 3], [3, 8, 36, 3], [3, 24, 36, 3])))


def stages_for_convs(convs: int) -> list[int]:
    """Bottleneck blocks per stage for a main path of `convs` convs (1 stem + 3 per block; the 4 shortcut
    convs are not counted): torchvision's [3, 4, x, 3] when it fits, else as even as possible."""
    if convs < 13 or (convs - 1) % 3:
        raise BnprobeError(f"a bottleneck ResNet has 1 + 3k convs with k >= 4, not {convs}")
    blocks = (convs - 1) // 3
    if blocks >= 14:
        return [3, 4, blocks - 10, 3]
    return [blocks // 4 + (i < blocks % 4) for i in range(4)]


def bottleneck_resnet(
    depth: int,
    *,
    in_channels: int,
    num_classes: int,
    width: int = 1,
    shortcut: str = "B",
    norm_layer: Optional[NormLayer] = None,
) -> ResNet:
    if shortcut != "B":
        raise BnprobeError(f"resnet{depth} has 1x1-conv shortcuts only (shortcut B), got {shortcut!r}")
    layers = LAYERS[depth] if depth in LAYERS else stages_for_convs(depth - 1)
    model = ResNet(Bottleneck, layers, num_classes=num_classes, width_per_group=64 * width, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


for _depth in LAYERS:
    register_model(
        f"resnet{_depth}", f"Bottleneck ResNet-{_depth} (torchvision) with a 3x3 stride-1 stem and no max-pool"
    )(partial(bottleneck_resnet, _depth))

# The seed's comparisons by number of conv layers (main path, shortcuts not counted): 25, 76, 100 convs.
for _convs in (25, 76, 100):
    register_model(
        f"convs{_convs}",
        f"Bottleneck ResNet with {_convs} main-path convs ({stages_for_convs(_convs)} blocks) + 1 linear",
    )(partial(bottleneck_resnet, _convs + 1))
