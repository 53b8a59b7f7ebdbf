"""What a model's name says without building it: its family and depth. Torch-free, so the report and the
findings (which never load torch) group runs by family and depth as the registry (bnprobe.nets) names them."""

from __future__ import annotations

import re
from typing import Optional

# The registry's bottleneck ResNets (bnprobe.nets.bottleneck_resnet builds these depths); every other
# resnet<N> is a CIFAR ResNet.
BOTTLENECK_RESNET_DEPTHS = (50, 101, 152, 200)


def model_depth(model: str) -> Optional[int]:
    """Depth from the model name: resnet110 -> 110, vgg38 -> 38; None when the name has no number."""
    match = re.match(r"^[A-Za-z_-]*?(\d+)", model)
    return int(match.group(1)) if match else None


def model_family(model: str) -> str:
    """'CIFAR ResNet', 'Bottleneck ResNet', 'Bottleneck ResNet by convs', 'VGG', else the name's letters
    (resnet56 is a CIFAR ResNet, resnet50 a bottleneck one: they must not share a line in accuracy vs depth)."""
    prefix = re.match(r"^[A-Za-z_-]*", model).group(0).rstrip("_-").lower()
    depth = model_depth(model)
    if prefix == "resnet":
        return "Bottleneck ResNet" if depth in BOTTLENECK_RESNET_DEPTHS else "CIFAR ResNet"
    if prefix == "convs":  # bottleneck ResNets named by main-path conv count: a depth of another kind
        return "Bottleneck ResNet by convs"
    if prefix == "vgg":
        return "VGG"
    return prefix or model


def norm_channels(model: str, width: int) -> Optional[tuple[int, ...]]:
    """The channel counts of the norm layers the registry's `model` has at `width` (bnprobe.nets builds them:
    tests/test_hostile_runs.py checks this against the models), so that torch-free readers (report, findings)
    check --norm-groups as train does; None for a name of no known family."""
    family = model_family(model)
    if family == "CIFAR ResNet":
        return (16 * width, 32 * width, 64 * width)
    if family == "VGG":
        return (64 * width, 128 * width, 256 * width, 512 * width)
    if family.startswith("Bottleneck ResNet"):  # torchvision's: a stem of 64, inner widths 64w.., outputs 256..
        return (64, 64 * width, 128 * width, 256 * width, 512 * width, 256, 512, 1024, 2048)
    return None
