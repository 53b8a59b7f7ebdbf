"""Bottleneck ResNet-50/101/152/200 (torchvision's `ResNet`/`Bottleneck`) adapted to 32x32 inputs.

As in Frankle et al. (2020): the 7x7 stride-2 stem and the max-pool are replaced by a 3x3 stride-1 conv,
so a 32x32 image reaches the last stage at 4x4. Shortcuts are torchvision's 1x1 conv + BN (option B).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from bnprobe.errors import BnprobeError
from bnprobe.models import NormLayer, register_model

LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3], 200: [3, 24, 36, 3]}


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
    model = ResNet(Bottleneck, LAYERS[depth], num_classes=num_classes, width_per_group=64 * width, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


for _depth in LAYERS:
    register_model(
        f"resnet{_depth}", f"Bottleneck ResNet-{_depth} (torchvision) with a 3x3 stride-1 stem and no max-pool"
    )(partial(bottleneck_resnet, _depth))
