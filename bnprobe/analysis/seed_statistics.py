"""Statistics over seeds, the numbers every finding is made of: a mean with its 95% Student-t interval
(`estimate`), and A against B with a paired or Welch t-test (`compare`). Torch-free (numpy and scipy.stats).

A side with one seed gets no interval and no test. How these numbers are printed is
bnprobe.analysis.findings_output's part.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
SINGLE = "single seed: no interval"

# The values a quantity can take: its interval is clipped to them (differences of two groups are not bounded so).
UNBOUNDED = (-math.inf, math.inf)
FRACTION = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)


@dataclass
class Estimate:
    mean: float
    low: Optional[float]  # None: n = 1, no interval
    high: Optional[float]
    n: int
    clipped: bool = False  # the t-interval went past the quantity's bounds and was cut to them


def estimate(values: Sequence[float], bounds: tuple[float, float] = UNBOUNDED) -> Estimate:
    """Mean and its 95% Student-t interval: mean ± t(0.975, n-1) · s/√n, clipped to `bounds` (with few seeds
    an accuracy's interval may otherwise reach below 0% or above 100%)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return Estimate(mean, None, None, len(values))
    sem = float(stats.sem(values))
    if sem == 0:  # identical values: t.interval would answer NaN
        return Estimate(mean, mean, mean, len(values))
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=sem)
    clipped = bool(low < bounds[0] or high > bounds[1])
    return Estimate(mean, float(max(low, bounds[0])), float(min(high, bounds[1])), len(values), clipped)


@dataclass
class Row:
    """One measured quantity of a finding: A (and B), A − B with its interval, the test and its p-value
    (bnprobe.analysis.findings_output.sentence says it in words)."""
    metric: str
    unit: str  # "pct" (a fraction shown in %), "count", or "number"
    a: Estimate
    b: Optional[Estimate] = None
    difference: Optional[Estimate] = None
    test: str = ""
    p: Optional[float] = None
    note: str = ""
    labels: tuple[str, str] = ("", "")


def compare(metric: str, unit: str, a: dict[int, float], b: dict[int, float], labels: tuple[str, str],
            bounds: tuple[float, float] = UNBOUNDED) -> Row:
    """A vs B over seeds (seed -> value): a paired t-test when both ran the same seeds, else Welch's t-test;
    none when a side has one seed. The difference A − B comes with the test's 95% interval (not clipped to
    `bounds`, which are A's and B's own)."""
    from scipy import stats

    xs, ys = np.array(list(a.values()), dtype=np.float64), np.array(list(b.values()), dtype=np.float64)
    row = Row(metric, unit, estimate(xs, bounds), estimate(ys, bounds), labels=labels)
    if len(xs) < 2 or len(ys) < 2:
        row.difference = Estimate(row.a.mean - row.b.mean, None, None, min(len(xs), len(ys)))
        row.note = SINGLE
        return row
    with warnings.catch_warnings():  # identical samples: scipy warns and answers NaN, shown as "–"
        warnings.simplefilter("ignore", RuntimeWarning)
        if sorted(a) == sorted(b):
            seeds = sorted(a)
            result = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
            row.test = f"paired t-test over seeds {', '.join(map(str, seeds))}"
        else:
            result = stats.ttest_ind(xs, ys, equal_var=False)
            row.test = "Welch t-test"
        low, high = result.confidence_interval(CONFIDENCE)
    row.difference = Estimate(row.a.mean - row.b.mean, finite(low), finite(high), min(len(xs), len(ys)))
    row.p = finite(result.pvalue)
    return row


def finite(x: float) -> Optional[float]:
    """`x` as a float, or None where it is not finite (a p-value of identical samples, for one)."""
    return float(x) if math.isfinite(x) else None
