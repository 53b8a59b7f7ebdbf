"""The optimizer and what it adds beyond the loss: weight decay on everything trainable (Frankle),
extra L2 on BN gamma/beta (`--bn-l2`), and L1 on gamma (`--gamma-l1`, Network Slimming)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from bnprobe.config import TrainConfig
from bnprobe.freeze import bn_parameter_names
from bnprobe.models import bn_layers


def make_optimizer(model: nn.Module, config: TrainConfig, masked: frozenset[str] = frozenset()) -> torch.optim.SGD:
    """SGD over the trainable tensors. BN tensors decay by weight_decay + bn_l2; masked tensors (random
    features) decay inside their gradient hook, so their group has none."""
    bn = bn_parameter_names(model)
    groups: dict[str, list[torch.nn.Parameter]] = {"plain": [], "bn": [], "masked": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups["masked" if name in masked else "bn" if name in bn else "plain"].append(param)
    decay = {"plain": config.weight_decay, "bn": config.weight_decay + config.bn_l2, "masked": 0.0}
    return torch.optim.SGD(
        [{"params": params, "weight_decay": decay[key]} for key, params in groups.items() if params],
        lr=config.lr,
        momentum=config.momentum,
    )


def gamma_l1_step(model: nn.Module, strength: float) -> Optional[Callable[[], None]]:
    """A callable that adds strength * sign(gamma) to every trainable gamma's gradient (the subgradient of
    strength * sum|gamma|), as one fused op; None when there is nothing to do."""
    gammas = [module.weight for _, module in bn_layers(model, with_gamma=True) if module.weight.requires_grad]
    if not strength or not gammas:
        return None

    def add_l1_subgradient() -> None:
        grads = [g.grad for g in gammas]
        torch._foreach_add_(grads, torch._foreach_sign(gammas), alpha=strength)

    return add_l1_subgradient
