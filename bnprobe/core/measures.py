"""What bnprobe measures on BatchNorm γ, defined once for the probe, the report and its figures (numpy
only: the report never imports torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


def fraction_below(gammas: Sequence[np.ndarray], taus: Sequence[float], per_layer: bool = True) -> np.ndarray:
    """The fraction of BN channels with |γ| < τ, for each τ: (L, T), one row per layer of `gammas`, or (T,)
    over the channels of all layers together (`per_layer=False`). No channels: 0."""
    layers = list(gammas) if per_layer else [np.concatenate([np.ravel(g) for g in gammas]) if len(gammas) else np.zeros(0)]
    table = np.array([[np.mean(np.abs(g) < t) if g.size else 0.0 for t in taus] for g in layers], dtype=np.float64)
    table = table.reshape(len(layers), len(taus))
    return table if per_layer else table[0]


def histogram_edges(arrays: Sequence[np.ndarray], bins: int) -> np.ndarray:
    """`bins` + 1 edges shared by every array (layers, checkpoints, γ at init and after training), so histograms
    compare bin by bin; over the finite values only (an inf γ would make every edge inf or nan; it falls outside)."""
    values = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64) if len(arrays) else np.zeros(0)
    values = values[np.isfinite(values)]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


HISTOGRAM_BINS = 40


@dataclass
class GammaDigest:
    """What a run's page shows of its BN γ, small enough to keep for hundreds of runs and to send to the process
    that draws the page (a deep net's γ arrays are megabytes): the histogram of every channel at initialisation
    and after the last epoch (shared bins), and the fraction |γ| < τ of each layer."""

    layers: list[str]
    final_epoch: int  # the epoch after which `final` was taken
    edges: np.ndarray  # HISTOGRAM_BINS + 1 bin edges over initial and final γ together
    final_counts: np.ndarray
    init_counts: Optional[np.ndarray]  # None: no γ at initialisation (only the checkpoint had γ)
    final_summary: str  # channels, median and range, shown on hover
    init_summary: str
    taus: tuple[float, ...]
    below: np.ndarray  # (L, T): fraction of each layer's channels with |γ| < τ


def gamma_digest(final: Sequence[np.ndarray], init: Sequence[np.ndarray], layers: Sequence[str], final_epoch: int,
                 taus: Sequence[float]) -> Optional[GammaDigest]:
    """The digest of γ per layer after epoch `final_epoch` (`final`) and at initialisation (`init`, may be
    empty); None when there is no γ at all."""
    if not len(final):
        return None
    every = np.concatenate([np.ravel(g) for g in final]).astype(np.float64)
    start = np.concatenate([np.ravel(g) for g in init]).astype(np.float64) if len(init) else None
    both = every if start is None else np.concatenate([every, start])
    if not both.size:
        return None
    edges = histogram_edges([both], HISTOGRAM_BINS)
    names = list(layers) if len(layers) == len(final) else [f"layer {k}" for k in range(len(final))]
    return GammaDigest(
        layers=names, final_epoch=int(final_epoch), edges=edges, final_counts=np.histogram(every, edges)[0],
        init_counts=None if start is None else np.histogram(start, edges)[0],
        final_summary=_summary(f"γ after epoch {final_epoch}", every),
        init_summary="" if start is None else _summary("γ at initialisation", start),
        taus=tuple(float(t) for t in taus), below=fraction_below(final, taus),
    )


def _summary(what: str, gamma: np.ndarray) -> str:
    if not gamma.size:
        return f"{what}: no channels"
    return (f"{what}: {gamma.size:,} channels, median {np.median(gamma):.3g}, "
            f"range {gamma.min():.3g} … {gamma.max():.3g}")


MAX_CURVE_POINTS = 150  # step curves are window means: 60k steps would make a multi-megabyte SVG


def window_means(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Mean of x and y over equal windows, so a curve has at most `max_points` points."""
    n = len(x)
    if n <= max_points:
        return x.astype(np.float64), y.astype(np.float64)
    size = math.ceil(n / max_points)
    starts = np.arange(0, n, size)
    counts = np.diff(np.append(starts, n))
    means = [np.add.reduceat(values.astype(np.float64), starts) / counts for values in (x, y)]
    return means[0], means[1]
