"""The rules of `bnprobe check`: what each measures on a checkpoint's normalisation layers, from their tensors
alone, and when that is worth a finding. Each rule has a stable code, a name, a default severity, thresholds
with defaults, its documentation (what, why, the source: docs/check-rules.md prints the same text), and a pure
function of the layers (NormStats) and what the probe said about the file (its attrs) to the places it fires.

numpy and the standard library only: the check must not wait for torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from bnprobe.analysis.probe_results import NormStats
from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import BATCHNORM, SCALE_ONLY
from bnprobe.core.options import OFF_THRESHOLD

SEVERITIES = ("error", "warning", "note")  # most severe first; SARIF's levels of the same names
FLOAT16_MAX = 65504.0  # the largest finite float16
MAX_DIMS = 64  # dimensions listed in one finding; `dims_total` counts them all


@dataclass(frozen=True)
class Param:
    default: float
    doc: str
    low: float = -math.inf  # the range a value must fall in (inclusive)
    high: float = math.inf
    integer: bool = False


@dataclass
class Hit:
    """Where a rule fires: a layer (its depth) or the whole model (None), the dimensions concerned, the measured
    value against the threshold, and one sentence."""

    layer: Optional[int]
    value: float
    threshold: float
    message: str
    dims: Sequence[int] = ()


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: str
    summary: str  # one line
    doc: str  # what it measures and why it matters
    sources: tuple[str, ...]
    params: Mapping[str, Param]
    check: Callable[["NormStats", Mapping[str, Any], Mapping[str, float]], list[Hit]] = field(repr=False)

    def defaults(self) -> dict[str, float]:
        return {name: p.default for name, p in self.params.items()}


# ---- what the rules share --------------------------------------------------------------------------------------


def _present(bn: "NormStats", layer: int) -> dict[str, np.ndarray]:
    """A layer's tensors that it really has (NormStats fills absent ones with NaN): γ always, β unless it is
    RMSNorm-like, running statistics for BatchNorm."""
    kind = bn.kinds[layer]
    tensors = {"γ": bn.gamma[layer]}
    if kind != SCALE_ONLY:
        tensors["β"] = bn.beta[layer]
    if kind == BATCHNORM:
        tensors["running_mean"], tensors["running_var"] = bn.running_mean[layer], bn.running_var[layer]
    return tensors


def _off(bn: "NormStats", threshold: float) -> list[np.ndarray]:
    return [np.abs(g) < threshold for g in bn.gamma]


def _median_abs(g: np.ndarray) -> float:
    finite = np.abs(g[np.isfinite(g)])
    return float(np.median(finite)) if finite.size else 0.0


def _layer_outliers(g: np.ndarray, factor: float) -> np.ndarray:
    """|γ| > factor x the median finite |γ| (none where that median is 0), as NormStats.outliers."""
    median = _median_abs(g)
    return np.flatnonzero(np.abs(g) > factor * median) if median > 0 else np.zeros(0, dtype=np.int64)


def _by_width(bn: "NormStats", marks: Sequence[np.ndarray],
              skip: Sequence[bool] = ()) -> dict[tuple[int, int], list[int]]:
    """(width, dimension) -> the layers where `marks` (a boolean per channel) holds, layers in `skip` left out."""
    found: dict[tuple[int, int], list[int]] = {}
    for layer, mark in enumerate(marks):
        if not (skip and skip[layer]):
            for dim in np.flatnonzero(mark):
                found.setdefault((mark.size, int(dim)), []).append(layer)
    return found


@lru_cache(maxsize=4096)  # a width's dimensions share (n, p); k takes few values
def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely k or more of n layers mark a dimension by chance alone."""
    if k <= 0:
        return 1.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def _dims_text(dims: Sequence[int], shown: int = 8) -> str:
    more = f" and {len(dims) - shown} more" if len(dims) > shown else ""
    return ", ".join(str(d) for d in dims[:shown]) + more


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---- the rules -------------------------------------------------------------------------------------------------


def _channels_off_layer(bn, attrs, p) -> list[Hit]:
    hits = []
    for layer, off in enumerate(_off(bn, p["off_threshold"])):
        fraction = float(off.mean()) if off.size else 0.0
        if fraction > p["max_fraction"] and not off.all():  # a layer wholly off is BNP103's
            hits.append(Hit(layer, fraction, p["max_fraction"],
                            f"{_pct(fraction)} of its {off.size} channels have |γ| < {p['off_threshold']:g} "
                            f"(limit {_pct(p['max_fraction'])}): their output is the constant β",
                            np.flatnonzero(off)))
    return hits


def _channels_off_model(bn, attrs, p) -> list[Hit]:
    off = _off(bn, p["off_threshold"])
    total = sum(o.size for o in off)
    fraction = sum(int(o.sum()) for o in off) / total if total else 0.0
    if fraction <= p["max_fraction"]:
        return []
    return [Hit(None, fraction, p["max_fraction"],
                f"{_pct(fraction)} of all {total:,} norm channels have |γ| < {p['off_threshold']:g} "
                f"(limit {_pct(p['max_fraction'])})")]


def _layer_off(bn, attrs, p) -> list[Hit]:
    return [Hit(layer, float(np.abs(g).max()), p["off_threshold"],
                f"every one of its {g.size} channels has |γ| < {p['off_threshold']:g} (largest |γ| "
                f"{np.abs(g).max():.3g}): the layer outputs its β whatever comes in")
            for layer, g in enumerate(bn.gamma) if g.size and (np.abs(g) < p["off_threshold"]).all()]


def _outliers_of(bn: "NormStats", factor: float) -> list[np.ndarray]:
    """Each layer's outlier dimensions; none in a layer whose median |γ| is itself off (below OFF_THRESHOLD), where
    every live channel would be one: that layer is BNP101's."""
    return [_layer_outliers(g, factor) if _median_abs(g) >= OFF_THRESHOLD else np.zeros(0, dtype=np.int64)
            for g in bn.gamma]


def _layer_outliers_rule(bn, attrs, p) -> list[Hit]:
    outliers = _outliers_of(bn, p["factor"])
    marks = [np.isin(np.arange(g.size), dims) for g, dims in zip(bn.gamma, outliers)]
    recurring = {key for key, layers in _by_width(bn, marks).items() if len(layers) >= 2}  # BNP202's
    hits = []
    for layer, (g, dims) in enumerate(zip(bn.gamma, outliers)):
        alone = [int(d) for d in dims if (g.size, int(d)) not in recurring]
        if alone:
            median = _median_abs(g)
            peak = max(alone, key=lambda d: abs(g[d]))
            hits.append(Hit(layer, float(abs(g[peak]) / median), p["factor"],
                            f"{len(alone)} dimension(s) with |γ| > {p['factor']:g}x the layer's median |γ| "
                            f"({median:.3g}): {_dims_text(alone)}; the largest, {peak}, at {abs(g[peak]):.3g}",
                            alone))
    return hits


def _recurring_outliers(bn, attrs, p) -> list[Hit]:
    marks = [np.isin(np.arange(g.size), dims) for g, dims in zip(bn.gamma, _outliers_of(bn, p["factor"]))]
    widths = bn.channels
    hits = []
    for (width, dim), layers in sorted(_by_width(bn, marks).items(), key=lambda item: (-len(item[1]), item[0])):
        if len(layers) >= p["min_layers"]:
            of = int(np.sum(widths == width))
            peak = max(layers, key=lambda layer: abs(bn.gamma[layer][dim]))
            hits.append(Hit(peak, float(len(layers)), p["min_layers"],
                            f"dimension {dim} is an outlier (|γ| > {p['factor']:g}x its layer's median) in "
                            f"{len(layers)} of the {of} layers of width {width}; largest |γ| "
                            f"{abs(bn.gamma[peak][dim]):.3g} here", [dim]))
    return hits


def _recurring_off(bn, attrs, p) -> list[Hit]:
    off = _off(bn, p["off_threshold"])
    whole = [o.size > 0 and bool(o.all()) for o in off]  # a layer wholly off marks every index: BNP103's
    widths = bn.channels
    rate: dict[int, float] = {}
    for width in set(widths.tolist()):
        counted = [o for o, w, skip in zip(off, widths, whole) if w == width and not skip]
        rate[width] = sum(int(o.sum()) for o in counted) / max(1, width * len(counted))
    hits = []
    for (width, dim), layers in sorted(_by_width(bn, off, whole).items(), key=lambda item: (-len(item[1]), item[0])):
        n = sum(1 for w, skip in zip(widths, whole) if w == width and not skip)
        chance = binomial_tail(len(layers), n, rate[width])
        if len(layers) >= p["min_layers"] and chance < p["alpha"] / width:
            hits.append(Hit(layers[0], float(len(layers)), p["min_layers"],
                            f"dimension {dim} has |γ| < {p['off_threshold']:g} in {len(layers)} of the {n} layers of "
                            f"width {width} (depths {_dims_text(layers)}); by chance at this width's off rate "
                            f"({_pct(rate[width])}): p = {chance:.2g}", [dim]))
    return hits


def _non_finite(bn, attrs, p) -> list[Hit]:
    hits = []
    for layer in range(len(bn.names)):
        bad = {name: ~np.isfinite(t) for name, t in _present(bn, layer).items()}
        where = [name for name, mask in bad.items() if mask.any()]
        if where:
            dims = np.flatnonzero(np.logical_or.reduce([bad[name] for name in where]))
            counts = ", ".join(f"{name} {int(bad[name].sum())}" for name in where)
            hits.append(Hit(layer, float(len(dims)), 0.0, f"non-finite values (inf or nan): {counts}", dims))
    return hits


def _negative_var(bn, attrs, p) -> list[Hit]:
    hits = []
    for layer in range(len(bn.names)):
        var = _present(bn, layer).get("running_var")
        if var is not None and (var < 0).any():
            dims = np.flatnonzero(var < 0)
            hits.append(Hit(layer, float(var.min()), 0.0,
                            f"{len(dims)} running variance(s) below 0 (smallest {var.min():.3g}): no data gives "
                            f"that; 1/sqrt(var + eps) is nan or huge", dims))
    return hits


def _tiny_var(bn, attrs, p) -> list[Hit]:
    hits = []
    for layer in range(len(bn.names)):
        var = _present(bn, layer).get("running_var")
        if var is None:
            continue
        tiny = (var >= 0) & (var < p["min_var"])
        if tiny.any():
            dims = np.flatnonzero(tiny)
            hits.append(Hit(layer, float(var[tiny].min()), p["min_var"],
                            f"{len(dims)} running variance(s) below {p['min_var']:g} (smallest "
                            f"{var[tiny].min():.3g}): eps, not the data, sets their scale; an input that moves "
                            f"there is multiplied by up to 1/sqrt(eps) (316 at eps 1e-5)", dims))
    return hits


def _stats_at_init(bn, attrs, p) -> list[Hit]:
    return [Hit(layer, 0.0, 0.0, f"running_mean is 0 and running_var 1 in every one of its {g.size} channels, "
                                 f"their initial values: the layer never saw data, and in eval mode it does not "
                                 f"normalise")
            for layer, g in enumerate(bn.gamma)
            if bn.kinds[layer] == BATCHNORM and g.size and (bn.running_mean[layer] == 0).all()
            and (bn.running_var[layer] == 1).all()]


def _affine_at_init(bn, attrs, p) -> list[Hit]:
    offset = float(attrs.get("scale_offset", 0.0))
    hits = []
    for layer, g in enumerate(bn.gamma):
        beta = _present(bn, layer).get("β")
        if g.size and (g == 1).all() and (beta is None or (beta == 0).all()):
            stored = f" (stored w = 0, read as 1 + w: {attrs.get('scale_convention', 'offset 1')})" if offset == 1 else ""
            hits.append(Hit(layer, 1.0, 1.0, f"γ is exactly 1{stored} and β exactly 0 in all {g.size} channels, "
                                             f"their initial values: the layer was never trained, or its weights "
                                             f"were never loaded"))
    return hits


def _scale_convention(bn, attrs, p) -> list[Hit]:
    scales = [g for g, kind in zip(bn.gamma, bn.kinds) if kind == SCALE_ONLY and g.size]
    if not scales:
        return []
    offset = float(attrs.get("scale_offset", 0.0))
    convention = attrs.get("scale_convention", "scale used as stored" if offset == 0 else "1 + w")
    stored = np.concatenate(scales) - offset  # what the file holds
    stored = stored[np.isfinite(stored)]
    if not stored.size:
        return []
    centre = float(np.median(stored))
    spread = float(np.subtract(*np.quantile(stored, [0.75, 0.25])))
    if spread >= p["max_spread"]:
        return []
    if offset == 0 and abs(centre) < p["centre_tolerance"]:
        what = ("stored RMSNorm scales centred at {c:.3g} (interquartile range {s:.3g}) read as the scale itself "
                "({conv}): the Gemma convention x * (1 + w) stores them so; read so, nearly every channel is near 0")
    elif offset == 1 and abs(centre - 1) < p["centre_tolerance"]:
        what = ("stored RMSNorm scales centred at {c:.3g} (interquartile range {s:.3g}) read with a 1 + w offset "
                "({conv}): already-shifted scales (as GGUF stores them) shifted twice, effective scales near 2")
    else:
        return []
    return [Hit(None, centre, p["centre_tolerance"], what.format(c=centre, s=spread, conv=convention))]


def _float16_range(bn, attrs, p) -> list[Hit]:
    hits = []
    for layer in range(len(bn.names)):
        big = {name: np.isfinite(t) & (np.abs(t) > p["limit"]) for name, t in _present(bn, layer).items()}
        where = [name for name, mask in big.items() if mask.any()]
        if where:
            dims = np.flatnonzero(np.logical_or.reduce([big[name] for name in where]))
            largest = max(float(np.abs(_present(bn, layer)[name][big[name]]).max()) for name in where)
            hits.append(Hit(layer, largest, p["limit"], f"values beyond float16's range ({', '.join(where)}; largest "
                                                        f"|x| {largest:.4g}): cast to half precision they are inf",
                            dims))
    return hits


_OFF = Param(OFF_THRESHOLD, "a channel is off when |γ| is below this (bnprobe probe's --off-threshold)", 0.0)
_FACTOR = Param(10.0, "an outlier has |γ| above this many times its layer's median |γ| (probe's --outlier-factor)",
                1.0)
_FRANKLE = "Frankle, Schwab & Morcos, Training BatchNorm and Only BatchNorm (ICLR 2021): BN-only networks switch channels off with γ near 0"
_SLIMMING = "Liu et al., Learning Efficient Convolutional Networks through Network Slimming (ICCV 2017): channels with small γ are removable"
_MASSIVE = "Sun et al., Massive Activations in Large Language Models (2024): a few fixed dimensions carry huge values in every layer"
_BERT = "Kovaleva et al., BERT Busters: Outlier Dimensions that Disrupt Transformers (Findings of ACL 2021): disabling the LayerNorm outlier dimensions breaks the model"
_IOFFE = "Ioffe & Szegedy, Batch Normalization (ICML 2015): inference normalises with the running mean and variance"

RULES: dict[str, Rule] = {rule.code: rule for rule in (
    Rule("BNP101", "layer-channels-off", "warning", "Too many channels of a layer are off (|γ| near 0)",
         "The fraction of a layer's channels whose |γ| is below the off threshold, above a limit. Such a channel "
         "outputs its β whatever the input: the layer passes on that much less. BN-only training and L1 on γ do "
         "this on purpose; elsewhere it is capacity lost, or a sign of a bad load or a collapsed fine-tune.",
         (_FRANKLE, _SLIMMING), {"off_threshold": _OFF, "max_fraction": Param(0.5, "the largest fraction allowed", 0, 1)},
         _channels_off_layer),
    Rule("BNP102", "model-channels-off", "warning", "Too many norm channels are off over the whole model",
         "The same fraction over every channel of every normalisation layer together.",
         (_FRANKLE, _SLIMMING), {"off_threshold": _OFF, "max_fraction": Param(0.25, "the largest fraction allowed", 0, 1)},
         _channels_off_model),
    Rule("BNP103", "layer-off", "warning", "Every channel of a layer is off",
         "A layer whose every |γ| is below the off threshold outputs a constant: nothing flows through it. On a "
         "residual branch that is the branch removed (zero-initialised residual γ start so, and trained ones "
         "move away); on the main path, the network is cut.",
         ("Goyal et al., Accurate, Large Minibatch SGD (2017): the last BN γ of each residual block initialised to 0",
          _SLIMMING), {"off_threshold": _OFF}, _layer_off),
    Rule("BNP201", "layer-outliers", "note", "Outlier dimensions in one layer",
         "Dimensions whose |γ| is above a factor times the layer's median |γ|, found in this layer only (those in "
         "several layers of one width are BNP202's; a layer whose median |γ| is below bnprobe's off threshold, "
         "0.01, has none: it is BNP101's). They dominate the layer's output and quantise badly.",
         (_BERT, "Dettmers et al., LLM.int8() (NeurIPS 2022): outlier features break 8-bit quantisation"),
         {"factor": _FACTOR}, _layer_outliers_rule),
    Rule("BNP202", "recurring-outlier-dim", "warning", "A dimension is an outlier in many layers",
         "A dimension that is an outlier (as BNP201 counts them) in at least min_layers layers of one width: the "
         "static signature of "
         "massive activations and of BERT's outlier dimensions, whose removal breaks the model. Expected in many "
         "pretrained transformers; a fine-tune or a quantiser should keep them.",
         (_MASSIVE, _BERT), {"factor": _FACTOR, "min_layers": Param(2, "in at least this many layers", 2, integer=True)},
         _recurring_outliers),
    Rule("BNP203", "recurring-off-dim", "warning", "A dimension is off in many layers",
         "A dimension whose |γ| is below the off threshold in at least min_layers layers of one width, more often "
         "than the width's off rate explains (binomial tail below alpha / width). In a residual stream that is one "
         "hidden dimension switched off layer after layer: dead capacity, or a dimension a pruning or a merge "
         "zeroed.", (_FRANKLE, _MASSIVE),
         {"off_threshold": _OFF, "min_layers": Param(2, "in at least this many layers", 2, integer=True),
          "alpha": Param(0.01, "chance level: the binomial tail must be below alpha / width", 0, 1)},
         _recurring_off),
    Rule("BNP301", "non-finite", "error", "Non-finite γ, β or running statistics",
         "inf or nan in a norm layer's γ, β, running mean or running variance: every output through that channel "
         "is then non-finite.", (_IOFFE,), {}, _non_finite),
    Rule("BNP302", "negative-running-var", "error", "Negative running variance",
         "A BatchNorm running variance below 0, which no data can produce: 1/sqrt(var + eps) is nan or huge. A "
         "corrupted or hand-edited file.", (_IOFFE,), {}, _negative_var),
    Rule("BNP303", "tiny-running-var", "warning", "Running variance zero or tiny",
         "A BatchNorm running variance below min_var (default PyTorch's eps): the channel was (nearly) constant "
         "on the training data, and at inference any change of its input is multiplied by up to "
         "|γ|/sqrt(eps).", (_IOFFE, "PyTorch BatchNorm2d: y = (x - E[x]) / sqrt(Var[x] + eps) * γ + β, eps 1e-5"),
         {"min_var": Param(1e-5, "a running variance below this is tiny", 0)}, _tiny_var),
    Rule("BNP304", "float16-range", "warning", "Values beyond float16's range",
         "|γ|, |β| or a running statistic above float16's largest finite value: cast to half precision, as many "
         "deployments do, the channel becomes inf.", (_MASSIVE, "IEEE 754 binary16: largest finite 65504"),
         {"limit": Param(FLOAT16_MAX, "the largest value allowed", 0)}, _float16_range),
    Rule("BNP401", "bn-stats-at-init", "error", "BatchNorm statistics still at their initial values",
         "running_mean 0 and running_var 1 in every channel of a BatchNorm layer: it never saw a batch in training "
         "mode, so in eval mode it does not normalise (a model saved before training, or trained with frozen BN "
         "statistics it was never given).", (_IOFFE,), {}, _stats_at_init),
    Rule("BNP402", "affine-at-init", "warning", "γ and β exactly at their initial values",
         "γ exactly 1 and β exactly 0 (or absent) in every channel of a layer: its affine parameters never "
         "changed. In a trained model that is a load that silently failed or a fine-tune that never touched the "
         "norms; a freshly built model has it legitimately, hence a warning, not an error.",
         ("PyTorch and Hugging Face initialise norm scales to 1 and shifts to 0",), {}, _affine_at_init),
    Rule("BNP501", "scale-convention", "warning", "Scale convention does not fit the stored scales",
         "The RMSNorm-like scales as stored, pooled: centred within centre_tolerance of 0 with a small spread "
         "while they are read as the scale itself (a Gemma-style x * (1 + w) model read without its offset), or "
         "centred near 1 while a 1 + w offset is applied (already-shifted scales, as GGUF stores them, shifted "
         "again). Uses the convention the probe applied (its scale_offset).",
         ("Gemma (Google, 2024): RMSNorm computes x * (1 + w); llama.cpp's GGUF conversion stores 1 + w",),
         {"centre_tolerance": Param(0.1, "how close the median stored scale must be to 0 (or 1)", 0),
          "max_spread": Param(0.1, "the stored scales' interquartile range must be below this", 0)},
         _scale_convention),
)}


def check_param(code: str, name: str, value: Any) -> float:
    """A threshold of rule `code`, as a user gave it: a finite number in the rule's range."""
    rule = RULES[code]
    if name not in rule.params:
        known = ", ".join(rule.params) or "none"
        raise BnprobeError(f"{code} ({rule.name}) has no threshold {name!r} (its thresholds: {known})")
    spec = rule.params[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BnprobeError(f"{code}.{name} must be a finite number, got {value!r}")
    if not spec.low <= value <= spec.high or (spec.integer and value != int(value)):
        bounds = f"between {spec.low:g} and {spec.high:g}" if math.isfinite(spec.high) else f">= {spec.low:g}"
        raise BnprobeError(f"{code}.{name} must be {'a whole number ' if spec.integer else ''}{bounds}, got {value:g}")
    return float(value)
