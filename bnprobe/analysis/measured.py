"""What a probe measures of one checkpoint, whatever produced it: the γ/β of every normalisation layer with their
running statistics (BNStats, from the model's modules or from the file's tensors alone), the ReLU sites of a
forward pass, and the ProbeResult that holds both with its summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from bnprobe.analysis.relu import ReluSite
from bnprobe.core.measures import fraction_below
from bnprobe.nets.norms import has_affine, norm_channels, norm_layers


@dataclass
class BNStats:
    names: list[str]
    gamma: list[np.ndarray]  # per layer, float64
    beta: list[np.ndarray]
    running_mean: list[np.ndarray]
    running_var: list[np.ndarray]
    stats_only: list[tuple[str, int]] = field(default_factory=list)  # BN without affine: (name, channels)

    @classmethod
    def from_tensors(cls, layers: Sequence[tuple[str, Sequence[Optional[torch.Tensor]]]],
                     stats_only: Sequence[tuple[str, int]] = ()) -> "BNStats":
        """layers: (name, (weight, bias, running_mean, running_var)) in depth order; copied to float64."""
        get = lambda t: t.detach().double().cpu().numpy().copy() if t is not None else np.zeros(0)  # noqa: E731
        columns = list(zip(*[[get(t) for t in tensors] for _, tensors in layers])) or [(), (), (), ()]
        return cls([name for name, _ in layers], *(list(column) for column in columns), stats_only=list(stats_only))

    @property
    def channels(self) -> np.ndarray:
        return np.array([g.size for g in self.gamma], dtype=np.int64)

    def frac_below(self, taus: Sequence[float]) -> np.ndarray:
        """(L, T): fraction of each layer's channels with |γ| < τ."""
        return fraction_below(self.gamma, taus)

    def frac_below_all(self, taus: Sequence[float]) -> np.ndarray:
        """(T,): the same over every channel of the network."""
        return fraction_below(self.gamma, taus, per_layer=False)

    def off(self, threshold: float) -> np.ndarray:
        """Channels turned off per layer: |γ| < threshold, so the BN output is (almost) the constant β."""
        return np.array([int(np.sum(np.abs(g) < threshold)) for g in self.gamma], dtype=np.int64)

    def off_dead(self, threshold: float) -> np.ndarray:
        """Of those, channels with β <= 0: a ReLU right after outputs (almost) 0 for every input."""
        return np.array(
            [int(np.sum((np.abs(g) < threshold) & (b <= 0))) for g, b in zip(self.gamma, self.beta)], dtype=np.int64
        )


def bn_statistics(model: nn.Module) -> BNStats:
    """Every norm layer's γ/β (BatchNorm, GroupNorm, LayerNorm: flat, one value per channel or, for a LayerNorm
    over (C, H, W), per element); running statistics where it keeps them (BN)."""
    stats_only = [(name, norm_channels(m)) for name, m in norm_layers(model) if not has_affine(m)]
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    return BNStats.from_tensors([(name, (flat(m.weight), flat(m.bias), getattr(m, "running_mean", None),
                                         getattr(m, "running_var", None)))
                                 for name, m in norm_layers(model, with_gamma=True)], stats_only)


def layer_mean(values: np.ndarray) -> float:
    """The mean of one layer's values; NaN (shown as -) for a layer of no channels, which numpy warns about."""
    return float(values.mean()) if values.size else float("nan")


def histograms(arrays: Sequence[np.ndarray], edges: np.ndarray) -> np.ndarray:
    return np.stack([np.histogram(a, bins=edges)[0] for a in arrays]).astype(np.int64) if arrays else np.zeros(
        (0, len(edges) - 1), dtype=np.int64
    )


@dataclass
class ProbeResult:
    label: str
    path: str
    attrs: dict[str, Any]  # source, model, freeze, dataset, normalisation, ...
    bn: BNStats
    sites: list[ReluSite]
    loss: float
    accuracy: float
    images: int
    extra: dict[str, Any] = field(default_factory=dict)
    forward_pass: bool = True  # False: probed from the file alone; accuracy, loss and ReLU sparsity absent

    def summary(self, taus: Sequence[float], off_threshold: float) -> dict[str, Any]:
        gamma = np.abs(np.concatenate(self.bn.gamma)) if self.bn.gamma else np.zeros(0)
        zeros = sum(s.zeros for s in self.sites)
        total = sum(s.total for s in self.sites)
        return {
            "bn_layers": len(self.bn.names),
            "bn_channels": int(gamma.size),
            "mean_abs_gamma": layer_mean(gamma),
            "median_abs_gamma": float(np.median(gamma)) if gamma.size else float("nan"),
            "frac_below": self.bn.frac_below_all(taus),
            "off": int(self.bn.off(off_threshold).sum()),
            "off_dead": int(self.bn.off_dead(off_threshold).sum()),
            "relu_sites": len(self.sites),
            "zero_fraction": zeros / total if total else float("nan"),
            "dead_channels": sum(s.dead for s in self.sites),
            "relu_channels": sum(s.channels for s in self.sites),
        }


