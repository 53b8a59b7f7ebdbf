"""Registry of model builders by name (timm's pattern): `create_model(name, ...)` and `list_models()`.

Every builder takes the same keywords, so the CLI can build any of them from a TrainConfig:
`in_channels`, `num_classes`, `width` (multiplier) and `shortcut` (A or B, CIFAR ResNets only).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from bnprobe.errors import BnprobeError

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_model(name: str, description: str = "") -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator (or plain call on a `functools.partial`) that files a builder under `name`."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = builder
        _DESCRIPTIONS[name] = description or (builder.__doc__ or "").strip().splitlines()[0]
        return builder

    return add


def list_models() -> list[str]:
    return list(_REGISTRY)


def describe_model(name: str) -> str:
    return _DESCRIPTIONS[name]


def check_model_name(name: str) -> None:
    if name not in _REGISTRY:
        raise BnprobeError(f"unknown model {name!r}; `bnprobe models` lists the {len(_REGISTRY)} known ones")


def create_model(
    name: str, *, in_channels: int = 3, num_classes: int = 10, width: int = 1, shortcut: str = "B"
) -> nn.Module:
    """Build a registered model with PyTorch's default init; `init_weights` applies Frankle's."""
    check_model_name(name)
    return _REGISTRY[name](in_channels=in_channels, num_classes=num_classes, width=width, shortcut=shortcut)


# Importing the families registers their builders.
from bnprobe.models import bottleneck_resnet, cifar_resnet, vgg  # noqa: E402,F401
from bnprobe.models.init import init_weights  # noqa: E402,F401
