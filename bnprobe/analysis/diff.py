"""`bnprobe diff A B`, the computing part: what changed in the normalisation layers between two checkpoints of
one architecture (before and after fine-tuning, BN-only against full, two seeds), read from the files alone.
Layers are matched by name (prefixes such as `module.` and Lightning's `model.` stripped, as the static probe
strips them); per layer: the relative change of γ and β, the largest |Δ| and where, the correlation of γ before
and after, the channels that turned off or on, the outlier dimensions that appeared or vanished. Presenting it
is bnprobe.reporting.diff_output's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bnprobe.analysis.check import check_output_path, read_norms
from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import BATCHNORM, SCALE_ONLY
from bnprobe.core.options import OFF_THRESHOLD

CHANGED_MOST = 10  # layers listed as those that changed most
NAMES_SHOWN = 3  # names a mismatch line quotes of each side


@dataclass
class Side:
    path: str  # as given
    file: str  # the file read
    label: str
    file_format: str


@dataclass
class LayerDiff:
    name: str
    kind: str
    channels: int
    rel_gamma: float  # ‖γ_B − γ_A‖ / ‖γ_A‖
    rel_beta: float  # the same for β; NaN where the layer has none
    delta_gamma: float  # ‖γ_B − γ_A‖ (what rel_gamma divides: β starts at 0, where only this says it moved)
    delta_beta: float
    rel_running_mean: float  # BatchNorm's statistics; NaN elsewhere
    rel_running_var: float
    max_abs_delta: float  # the largest |Δ| over γ and β (NaN: none finite)
    max_at_param: Optional[str]  # "gamma" or "beta"
    max_at_dim: Optional[int]
    gamma_corr: float  # Pearson's r of γ_A and γ_B; NaN when either is constant
    turned_off: list[int]  # |γ| below the off threshold in B, not in A
    turned_on: list[int]  # the reverse
    outliers_appeared: list[int]  # outlier dimensions of B that A did not have
    outliers_vanished: list[int]


@dataclass
class DiffResult:
    a: Side
    b: Side
    layers: list[LayerDiff]
    off_threshold: float
    outlier_factor: float

    def changed_most(self, n: int = CHANGED_MOST) -> list[LayerDiff]:
        """The layers whose γ changed most (relative change, largest first; NaN last)."""
        def rank(d: LayerDiff) -> tuple[int, float]:
            r = d.rel_gamma
            return (0, 0.0) if r == np.inf else (1, -r) if r == r else (2, 0.0)

        return [d for d in sorted(self.layers, key=rank)[:n] if d.rel_gamma != 0]


def relative_change(a: np.ndarray, b: np.ndarray) -> float:
    """‖b − a‖ / ‖a‖ (0 when both are equal, inf when only a is 0)."""
    delta = float(np.linalg.norm(b - a))
    ref = float(np.linalg.norm(a))
    if delta == 0:
        return 0.0
    return delta / ref if ref > 0 else float("inf")


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; NaN when either is constant, has fewer than 2 values or a non-finite one."""
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()) or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _outliers(g: np.ndarray, factor: float) -> set[int]:
    finite = np.abs(g[np.isfinite(g)])
    median = float(np.median(finite)) if finite.size else 0.0
    return set(np.flatnonzero(np.abs(g) > factor * median).tolist()) if median > 0 else set()


def _names(names: list[str]) -> str:
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return ", ".join(names[:NAMES_SHOWN]) + more


def check_same_layers(a: Any, b: Any, label_a: str, label_b: str) -> None:
    """One line naming the first differences when A and B do not hold the same norm layers (names, widths,
    kinds)."""
    in_b = set(b.names)
    only_a = [n for n in a.names if n not in in_b]
    only_b = [n for n in b.names if n not in set(a.names)]
    if only_a or only_b:
        parts = [f"only in {label}: {_names(names)}" for label, names in ((label_a, only_a), (label_b, only_b))
                 if names]
        raise BnprobeError(f"{label_a} and {label_b} are not one architecture ({len(a.names)} and {len(b.names)} norm "
                           f"layers; {'; '.join(parts)})")
    index_b = {name: k for k, name in enumerate(b.names)}
    for k, name in enumerate(a.names):
        other = index_b[name]
        if a.gamma[k].size != b.gamma[other].size or a.kinds[k] != b.kinds[other]:
            raise BnprobeError(f"{label_a} and {label_b} are not one architecture: {name} is {a.kinds[k]} of "
                               f"{a.gamma[k].size} channels in {label_a}, {b.kinds[other]} of "
                               f"{b.gamma[other].size} in {label_b}")


def diff_stats(a: Any, b: Any, off_threshold: float = OFF_THRESHOLD, outlier_factor: float = 10.0) -> list[LayerDiff]:
    """Per layer of A (in its depth order), what changed in B; the layers must match (check_same_layers)."""
    index_b = {name: k for k, name in enumerate(b.names)}
    found = []
    for k, name in enumerate(a.names):
        j, kind = index_b[name], a.kinds[k]
        ga, gb = a.gamma[k], b.gamma[j]
        has_beta, has_stats = kind != SCALE_ONLY, kind == BATCHNORM
        nan = float("nan")
        deltas = {"gamma": np.abs(gb - ga), **({"beta": np.abs(b.beta[j] - a.beta[k])} if has_beta else {})}
        best: tuple[float, Optional[str], Optional[int]] = (nan, None, None)
        for param, delta in deltas.items():
            finite = np.where(np.isfinite(delta), delta, -np.inf)
            if finite.size and np.isfinite(finite.max()) and not (best[0] >= finite.max()):
                # no change at all has no place
                best = (float(finite.max()), *((param, int(finite.argmax())) if finite.max() > 0 else (None, None)))
        off_a, off_b = np.abs(ga) < off_threshold, np.abs(gb) < off_threshold
        out_a, out_b = _outliers(ga, outlier_factor), _outliers(gb, outlier_factor)
        found.append(LayerDiff(
            name, kind, int(ga.size), relative_change(ga, gb),
            relative_change(a.beta[k], b.beta[j]) if has_beta else nan,
            float(np.linalg.norm(gb - ga)), float(np.linalg.norm(b.beta[j] - a.beta[k])) if has_beta else nan,
            relative_change(a.running_mean[k], b.running_mean[j]) if has_stats else nan,
            relative_change(a.running_var[k], b.running_var[j]) if has_stats else nan,
            *best, correlation(ga, gb),
            np.flatnonzero(off_b & ~off_a).tolist(), np.flatnonzero(off_a & ~off_b).tolist(),
            sorted(out_b - out_a), sorted(out_a - out_b)))
    return found


def check_diff_options(output_format: str, off_threshold: float, outlier_factor: float, output: Optional[Path],
                       from_init: bool, has_b: bool) -> None:
    """`bnprobe diff`'s settings, each checked once, before anything is read."""
    if output_format not in ("text", "json"):
        raise BnprobeError(f"--format must be text or json, got {output_format!r}")
    if not math.isfinite(off_threshold) or off_threshold < 0:
        raise BnprobeError(f"--off-threshold must be >= 0 (a finite number), got {off_threshold:g}")
    if not math.isfinite(outlier_factor) or outlier_factor <= 0:
        raise BnprobeError(f"--outlier-factor must be > 0 (a finite number), got {outlier_factor:g}")
    if output is not None:
        check_output_path(output, output_format)
    if from_init == has_b:
        raise BnprobeError("give two checkpoints A B, or one bnprobe run with --from-init")


def run_diff(path_a: Path, path_b: Path, off_threshold: float = OFF_THRESHOLD, outlier_factor: float = 10.0,
             initial: Optional[tuple[Any, str, Path]] = None) -> DiffResult:
    """Read both checkpoints' norm layers (from the files alone) and compare them layer by layer; `initial`
    (NormStats, label, file: bnprobe.analysis.initial_state) stands for A when given."""
    sides, stats = [], []
    for side, path in enumerate((path_a, path_b)):
        if initial is not None and side == 0:
            bn, label, file = initial
            sides.append(Side(str(path), str(file), label, "bnprobe run at initialisation"))
        else:
            bn, attrs, label, file = read_norms(path)
            sides.append(Side(str(path), str(file), label, str(attrs.get("file_format", ""))))
        stats.append(bn)
    label_a, label_b = sides[0].label, sides[1].label
    if label_a == label_b:
        label_a, label_b = f"A ({label_a})", f"B ({label_b})"
    check_same_layers(stats[0], stats[1], label_a, label_b)
    return DiffResult(sides[0], sides[1], diff_stats(stats[0], stats[1], off_threshold, outlier_factor),
                      off_threshold, outlier_factor)
