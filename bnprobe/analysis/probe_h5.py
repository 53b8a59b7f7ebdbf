"""probe.h5 (schema: docs/probe-schema.md), written to a temporary file and renamed into place."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.analysis.probe_results import (QUANTILE_LEVELS, NormStats, ProbeResult, Recurring, RecurringOff, ReluSite,
                                       histograms, layer_mean)
from bnprobe.core.formats import PROBE_FORMAT, PROBE_VERSION
from bnprobe.core.measures import histogram_edges
from bnprobe.files.store import atomic_h5, set_attrs, write_array

# What only a forward pass measures: absent from a static probe's group, not a made-up 0.
FORWARD_ATTRS = ("accuracy", "loss", "images", "relu_sites", "relu_channels", "zero_fraction", "dead_channels")


def _strings(items: Any) -> np.ndarray:
    import h5py

    return np.array(list(items), dtype=h5py.string_dtype())


def write_probe_h5(
    path: Path, results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float, bins: int,
    attrs: Optional[dict[str, Any]] = None, outlier_factor: float = 10.0,
) -> None:
    """probe.h5 (schema: docs/probe-schema.md), written to a temporary file and renamed into place."""
    taus = np.asarray(taus, dtype=np.float64)
    gamma_edges = histogram_edges([g for r in results for g in r.bn.gamma], bins)
    beta_edges = histogram_edges([b for r in results for b in r.bn.beta], bins)
    with atomic_h5(path) as f:
        set_attrs(f, {"format": PROBE_FORMAT, "version": PROBE_VERSION, "checkpoints": len(results),
                      "off_threshold": off_threshold, "bins": bins, "outlier_factor": outlier_factor,
                      **(attrs or {})})
        write_array(f, "taus", taus, description="thresholds τ of the frac_below columns")
        write_array(f, "quantile_levels", np.array(QUANTILE_LEVELS), description="of every abs_gamma_quantiles")
        write_array(f, "gamma_edges", gamma_edges, description="bin edges of every gamma_hist")
        write_array(f, "beta_edges", beta_edges, description="bin edges of every beta_hist")
        write_array(f, "labels", _strings(r.label for r in results))
        group = f.create_group("checkpoints")
        for index, result in enumerate(results):
            g = group.create_group(f"{index:03d}")
            summary = result.summary(taus, off_threshold)
            outliers = result.bn.outliers(outlier_factor)
            recurring = result.bn.recurring(outliers)
            recurring_off = result.bn.recurring_off(off_threshold)
            attrs = {"label": result.label, "path": result.path, "forward_pass": result.forward_pass,
                     "accuracy": result.accuracy, "loss": result.loss, "images": result.images,
                     "layer_order": "module", "bn_stats_only_layers": len(result.bn.stats_only),
                     "outliers": sum(len(dims) for dims in outliers), "recurring_dims": len(recurring.dim),
                     "recurring_off_dims": len(recurring_off.dim),
                     **{k: v for k, v in summary.items() if k != "frac_below"}, **result.attrs}
            # What was not measured is absent, not a made-up 0 (forward_pass = False says why).
            set_attrs(g, {k: v for k, v in attrs.items() if result.forward_pass or k not in FORWARD_ATTRS})
            write_array(g, "frac_below_all", summary["frac_below"], description="(T,) whole network")
            _write_norms(g.create_group("bn"), result.bn, taus, off_threshold, outliers, gamma_edges, beta_edges)
            _write_recurring(g, recurring, recurring_off)
            if result.forward_pass:  # no forward pass: no relu/ group (forward_pass = False says why)
                _write_relu(g.create_group("relu"), result.sites)


def _write_norms(bn: Any, stats: NormStats, taus: np.ndarray, off_threshold: float, outliers: list[np.ndarray],
                 gamma_edges: np.ndarray, beta_edges: np.ndarray) -> None:
    """A checkpoint's bn/ group: per norm layer (depth order), its channels' γ, β, statistics and what they show."""
    write_array(bn, "names", _strings(stats.names))
    write_array(bn, "depth", np.arange(len(stats.names), dtype=np.int64))
    write_array(bn, "channels", stats.channels)
    write_array(bn, "offsets", np.concatenate([[0], np.cumsum(stats.channels)]).astype(np.int64),
                description="layer l's channels are [offsets[l], offsets[l+1]) of gamma, beta, ...")
    for name in ("gamma", "beta", "running_mean", "running_var"):
        arrays = getattr(stats, name)
        write_array(bn, name, np.concatenate(arrays) if arrays else np.zeros(0))
    write_array(bn, "frac_below", stats.frac_below(taus), description="(L, T): fraction |γ| < τ")
    write_array(bn, "off", stats.off(off_threshold), description="channels with |γ| < off_threshold")
    write_array(bn, "off_dead", stats.off_dead(off_threshold), description="of those, β <= 0")
    write_array(bn, "mean_abs_gamma", np.array([layer_mean(np.abs(x)) for x in stats.gamma]))
    write_array(bn, "gamma_hist", histograms(stats.gamma, gamma_edges), description="(L, bins)")
    write_array(bn, "beta_hist", histograms(stats.beta, beta_edges), description="(L, bins)")
    write_array(bn, "stats_only_names", _strings(name for name, _ in stats.stats_only),
                description="BN layers without affine (running statistics only, no γ/β)")
    write_array(bn, "stats_only_channels", np.array([c for _, c in stats.stats_only], dtype=np.int64))
    write_array(bn, "kind", _strings(stats.kinds), description="BatchNorm, LayerNorm/GroupNorm-like or "
                "RMSNorm-like")
    write_array(bn, "abs_gamma_quantiles", stats.abs_quantiles(), description="(L, Q) at /quantile_levels")
    write_array(bn, "outlier_offsets", np.cumsum([0] + [len(dims) for dims in outliers]).astype(np.int64),
                description="layer l's outlier dimensions are outlier_dims[outlier_offsets[l]:...[l+1]]")
    write_array(bn, "outlier_dims", np.concatenate([np.zeros(0, np.int64), *outliers]).astype(np.int64),
                description="|γ| > outlier_factor x the layer's median |γ|")


def _write_recurring(g: Any, recurring: Recurring, recurring_off: RecurringOff) -> None:
    """recurring/ and recurring_off/: the dimensions that are outliers, or off, in several layers of one width."""
    again = g.create_group("recurring")  # beside bn/, which readers take for per-layer datasets alone
    for name in ("width", "dim", "layers", "of_layers", "max_abs_gamma", "at"):
        write_array(again, name, getattr(recurring, name))
    off_again = g.create_group("recurring_off")
    for name in ("width", "dim", "layers", "of_layers"):
        write_array(off_again, name, getattr(recurring_off, name))
    write_array(off_again, "where_offsets", np.cumsum([0, *recurring_off.layers]).astype(np.int64),
                description="row r's layers (depths) are where[where_offsets[r]:where_offsets[r+1]]")
    write_array(off_again, "where", np.concatenate([np.zeros(0, np.int64), *recurring_off.where]),
                description="depths of the layers where each row's dimension is off")


def _write_relu(relu: Any, sites: Sequence[ReluSite]) -> None:
    """relu/: per ReLU call site, its output's zeros and dead channels (a forward pass's only)."""
    write_array(relu, "sites", _strings(s.name for s in sites))
    write_array(relu, "module", _strings(s.module for s in sites))
    write_array(relu, "call", np.array([s.call for s in sites], dtype=np.int64))
    write_array(relu, "input", _strings(s.input for s in sites))
    write_array(relu, "channels", np.array([s.channels for s in sites], dtype=np.int64))
    write_array(relu, "zeros", np.array([s.zeros for s in sites], dtype=np.int64))
    write_array(relu, "total", np.array([s.total for s in sites], dtype=np.int64))
    write_array(relu, "zero_fraction", np.array([s.zero_fraction for s in sites], dtype=np.float64))
    write_array(relu, "dead_channels", np.array([s.dead for s in sites], dtype=np.int64))
