"""Clamping norm scales in place, on the model's own modules: for models evaluated by code that is not bnprobe's
(a user's --eval function, a Hugging Face model), which must see their model as they built it, not a copy with
folded or wrapped layers; and for models too large to copy.

A layer's effective scale is `offset + weight` (offset 0 for almost every norm; 1 for Gemma's RMSNorm, which
multiplies by 1 + w): clamping it to 0 writes weight = -offset. Every original tensor is kept, so clamp(None)
restores the model bit for bit.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError, first_line

# A model's own norm classes, by name: LlamaRMSNorm, T5LayerNorm, GemmaRMSNorm, a user's RMSNorm, ...
NORM_NAME = re.compile(r"(LayerNorm|RMSNorm|Norm)$")
TORCH_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)  # γ·x̂ (+ β): offset 0 by definition


def scale_norms(model: nn.Module) -> list[tuple[str, nn.Module, float]]:
    """Every norm layer with a scale (torch's BatchNorm, GroupNorm, LayerNorm, RMSNorm, and the model's own
    *LayerNorm/*RMSNorm classes) with what its forward adds to the weight, measured once per class."""
    offsets: dict[type, float] = {}
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        # torch's own norms with any shape of γ (a LayerNorm over (C, H, W): one entry per element); another
        # class only when its name says norm and its weight is one scale per dimension
        if not (isinstance(module, TORCH_NORMS) or (NORM_NAME.search(type(module).__name__) and weight.dim() == 1)):
            continue
        if type(module) not in offsets:
            offsets[type(module)] = norm_offset(module)
        found.append((name, module, offsets[type(module)]))
    return found


@torch.no_grad()
def norm_offset(module: nn.Module) -> float:
    """0 when weight = 0 silences the layer's output (γ·x̂ + β with β = 0), 1 when weight = -1 does (Gemma's
    x̂·(1 + w)): measured on a copy with a random input, not assumed from the class or model type."""
    if isinstance(module, TORCH_NORMS):
        return 0.0
    width = module.weight.numel()
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    for offset in (0.0, 1.0):
        probe = copy.deepcopy(module).float().cpu().eval()
        probe.weight.fill_(-offset)
        if isinstance(getattr(probe, "bias", None), torch.Tensor):
            probe.bias.zero_()
        try:
            out = probe(x)
        except Exception as exc:  # noqa: BLE001 - a norm with another calling convention
            raise BnprobeError(f"cannot tell how {type(module).__name__} scales its output (it fails on a (2, 3, "
                               f"{width}) input: {first_line(exc, typed=True)}); bnprobe does not clamp it blindly")
        out = out[0] if isinstance(out, tuple) else out
        if isinstance(out, torch.Tensor) and torch.isfinite(out).all() and float(out.abs().max()) < 1e-6:
            return offset
    raise BnprobeError(f"{type(module).__name__}'s output is not silenced by weight = 0 nor by weight = -1; "
                       f"bnprobe cannot clamp its scale to zero")


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
