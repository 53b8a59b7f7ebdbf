"""A run's model checked before anything is allocated: built on the meta device (shapes, no memory), so every
model option and the model's size are answered in one line by train, sweep and every reader of a stored config."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from bnprobe.core.config import MAX_PARAMETERS, TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.core.model_spec import ModelSpec
from bnprobe.nets.freeze import random_feature_masks
from bnprobe.nets.norms import remove_norm_affine
from bnprobe.nets.registry import build_model


def check_model(config: TrainConfig, where: Optional[str] = None) -> None:
    """The model `config` builds, on the meta device: every model option, and at most MAX_PARAMETERS. `where`
    names a stored config in the message."""
    try:
        _check_model(config.model_spec(), config.random_features)
    except BnprobeError as exc:
        raise BnprobeError(f"{where}: {exc}" if where else str(exc)) from None


@functools.lru_cache(maxsize=32)
def _check_model(spec: ModelSpec, random_features: int) -> None:
    """Cached, because the CLI and train() both check the same config (deep models take seconds); runs that
    differ only in how they are initialised or trained share the check."""
    with torch.device("meta"):
        model = build_model(dataclasses.replace(spec, bn_affine_off=""))
        parameters = sum(p.numel() for p in model.parameters())
        if parameters > MAX_PARAMETERS:
            raise BnprobeError(f"{spec.model} at width {spec.width} has {parameters:,} parameters, more than "
                               f"bnprobe builds ({MAX_PARAMETERS:,}: 8 GB of float32 weights, 24 GB to train)")
        remove_norm_affine(model, spec.bn_affine_off)
        if random_features:
            random_feature_masks(model, random_features, torch.Generator())
