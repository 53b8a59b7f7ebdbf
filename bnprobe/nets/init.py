"""Frankle's initialisation: He normal for conv/linear weights, gamma ~ U[0, 1], beta = 0."""

from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def init_weights(model: nn.Module, gamma_init: str = "uniform") -> nn.Module:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)  # fan_in, gain sqrt(2): He et al. 2015
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BatchNorm) and module.affine:
            if gamma_init == "uniform":
                nn.init.uniform_(module.weight, 0.0, 1.0)
            elif gamma_init == "ones":
                nn.init.ones_(module.weight)
            elif gamma_init == "normal":
                nn.init.normal_(module.weight, 1.0, 0.1)
            else:
                raise ValueError(f"unknown gamma init {gamma_init!r}")
            nn.init.zeros_(module.bias)
    return model
