"""Frankle's initialisation: He normal for conv/linear weights, gamma ~ U[0, 1], beta = 0 (for BN, and the same
for GroupNorm and LayerNorm, so that a comparison of norms starts from equal γ/β draws)."""

from __future__ import annotations

import torch.nn as nn

from bnprobe.nets.norms import NORM_TYPES, has_affine


def init_weights(model: nn.Module, gamma_init: str = "uniform") -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)  # fan_in, gain sqrt(2): He et al. 2015
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, NORM_TYPES) and has_affine(module):  # a BN net draws as before: its norms are BNs
            if gamma_init == "uniform":
                nn.init.uniform_(module.weight, 0.0, 1.0)
            elif gamma_init == "ones":
                nn.init.ones_(module.weight)
            elif gamma_init == "normal":
                nn.init.normal_(module.weight, 1.0, 0.1)
            else:
                raise ValueError(f"unknown gamma init {gamma_init!r}")
            if module.bias is not None:  # LayerNorm(bias=False) has γ alone
                nn.init.zeros_(module.bias)
    return model
