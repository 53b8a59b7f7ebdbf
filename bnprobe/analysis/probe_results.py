"""What a probe measures of one checkpoint, whatever produced it: the γ/β of every normalisation layer with their
running statistics where they have them (NormStats, from the model's modules or from the file's tensors alone),
the ReLU sites of a forward pass, and the ProbeResult that holds both with its summary. numpy alone: the static
probe never imports torch (the modules' side is bnprobe.analysis.forward_probe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.core.formats import BATCHNORM, SCALE_ONLY
from bnprobe.core.measures import fraction_below

# What a layer is (PROBE_NORM_KINDS), as far as its tensors tell: BatchNorm keeps running statistics; a scale and a
# shift per channel with none is LayerNorm or GroupNorm (their tensors are alike, and so are their names: neither
# can tell them apart), a scale alone is RMSNorm (or a LayerNorm without bias, which the tensors cannot tell).
# The |γ| distribution of a layer, as quantiles: its extremes, the bulk, and the tails that outliers sit in.
QUANTILE_LEVELS = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)
# A dimension "recurs" when it is an outlier in at least this many layers of one width: in one layer alone it is
# that layer's outlier, already in its list.
RECURRING_MIN_LAYERS = 2


@dataclass
class ReluSite:
    name: str  # "layer1.0.relu#2", or the module name when it runs once per forward
    module: str
    call: int  # 1-based invocation within one forward pass
    input: str  # what feeds it, from torch.fx ("layer1.0.bn1", "add(layer1.0.bn2, layer1.0.downsample.1)"), or ""
    channels: int
    zeros: int  # zero outputs over every probed image, channel and position
    total: int
    dead: int  # channels that were zero for every probed image at every position

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.total if self.total else float("nan")


@dataclass
class Recurring:
    """Dimensions that are outliers in several layers of one width, most layers first (ties: the larger |γ|)."""

    width: np.ndarray  # (R,) the layers' width
    dim: np.ndarray  # (R,) the dimension's index in those layers
    layers: np.ndarray  # (R,) layers of that width where it is an outlier
    of_layers: np.ndarray  # (R,) layers of that width
    max_abs_gamma: np.ndarray  # (R,) its largest |γ| over those layers
    at: np.ndarray  # (R,) the layer (depth) of that largest |γ|


@dataclass
class RecurringOff:
    """Dimensions off (|γ| below the off threshold) in several layers of one width, most layers first (ties: the
    smaller width, then the smaller index): where the same hidden dimension is switched off layer after layer."""

    width: np.ndarray  # (R,) the layers' width
    dim: np.ndarray  # (R,) the dimension's index in those layers
    layers: np.ndarray  # (R,) layers of that width where it is off
    of_layers: np.ndarray  # (R,) layers of that width
    where: list[np.ndarray]  # per row, the depths of those layers, ascending


@dataclass
class NormStats:
    """Every normalisation layer with a γ, in depth order: γ, and β and the running statistics where the layer
    has them (NaN where it has none: an RMSNorm-like layer has no β, only BatchNorm keeps running statistics)."""

    names: list[str]
    gamma: list[np.ndarray]  # per layer, float64
    beta: list[np.ndarray]
    running_mean: list[np.ndarray]
    running_var: list[np.ndarray]
    stats_only: list[tuple[str, int]] = field(default_factory=list)  # layers without affine: (name, channels)
    kinds: list[str] = field(default_factory=list)  # PROBE_NORM_KINDS, per layer (default: all BatchNorm)
    # Measures asked for again (the tables and probe.h5 each want the outliers): key -> (the γ arrays they were
    # computed from, the value). γ arrays are values here, replaced and never written in place, so the same
    # arrays mean the same numbers.
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.kinds = list(self.kinds) or [BATCHNORM] * len(self.names)

    def _remembered(self, key: Any, compute: Any) -> Any:
        held = self._memo.get(key)
        if held is None or len(held[0]) != len(self.gamma) or any(a is not b for a, b in zip(held[0], self.gamma)):
            held = self._memo[key] = (tuple(self.gamma), compute())
        return held[1]

    @classmethod
    def from_tensors(cls, layers: Sequence[tuple[str, Sequence[Optional[np.ndarray]]]],
                     stats_only: Sequence[tuple[str, int]] = (), kinds: Sequence[str] = ()) -> "NormStats":
        """layers: (name, (weight, bias, running_mean, running_var)) in depth order, numpy arrays of any floating
        dtype (bf16 read as float32), copied to float64; an absent one (None) is NaN."""
        def get(t: Optional[np.ndarray], size: int) -> np.ndarray:
            if t is None:  # a read-only view of one NaN: an RMSNorm's absent β and statistics take no memory
                return np.broadcast_to(np.float64(np.nan), (size,))
            return np.array(t, dtype=np.float64).ravel()

        columns: list[list[np.ndarray]] = [[], [], [], []]
        for _, (weight, *others) in layers:
            columns[0].append(get(weight, 0))
            for column, tensor in zip(columns[1:], others):
                column.append(get(tensor, columns[0][-1].size))
        return cls([name for name, _ in layers], *columns, stats_only=list(stats_only), kinds=list(kinds))

    @property
    def channels(self) -> np.ndarray:
        return np.array([g.size for g in self.gamma], dtype=np.int64)

    @property
    def only_batchnorm(self) -> bool:
        return all(kind == BATCHNORM for kind in self.kinds)

    def take(self, layers: Sequence[int]) -> "NormStats":
        """These layers, in this order (the statistics-only ones kept)."""
        pick = lambda column: [column[i] for i in layers]  # noqa: E731
        return NormStats(pick(self.names), pick(self.gamma), pick(self.beta), pick(self.running_mean),
                         pick(self.running_var), self.stats_only, pick(self.kinds))

    def of_kinds(self, kinds: Sequence[str]) -> "NormStats":
        """The layers of these kinds."""
        return self.take([i for i, kind in enumerate(self.kinds) if kind in kinds])

    def frac_below(self, taus: Sequence[float]) -> np.ndarray:
        """(L, T): fraction of each layer's channels with |γ| < τ."""
        return fraction_below(self.gamma, taus)

    def frac_below_all(self, taus: Sequence[float]) -> np.ndarray:
        """(T,): the same over every channel of the network."""
        return fraction_below(self.gamma, taus, per_layer=False)

    def off(self, threshold: float) -> np.ndarray:
        """Channels turned off per layer: |γ| < threshold, so the layer's output is (almost) the constant β."""
        return np.array([int(np.sum(np.abs(g) < threshold)) for g in self.gamma], dtype=np.int64)

    def off_dead(self, threshold: float) -> np.ndarray:
        """Of those, channels with β <= 0: a ReLU right after outputs (almost) 0 for every input."""
        return np.array(
            [int(np.sum((np.abs(g) < threshold) & (b <= 0))) for g, b in zip(self.gamma, self.beta)], dtype=np.int64
        )

    def abs_quantiles(self) -> np.ndarray:
        """(L, Q): quantiles QUANTILE_LEVELS of each layer's finite |γ| (NaN for a layer with none)."""
        return self._remembered("abs_quantiles", self._abs_quantiles)

    def _abs_quantiles(self) -> np.ndarray:
        rows = [np.quantile(a, QUANTILE_LEVELS) if a.size else np.full(len(QUANTILE_LEVELS), np.nan)
                for a in (np.abs(g[np.isfinite(g)]) for g in self.gamma)]
        return np.array(rows, dtype=np.float64).reshape(len(self.gamma), len(QUANTILE_LEVELS))

    def outliers(self, factor: float) -> list[np.ndarray]:
        """Per layer, the dimensions with |γ| > factor x the layer's median |γ| (over its finite values), in
        index order. A layer whose median is 0 has none: every non-zero γ would be one."""
        return self._remembered(("outliers", factor), lambda: self._outliers(factor))

    def _outliers(self, factor: float) -> list[np.ndarray]:
        found = []
        for g in self.gamma:
            finite = np.abs(g[np.isfinite(g)])
            median = float(np.median(finite)) if finite.size else 0.0
            found.append(np.flatnonzero(np.abs(g) > factor * median) if median > 0 else np.zeros(0, dtype=np.int64))
        return found

    def recurring(self, outliers: Sequence[np.ndarray]) -> Recurring:
        """Dimensions that are outliers (`outliers`: per layer, as NormStats.outliers gives them) in at least
        RECURRING_MIN_LAYERS layers of one width: an index means the same hidden dimension only where layers
        share a width (a transformer's residual stream)."""
        widths = self.channels
        found: dict[tuple[int, int], list[int]] = {}
        for layer, dims in enumerate(outliers):
            for dim in dims:
                found.setdefault((int(widths[layer]), int(dim)), []).append(layer)
        rows = []
        for (width, dim), layers in found.items():
            if len(layers) >= RECURRING_MIN_LAYERS:
                peak = max(layers, key=lambda layer: abs(self.gamma[layer][dim]))
                rows.append((width, dim, len(layers), int(np.sum(widths == width)),
                             float(abs(self.gamma[peak][dim])), peak))
        rows.sort(key=lambda row: (-row[2], -row[4], row[0], row[1]))
        columns = list(zip(*rows)) or [()] * 6
        ints = lambda column: np.array(column, dtype=np.int64)  # noqa: E731
        return Recurring(ints(columns[0]), ints(columns[1]), ints(columns[2]), ints(columns[3]),
                         np.array(columns[4], dtype=np.float64), ints(columns[5]))

    def recurring_off(self, threshold: float) -> RecurringOff:
        """Dimensions off (|γ| < threshold) in at least RECURRING_MIN_LAYERS layers of one width (an index is one
        hidden dimension only where layers share a width)."""
        widths = self.channels
        found: dict[tuple[int, int], list[int]] = {}
        for layer, g in enumerate(self.gamma):
            for dim in np.flatnonzero(np.abs(g) < threshold):
                found.setdefault((int(widths[layer]), int(dim)), []).append(layer)
        rows = sorted(((width, dim, layers) for (width, dim), layers in found.items()
                       if len(layers) >= RECURRING_MIN_LAYERS), key=lambda row: (-len(row[2]), row[0], row[1]))
        ints = lambda values: np.array(list(values), dtype=np.int64)  # noqa: E731
        return RecurringOff(ints(r[0] for r in rows), ints(r[1] for r in rows), ints(len(r[2]) for r in rows),
                            ints(int(np.sum(widths == r[0])) for r in rows), [ints(r[2]) for r in rows])

    def non_finite(self) -> int:
        """γ and β values that are inf or nan (left out of the histograms); an RMSNorm-like layer's β, NaN as it has
        none, is not counted."""
        betas = [b for b, kind in zip(self.beta, self.kinds) if kind != SCALE_ONLY]
        return sum(int(np.count_nonzero(~np.isfinite(x))) for x in (*self.gamma, *betas))


BNStats = NormStats  # its name before it held every normalisation layer


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
    bn: NormStats  # every normalisation layer (the name is from when they were all BatchNorm)
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


@dataclass
class ProbeRun:
    """What `bnprobe probe` measured, before anything is written or printed: every checkpoint's result (labels made
    unique), the device of the forward passes (None: every checkpoint was read from its file alone), the images
    each forward pass was asked for, and the notes the measuring found (checkpoint label as probed, message)."""

    results: list[ProbeResult]
    device: Optional[str] = None
    images: int = 0
    notes: list[tuple[str, str]] = field(default_factory=list)
