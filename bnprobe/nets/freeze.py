"""Which tensors train. Frozen ones get requires_grad=False, so autograd never computes their gradients."""

from __future__ import annotations

import torch
import torch.nn as nn

from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import BN_FREEZE_MODES, FREEZE_MODES
from bnprobe.nets.norms import norm_layers


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of every norm layer's gamma (weight) and beta (bias): BatchNorm, GroupNorm, LayerNorm."""
    return {
        f"{module_name}.{param_name}" if module_name else param_name
        for module_name, module in norm_layers(model)
        for param_name, _ in module.named_parameters(recurse=False)
    }


def output_layer_name(model: nn.Module) -> str:
    """The classifier: the last nn.Linear in module order."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise BnprobeError("the model has no nn.Linear output layer to freeze or train")
    return linears[-1]


def trainable_parameter_names(model: nn.Module, mode: str) -> set[str]:
    """What `mode` trains. BN's spelling (non-bn, ...) and the general one (non-norm, ...) are the same modes:
    the norm layers are the model's, whatever their kind."""
    every = {name for name, _ in model.named_parameters()}
    if mode == "none":
        return every
    mode = BN_FREEZE_MODES.get(mode, mode)
    norm = norm_parameter_names(model)
    output_prefix = output_layer_name(model) + "."
    output = {name for name in every if name.startswith(output_prefix)}
    chosen = {
        "non-bn": norm,
        "non-bn-output": norm | output,
        "all-but-output": output,
        "bn": every - norm,
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


def random_feature_tensor_names(model: nn.Module) -> list[str]:
    """The tensors --random-features masks: every conv weight, in module order."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def gradient_tensor_names(model: nn.Module, mode: str, random_features: int = 0) -> set[str]:
    """The tensors whose gradient training computes: those `mode` trains, and with --random-features every
    conv weight whole (a hook then masks it)."""
    return trainable_parameter_names(model, mode) | set(random_feature_tensor_names(model) if random_features else ())


def random_feature_masks(model: nn.Module, per_channel: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """For every conv weight, a bool mask with `per_channel` random elements per output channel."""
    params = dict(model.named_parameters())
    masks = {}
    for name in random_feature_tensor_names(model):
        weight = params[name]
        out_channels, fan_in = weight.shape[0], weight[0].numel()
        if per_channel > fan_in:
            raise BnprobeError(f"--random-features {per_channel} exceeds the {fan_in} weights per channel of {name}")
        chosen = torch.rand(out_channels, fan_in, generator=generator).topk(per_channel, dim=1).indices
        mask = torch.zeros(out_channels, fan_in, dtype=torch.bool).scatter_(1, chosen, True)
        masks[name] = mask.view(weight.shape)
    return masks


def apply_random_features(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Make the masked elements trainable; return how many. The rest of each tensor stays bit-identical:
    a hook zeroes its gradient, and its weight decay is masked too (bnprobe.training.regularize.masked_decay_step,
    after telemetry has recorded the loss gradient alone), since SGD's own decay would move every element."""
    params = dict(model.named_parameters())
    count = 0
    for name, mask in masks.items():
        param = params[name]
        if param.requires_grad:
            raise BnprobeError(f"--random-features: {name} already trains whole; choose a --freeze that freezes convs")
        mask = mask.to(param.device)
        param.requires_grad_(True)
        param.register_hook(lambda grad, m=mask: grad * m)
        count += int(mask.sum())
    return count
