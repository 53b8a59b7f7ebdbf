"""VGG-style plain convolutional nets with residual connections (the seed's VGG-38).

Layout, counting weight layers: a 3x3 stem conv, then 4 stages (widths 64, 128, 256, 512 x width, a 2x2
max-pool before stages 2-4), each a 3x3 conv that sets the stage width followed by `blocks` residual
pairs of 3x3 conv-BN-ReLU convs with an identity skip; global average pooling and one linear layer.
Weight layers = 2 + 4 * (1 + 2 * blocks): blocks=4 gives VGG-38 (37 convs + 1 linear).
Every conv is followed by BN, so BN and conv gradients can be compared layer by layer.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from bnprobe.core.errors import BnprobeError
from bnprobe.nets.norms import NormLayer
from bnprobe.nets.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        norm_layer(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualPair(nn.Module):
    """conv-BN-ReLU, conv-BN, plus the input, then ReLU (a basic block without a shortcut conv)."""

    def __init__(self, channels: int, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm_layer(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class ResidualVGG(nn.Module):
    def __init__(
        self,
        blocks: int,
        *,
        in_channels: int,
        num_classes: int,
        width: int = 1,
        shortcut: str = "B",
        norm_layer: Optional[NormLayer] = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if shortcut != "B":
            raise BnprobeError("VGG models have identity skips only; --shortcut does not apply")
        widths = [64 * width, 128 * width, 256 * width, 512 * width]
        self.stem = conv_bn_relu(in_channels, widths[0], norm_layer)
        stages, channels = [], widths[0]
        for i, planes in enumerate(widths):
            pool = [nn.MaxPool2d(2)] if i else []
            stages.append(
                nn.Sequential(
                    *pool, conv_bn_relu(channels, planes, norm_layer), *(ResidualPair(planes, norm_layer) for _ in range(blocks))
                )
            )
            channels = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


register_model("vgg38", "VGG-38 with residual pairs: 37 conv-BN layers in 4 stages + 1 linear")(partial(ResidualVGG, 4))
register_model("vgg14", "VGG-14 with residual pairs: 13 conv-BN layers in 4 stages + 1 linear")(partial(ResidualVGG, 1))
