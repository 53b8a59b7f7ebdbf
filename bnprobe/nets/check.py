"""A run's model checked before anything is allocated: built on the meta device (shapes, no memory), so every
model option and the model's size are answered in one line by train, sweep and every reader of a stored config."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from bnprobe.core.config import MAX_PARAMETERS, TrainConfig
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.errors import BnprobeError
from bnprobe.nets.freeze import random_feature_masks
from bnprobe.nets.norms import remove_norm_affine
from bnprobe.nets.registry import create_model


def check_model(config: TrainConfig, where: Optional[str] = None) -> None:
    """The model `config` builds, on the meta device: every model option, and at most MAX_PARAMETERS. `where`
    names a stored config in the message."""
    spec = get_dataset_spec(config.dataset)
    try:
        _check_model(config.model, spec.channels, spec.num_classes, config.width, config.shortcut, config.bn,
                     config.bn_every, config.norm, config.norm_groups, config.bn_affine_off, config.random_features)
    except BnprobeError as exc:
        raise BnprobeError(f"{where}: {exc}" if where else str(exc)) from None


@functools.lru_cache(maxsize=32)
def _check_model(model_name: str, channels: int, classes: int, width: int, shortcut: str, bn: str, bn_every: int,
                 norm: str, norm_groups: int, bn_affine_off: str, random_features: int) -> None:
    """Cached, because the CLI and train() both check the same config (deep models take seconds)."""
    with torch.device("meta"):
        model = create_model(model_name, in_channels=channels, num_classes=classes,
                             width=width, shortcut=shortcut, bn=bn, bn_every=bn_every, norm=norm,
                             norm_groups=norm_groups)
        parameters = sum(p.numel() for p in model.parameters())
        if parameters > MAX_PARAMETERS:
            raise BnprobeError(f"{model_name} at width {width} has {parameters:,} parameters, more than bnprobe "
                               f"builds ({MAX_PARAMETERS:,}: 8 GB of float32 weights, 24 GB to train)")
        remove_norm_affine(model, bn_affine_off)
        if random_features:
            random_feature_masks(model, random_features, torch.Generator())
