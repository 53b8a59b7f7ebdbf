"""Which tensors train. Frozen ones get requires_grad=False, so autograd never computes their gradients."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.config import FREEZE_MODES
from bnprobe.errors import BnprobeError


def bn_parameter_names(model: nn.Module) -> set[str]:
    """Names of every BatchNorm gamma (weight) and beta (bias)."""
    return {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for param_name, _ in module.named_parameters(recurse=False)
    }


def output_layer_name(model: nn.Module) -> str:
    """The classifier: the last nn.Linear in module order."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BnprobeError("the model has no nn.Linear output layer to freeze or train")
    return linears[-1]


def trainable_parameter_names(model: nn.Module, mode: str) -> set[str]:
    every = {name for name, _ in model.named_parameters()}
    if mode == "none":
        return every
    bn = bn_parameter_names(model)
    output_prefix = output_layer_name(model) + "."
    output = {name for name in every if name.startswith(output_prefix)}
    chosen = {
        "non-bn": bn,
        "non-bn-output": bn | output,
        "all-but-output": output,
        "bn": every - bn,
    }.get(mode)
    if chosen is None:
        raise BnprobeError(f"--freeze must be one of {', '.join(FREEZE_MODES)}; got {mode!r}")
    return chosen


def apply_freeze(model: nn.Module, mode: str) -> tuple[int, int]:
    """Set requires_grad per `mode`; return (trainable, total) parameter counts."""
    trainable = trainable_parameter_names(model, mode)
    counts = [0, 0]
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        counts[0] += param.numel() if name in trainable else 0
        counts[1] += param.numel()
    return counts[0], counts[1]
