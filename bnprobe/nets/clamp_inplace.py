"""Clamping norm scales in place, on the model's own modules: for models evaluated by code that is not bnprobe's
(a user's --eval function, a Hugging Face model), which must see their model as they built it, not a copy with
folded or wrapped layers; and for models too large to copy.

A layer's effective scale is `offset + weight` (offset 0 for almost every norm; 1 for Gemma's RMSNorm, which
multiplies by 1 + w): clamping it to 0 writes weight = -offset. Every original tensor is kept, so clamp(None)
restores the model bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn


@dataclass
class InPlaceLayer:
    name: str
    module: nn.Module
    offset: float  # effective scale = offset + weight
    base_weight: torch.Tensor
    base_bias: Optional[torch.Tensor]
    folded: bool = False  # never: the interface of bnprobe.nets.fold.ClampLayer

    @property
    def gamma(self) -> torch.Tensor:
        """The effective scale, flat: what thresholds and outliers are computed from."""
        return (self.base_weight.reshape(-1) + self.offset) if self.offset else self.base_weight.reshape(-1)

    @property
    def channels(self) -> int:
        return self.base_weight.numel()


class InPlaceNorms:
    """The norm layers (name, module, offset) of `model`, each with a 1-D or flat `weight`, clampable in place."""

    pairing = "off"  # nothing folded

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module, float]]):
        self.model = model
        self.layers = [
            InPlaceLayer(name, module, float(offset), module.weight.detach().clone(),
                         None if getattr(module, "bias", None) is None else module.bias.detach().clone())
            for name, module, offset in layers
        ]

    @property
    def gammas(self) -> list[torch.Tensor]:
        return [layer.gamma for layer in self.layers]

    @torch.no_grad()
    def clamp(self, masks: Optional[Sequence[torch.Tensor]], zero_beta: bool = False) -> None:
        """Set the effective scale of the channels where a mask is True to 0 (with `zero_beta` their shift too);
        None restores every layer."""
        if masks is not None and len(masks) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} masks, got {len(masks)}")
        for i, layer in enumerate(self.layers):
            weight = layer.module.weight
            if masks is None or not bool(masks[i].any()):
                weight.copy_(layer.base_weight)
                if layer.base_bias is not None:
                    layer.module.bias.copy_(layer.base_bias)
                continue
            mask = masks[i].to(weight.device).reshape(layer.base_weight.shape)
            weight.copy_(layer.base_weight.masked_fill(mask, -layer.offset))
            if layer.base_bias is not None:
                layer.module.bias.copy_(layer.base_bias.masked_fill(mask, 0) if zero_beta else layer.base_bias)

    def eval(self) -> "InPlaceNorms":
        self.model.eval()
        return self
