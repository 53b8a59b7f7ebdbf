"""What bnprobe measures on BatchNorm γ, defined once for the probe, the report and its figures (numpy
only: the report never imports torch)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def fraction_below(gammas: Sequence[np.ndarray], taus: Sequence[float], per_layer: bool = True) -> np.ndarray:
    """The fraction of BN channels with |γ| < τ, for each τ: (L, T), one row per layer of `gammas`, or (T,)
    over the channels of all layers together (`per_layer=False`). No channels: 0."""
    layers = list(gammas) if per_layer else [np.concatenate([np.ravel(g) for g in gammas]) if len(gammas) else np.zeros(0)]
    table = np.array([[np.mean(np.abs(g) < t) if g.size else 0.0 for t in taus] for g in layers], dtype=np.float64)
    table = table.reshape(len(layers), len(taus))
    return table if per_layer else table[0]
