"""CIFAR ResNets of depth 6n+2 (He et al. 2016, section 4.2), from torchvision's BasicBlock.

Three stages of n basic blocks at widths 16w, 32w, 64w; a 3x3 stem; global average pooling; one linear
layer. Shortcuts that change shape are option A (subsample + zero-pad channels, no parameters) or
option B (1x1 conv + BN, as in open_lth: ResNet-20 then has 272,474 parameters).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from bnprobe.core.errors import BnprobeError
from bnprobe.nets.norms import NormLayer
from bnprobe.nets.registry import register_model, register_model_pattern

# Listed by `bnprobe models`; any other depth 6n+2 builds too, as resnet<6n+2> (below).
DEPTHS = (8, 14, 20, 26, 32, 44, 56, 74, 98, 110, 218, 434, 866)  # 26/74/98: ~25/75/100 convs
# Past ResNet-1202, the deepest of He et al.: a net this deep is checked on the meta device in a second or two
# (~0.5 ms a layer), where resnet600002 took minutes before it said anything.
MAX_DEPTH = 2_000


class ZeroPadShortcut(nn.Module):
    """Option A: take every stride-th pixel and append zero channels."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra_channels))


class CifarResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        *,
        in_channels: int,
        num_classes: int,
        width: int = 1,
        shortcut: str = "B",
        norm_layer: Optional[NormLayer] = None,
    ):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if depth < 8 or (depth - 2) % 6:
            raise BnprobeError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if depth > MAX_DEPTH:
            raise BnprobeError(f"CIFAR ResNet depth must be at most {MAX_DEPTH:,} layers, got {depth:,}")
        if shortcut not in ("A", "B"):
            raise BnprobeError(f"shortcut must be A or B, got {shortcut!r}")
        blocks = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, channels = [], widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                downsample = None
                if b == 0 and (stride != 1 or channels != planes):
                    if shortcut == "A":
                        downsample = ZeroPadShortcut(planes - channels, stride)
                    else:
                        downsample = nn.Sequential(conv1x1(channels, planes, stride), norm_layer(planes))
                stage.append(BasicBlock(channels, planes, stride if b == 0 else 1, downsample, norm_layer=norm_layer))
                channels = planes
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _description(depth: int) -> str:
    return f"CIFAR ResNet-{depth}: 3 stages of {(depth - 2) // 6} basic blocks, widths 16/32/64 x width"


for _depth in DEPTHS:
    register_model(f"resnet{_depth}", _description(_depth))(partial(CifarResNet, _depth))


@register_model_pattern(  # at most 9 digits: int() refuses over 4,300, and MAX_DEPTH refuses far fewer
    "resnet<6n+2>", r"resnet([1-9][0-9]{0,8})",
    f"CIFAR ResNet of any depth 6n+2 with n >= 1 up to {MAX_DEPTH:,}, e.g. resnet38"
)
def _any_depth(match: re.Match):
    depth = int(match.group(1))
    if depth < 8 or (depth - 2) % 6:
        return None
    return partial(CifarResNet, depth), _description(depth)
