"""The optimizer and what it adds beyond the loss: weight decay on everything trainable (Frankle),
extra L2 on the norm layers' gamma/beta (`--bn-l2`), and L1 on gamma (`--gamma-l1`, Network Slimming)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from bnprobe.core.config import TrainConfig
from bnprobe.nets.freeze import norm_parameter_names
from bnprobe.nets.norms import norm_layers


def make_optimizer(model: nn.Module, config: TrainConfig, masked: frozenset[str] = frozenset()) -> torch.optim.SGD:
    """SGD over the trainable tensors. Norm layers' tensors decay by weight_decay + bn_l2; masked tensors (random
    features) decay in masked_decay_step, so their group has none."""
    bn = norm_parameter_names(model)
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


def after_backward_steps(model: nn.Module, config: TrainConfig,
                         masks: dict[str, torch.Tensor]) -> list[Callable[[], None]]:
    """What a training step adds to the loss gradient between backward() and the optimizer step (after
    telemetry has recorded the loss gradient alone), in order."""
    steps = [masked_decay_step(model, masks, config.weight_decay), gamma_l1_step(model, config.gamma_l1)]
    return [step for step in steps if step is not None]


def masked_decay_step(model: nn.Module, masks: dict[str, torch.Tensor],
                      weight_decay: float) -> Optional[Callable[[], None]]:
    """A callable that adds weight_decay * w to the masked elements of each --random-features tensor's
    gradient, (grad + weight_decay * w) * mask, so the other elements never move; None when nothing to do."""
    params = dict(model.named_parameters())
    tensors = [params[name] for name in masks]
    if not weight_decay or not tensors:
        return None
    factors = [mask.to(p.device, p.dtype) for p, mask in zip(tensors, masks.values())]  # 1 trains, 0 stays

    def add_masked_decay() -> None:
        grads = [p.grad for p in tensors]
        torch._foreach_add_(grads, torch._foreach_mul([p.detach() for p in tensors], weight_decay))
        torch._foreach_mul_(grads, factors)

    return add_masked_decay


def gamma_l1_step(model: nn.Module, strength: float) -> Optional[Callable[[], None]]:
    """A callable that adds strength * sign(gamma) to every trainable gamma's gradient (the subgradient of
    strength * sum|gamma|), as one fused op; None when there is nothing to do."""
    gammas = [module.weight for _, module in norm_layers(model, with_gamma=True) if module.weight.requires_grad]
    if not strength or not gammas:
        return None

    def add_l1_subgradient() -> None:
        grads = [g.grad for g in gammas]
        torch._foreach_add_(grads, torch._foreach_sign(gammas), alpha=strength)

    return add_l1_subgradient
