"""Findings: what a set of runs answers, with statistics over seeds. Torch-free (numpy and scipy.stats).

Runs that differ only by seed form a group (bnprobe.core.config.seed_group). Each group gets the mean, a 95%
Student-t interval and n of every accuracy, loss and gap; each comparison whose runs exist gets its numbers,
the test (a paired t-test when both sides ran the same seeds, else Welch's) and its p-value. A side with one
seed gets no interval and no test. Every sentence is built from the numbers next to it (`Row.sentence`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bnprobe.core.config import IDENTITY_DEFAULTS, seed_group
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.options import OFF_THRESHOLD, REPORT_TAUS, parse_sweep
from bnprobe.core.modelnames import model_depth, model_family
from bnprobe.core.norm_names import norm_family, norm_name, norm_suffix
from bnprobe.files import schema
from bnprobe.files.atomic import atomic_write

CONFIDENCE = 0.95
SINGLE = "single seed: no interval"
FORMAT = "bnprobe-findings"
# Settings that change BN itself (the "changed BN"): compared with plain BN-only, i.e. these at default.
CHANGED_BN = ("gamma_init", "gamma_l1", "bn_l2", "bn_affine_off")
SHOWN = ("model", "dataset", "freeze", "bn", "norm", "norm_groups")  # always in a group's label; others when they vary


# ---- statistics ------------------------------------------------------------------------------------------


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
    """One measured quantity of a finding: A (and B), A − B with its interval, the test and its p-value."""
    metric: str
    unit: str  # "pct" (a fraction shown in %), "count", or "number"
    a: Estimate
    b: Optional[Estimate] = None
    difference: Optional[Estimate] = None
    test: str = ""
    p: Optional[float] = None
    note: str = ""
    labels: tuple[str, str] = ("", "")

    @property
    def sentence(self) -> str:
        """The row as one sentence, every number from this row."""
        a_label, b_label = self.labels
        text = f"{self.metric}: {a_label + ' ' if a_label else ''}{show(self.a, self.unit)}"
        if self.b is not None:
            text += f" vs {b_label + ' ' if b_label else ''}{show(self.b, self.unit)}"
        if self.difference is not None:
            text += f"; difference {show(self.difference, self.unit, signed=True)}"
        if self.test:
            text += f"; {self.test}, p {p_value(self.p)}"
        if self.note:
            text += f" ({self.note})"
        return text + "."


def show(value: Optional[Estimate], unit: str, signed: bool = False, n: bool = True) -> str:
    """`71.2% [68.0, 74.4] (n = 3)`, `98.0% [93.1, 100.0] clipped (n = 3)`, or `71.2% (n = 1)`; differences of
    fractions are in points."""
    if value is None:
        return "–"

    def number(x: float, sign: bool = signed) -> str:
        if not math.isfinite(x):
            return "–"
        plus = "+" if sign else ""
        # Rounded first, then + 0.0: a bound such as -0.0004 is printed "0.0", not "-0.0" (-0.0 + 0.0 is 0.0).
        if unit == "pct":
            return f"{round(100 * x, 1) + 0.0:{plus}.1f}"
        if unit == "count":
            return f"{round(x) + 0.0:{plus},.0f}"
        return f"{x + 0.0:{plus}.3g}"

    suffix = (" points" if signed else "%") if unit == "pct" else ""
    interval = f" [{number(value.low, False)}, {number(value.high, False)}]" if value.low is not None else ""
    interval += " clipped" if value.clipped else ""  # to the values the quantity can take
    return f"{number(value.mean)}{suffix}{interval}" + (f" (n = {value.n})" if n else "")


def p_value(p: Optional[float]) -> str:
    """`= 0.018`, `< 0.0001`, or `= –` (not computable: no spread at all)."""
    if p is None or not math.isfinite(p):
        return "= –"
    return f"= {p:.2g}" if p >= 1e-4 else "< 0.0001"


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
    row.difference = Estimate(row.a.mean - row.b.mean, _finite(low), _finite(high), min(len(xs), len(ys)))
    row.p = _finite(result.pvalue)
    return row


def _finite(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


# The channels BN has turned off after training: |γ| below the probe's off threshold, so the BN output is (almost)
# the constant β (bnprobe probe's "off").
OFF = f"channels off (|γ| < {OFF_THRESHOLD:g})"
# Where clamping γ to 0 is reported (the report's τ), when a run's ablation swept them.
CLAMP_TAUS = tuple(parse_sweep(REPORT_TAUS, "REPORT_TAUS"))


# ---- groups --------------------------------------------------------------------------------------------------


def best_minus_final(run) -> float:
    """Best test accuracy of any epoch minus the last one: > 0 when accuracy fell after its best epoch."""
    return float(np.max(run.history["test_acc"]) - run.history["test_acc"][-1])


def _last(column: str, fallback: str = "") -> Callable:
    def value(run) -> float:
        history = run.history
        name = column if column in history else fallback
        return float(history[name][-1]) if name in history else float("nan")
    return value


# What each group summarises: name, unit, value of one run (a bnprobe.reporting.collect.Run), the values it can take.
METRICS: tuple[tuple[str, str, Callable, tuple[float, float]], ...] = (
    ("test accuracy", "pct", lambda run: run.test_acc, FRACTION),
    ("train accuracy", "pct", lambda run: run.train_acc, FRACTION),
    ("gap (train − test accuracy)", "pct", lambda run: run.gap, (-1.0, 1.0)),
    ("best-epoch − final test accuracy", "pct", best_minus_final, FRACTION),
    ("test loss", "number", _last("test_loss"), NON_NEGATIVE),
    ("train loss", "number", _last("train_eval_loss", "train_loss"), NON_NEGATIVE),
    (OFF, "pct", lambda run: run.fraction_below(OFF_THRESHOLD), FRACTION),
)
METRIC = {name: (unit, value, bounds) for name, unit, value, bounds in METRICS}


@dataclass
class Group:
    key: tuple
    runs: list  # bnprobe.reporting.collect.Run, by seed
    label: str = ""
    repeats: list[str] = field(default_factory=list)  # runs of a seed the group has already: not counted twice

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config

    def setting(self, name: str) -> Any:
        return self.config.get(name, IDENTITY_DEFAULTS.get(name))

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    def values(self, metric: str) -> dict[int, float]:
        """seed -> value, for the runs that recorded it (old runs lack eval-mode train loss, for one)."""
        value = METRIC[metric][1]
        return {run.seed: v for run in self.runs if math.isfinite(v := value(run))}

    def summary(self) -> dict[str, Estimate]:
        return {name: estimate(list(values.values()), bounds)
                for name, _, _, bounds in METRICS if (values := self.values(name))}


def group_runs(runs: Sequence) -> list[Group]:
    """Runs that differ only by seed, one group each. A seed twice (a copied run) counts once: the first run
    by name, the others listed as repeats."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        group = groups.setdefault(seed_group(run.config), Group(seed_group(run.config), []))
        if run.seed not in group.seeds:
            group.runs.append(run)
        else:
            group.repeats.append(run.name)
    for group in groups.values():
        group.runs.sort(key=lambda run: run.seed)
    varying = [name for name in IDENTITY_DEFAULTS if name not in SHOWN and name != "seed"
               and len({json.dumps(g.setting(name)) for g in groups.values()}) > 1]
    for group in groups.values():
        c = group.setting
        bn = "" if c("bn") == "full" else f" bn={'every-' + str(c('bn_every')) if c('bn') == 'every-k' else c('bn')}"
        # Settings that tell groups apart, where not at their default: at most one of two groups has that.
        others = "".join(f" {name}={c(name)}" for name in varying
                         if c(name) != IDENTITY_DEFAULTS[name] and not (name == "bn_every" and c("bn") != "every-k"))
        norm = norm_suffix(c("norm"), c("norm_groups"))
        group.label = f"{c('model')} {c('dataset')} {c('freeze')}{norm}{bn}{others}"
    return list(groups.values())


# ---- findings ------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str
    title: str
    rows: list[Row] = field(default_factory=list)


def _counterpart(group: Group, index: dict[tuple, Group], **changes: Any) -> Optional[Group]:
    """The group whose settings are `group`'s with `changes`: the comparison differs in those alone."""
    return index.get(seed_group({**group.config, **changes}))


def _compare_groups(kind: str, a: Group, b: Group, metrics: Sequence[str], what: tuple[str, str]) -> Finding:
    finding = Finding(kind, f"{a.label} vs {b.label}")
    for metric in metrics:
        xs, ys = a.values(metric), b.values(metric)
        if xs and ys:
            finding.rows.append(compare(metric, METRIC[metric][0], xs, ys, what, METRIC[metric][2]))
    return finding


def build_findings(groups: Sequence[Group], ablations: dict) -> list[Finding]:
    """One finding per comparison whose runs exist, in the order of the research questions. `ablations`: each
    run's clamp sweep, by id(run)."""
    index = {g.key: g for g in groups}
    accuracy_gap_drop = ("test accuracy", "gap (train − test accuracy)", "best-epoch − final test accuracy")
    out: list[Finding] = []
    for g in groups:  # BN-only vs full training of the same network
        full = _counterpart(g, index, freeze="none") if g.setting("freeze") == "non-bn" else None
        if full is not None:
            finding = _compare_groups("BN-only vs full training", g, full, accuracy_gap_drop + (OFF,),
                                      ("BN-only", "full"))
            finding.rows += clamp_cost_rows(g, full, ablations, ("BN-only", "full"))
            out.append(finding)

    series: dict[tuple, list[Group]] = {}  # depth trend: groups alike but for the model, within one family
    for g in groups:
        if model_depth(g.setting("model")) is not None:
            rest = seed_group({**g.config, "model": ""})
            series.setdefault((model_family(g.setting("model")), rest), []).append(g)
    for (family, _), members in series.items():
        runs = [run for g in members for run in g.runs]
        depths = sorted({model_depth(g.setting("model")) for g in members})
        if len(depths) >= 2 and len(runs) >= 3:
            out.append(depth_trend(family, members[0], runs))

    for g in groups:  # changed BN (γ/β regularised, other γ init, affine off) vs plain BN-only
        changed = [name for name in CHANGED_BN if g.setting(name) != IDENTITY_DEFAULTS[name]]
        plain = _counterpart(g, index, **{name: IDENTITY_DEFAULTS[name] for name in changed}) if (
            changed and g.setting("freeze") == "non-bn") else None
        if plain is not None:
            what = ", ".join(f"{name}={g.setting(name)}" for name in changed)
            out.append(_compare_groups("changed BN vs plain BN-only", g, plain, accuracy_gap_drop + (OFF,),
                                       (what, "plain")))

    out += other_norm_findings(groups, index, accuracy_gap_drop)

    for g in groups:  # reduced BN vs full BN, and vs another net (25/76/100 convs, ...) with as many BN layers
        if g.setting("bn") != "every-k":
            continue
        full = _counterpart(g, index, bn="full")
        if full is not None:
            out.append(_compare_groups("reduced BN vs full BN", g, full, accuracy_gap_drop[:2],
                                       (f"BN every {g.setting('bn_every')}", "full BN")))
        layers = len(g.runs[0].gamma_layers)
        for other in groups:
            if (layers and other.setting("model") != g.setting("model") and other.setting("bn") == "full"
                    and len(other.runs[0].gamma_layers) == layers
                    and _counterpart(g, index, bn="full", model=other.setting("model")) is other):
                finding = _compare_groups("reduced BN vs fewer layers", g, other, accuracy_gap_drop[:2],
                                          (f"BN every {g.setting('bn_every')}", f"{other.setting('model')}"))
                finding.title += f" (both {layers} BN layers)"
                out.append(finding)

    for g in groups:  # Frankle's random-features baseline vs BN-only (with the output layer, as the baseline has)
        if g.setting("random_features") and g.setting("freeze") == "all-but-output":
            bn_only = _counterpart(g, index, freeze="non-bn-output", random_features=0)
            if bn_only is not None:
                finding = _compare_groups("random features vs BN-only", g, bn_only, accuracy_gap_drop[:2],
                                          (f"{g.setting('random_features')} random features", "BN-only"))
                finding.rows.insert(0, _parameters_row(g, bn_only))
                out.append(finding)

    for g in groups:  # the γ near zero: how much accuracy they carry, how many channels that is
        finding = clamp_finding(g, ablations)
        if finding is not None:
            out.append(finding)

    for g in groups:  # BN γ/β vs conv weights: mean |grad| over training
        rows = [gradient_ratio(g, name) for name in ("bn_gamma", "bn_beta")]
        rows = [row for row in rows if row is not None]
        if rows:
            out.append(Finding("gradient magnitude, BN vs conv", g.label, rows))
    return out


# ---- GroupNorm and LayerNorm against BatchNorm ---------------------------------------------------------------


def other_norm_findings(groups: Sequence[Group], index: dict[tuple, Group], metrics: Sequence[str]) -> list[Finding]:
    """Each GN or LN group against the BN group of the same model (equal depth) and otherwise equal settings:
    GN-only vs BN-only where only the norm layers train (does γ/β's power need batch statistics?); and its norm
    layers' mean |grad| against the conv weights' (the seed's Figure 2 with GN)."""
    out = []
    for g in groups:
        if g.setting("norm") == "batch":
            continue
        kind = norm_family(g.setting("norm"))
        bn = _counterpart(g, index, norm="batch")  # seed_group spells the freeze mode as BN's
        if bn is not None:
            only = "-only" if g.setting("freeze") == "non-norm" else ""
            finding = _compare_groups(f"{kind}{only} vs BN{only}", g, bn, metrics,
                                      (f"{norm_name(g.setting('norm'), g.setting('norm_groups'))}{only}", f"BN{only}"))
            finding.title += f" (equal depth: both {g.setting('model')})"
            out.append(finding)
        rows = [row for name in ("gn_gamma", "gn_beta", "ln_gamma", "ln_beta")
                if (row := gradient_ratio(g, name)) is not None]
        if rows:
            out.append(Finding(f"gradient magnitude, {kind} vs conv", g.label, rows))
    return out


def depth_trend(family: str, first: Group, runs: Sequence) -> Finding:
    """Spearman rank correlation of depth with test accuracy, and with the fraction of channels off, over every
    run (each seed a point)."""
    label = first.label.replace(first.setting("model"), family, 1)
    rows = [_rank_correlation("test accuracy", runs, lambda run: run.test_acc)]
    off = _rank_correlation(f"the fraction of {OFF}", runs, lambda run: run.fraction_below(OFF_THRESHOLD))
    return Finding("depth trend", label, rows + ([off] if off is not None else []))


def _rank_correlation(what: str, runs: Sequence, value: Callable) -> Optional[Row]:
    """Spearman's rank correlation of depth with `value` over the runs that have it (None: fewer than 3)."""
    from scipy import stats

    points = [(model_depth(run.model), v) for run in runs if math.isfinite(v := value(run))]
    if len(points) < 3:
        return None
    depths, values = zip(*points)
    with warnings.catch_warnings():  # constant input: NaN, shown as "–"
        warnings.simplefilter("ignore")
        result = stats.spearmanr(depths, values)
    return Row(f"rank correlation of depth with {what} ({len(set(depths))} depths {min(depths)}–{max(depths)})",
               "number", Estimate(float(result.statistic), None, None, len(points)),
               test="Spearman rank correlation", p=_finite(float(result.pvalue)),
               note="runs of every seed as points" if len(points) > len(set(depths)) else SINGLE + " per depth")


def clamped_accuracy(run, ablations: dict, tau: float) -> tuple[float, float, float]:
    """(test accuracy with every |γ| < τ set to 0, as trained, fraction of channels clamped) from the run's clamp
    sweep (`bnprobe ablate --clamp-gamma`, over all layers, β kept), or NaNs when it did not sweep τ."""
    ablation = ablations.get(id(run))
    hits = [] if ablation is None else np.nonzero(np.isclose(ablation.values, tau, rtol=0, atol=1e-9))[0]
    if not len(hits) or ablation.baseline_test_acc is None:
        return (math.nan,) * 3
    k = int(hits[0])
    return float(ablation.test_acc[k]), float(ablation.baseline_test_acc), float(ablation.clamped_fraction[k])


def clamp_finding(group: Group, ablations: dict) -> Optional[Finding]:
    """How much accuracy the γ near zero carry in `group`: the test accuracy of each run with |γ| < τ set to 0
    against the same run as trained (a paired test over seeds), with the fraction of channels that clamps."""
    rows = []
    for tau in CLAMP_TAUS:
        measured = {run.seed: clamped_accuracy(run, ablations, tau) for run in group.runs}
        measured = {seed: m for seed, m in measured.items() if math.isfinite(m[0])}
        if not measured:
            continue
        clamped, trained = ({seed: m[i] for seed, m in measured.items()} for i in (0, 1))
        rows.append(compare(f"test accuracy with |γ| < {tau:g} set to 0", "pct", clamped, trained,
                            ("clamped", "as trained"), FRACTION))
        fraction = estimate([m[2] for m in measured.values()], FRACTION)
        rows.append(Row(f"channels clamped at |γ| < {tau:g}", "pct", fraction,
                        note=SINGLE if fraction.n < 2 else ""))
    return Finding("clamping small γ to 0", group.label, rows) if rows else None


def clamp_cost_rows(a: Group, b: Group, ablations: dict, labels: tuple[str, str]) -> list[Row]:
    """Accuracy lost by clamping |γ| < τ in `a` against `b` (e.g. BN-only against full training), per τ."""
    rows = []
    for tau in CLAMP_TAUS:
        lost = [{run.seed: m[1] - m[0] for run in g.runs
                 if math.isfinite((m := clamped_accuracy(run, ablations, tau))[0])} for g in (a, b)]
        if all(lost):
            rows.append(compare(f"test accuracy lost by setting |γ| < {tau:g} to 0", "pct", *lost, labels))
    return rows


def _parameters_row(a: Group, b: Group) -> Row:
    counts = [[float(run.trainable) for run in g.runs if run.trainable is not None] for g in (a, b)]
    if not all(counts):
        return Row("trainable parameters", "count", Estimate(float("nan"), None, None, 0), note="not recorded")
    ea, eb = (Estimate(float(np.mean(c)), None, None, len(c)) for c in counts)
    equal = "equal" if ea.mean == eb.mean else f"{ea.mean / eb.mean:.3g}x"
    return Row("trainable parameters", "count", ea, eb, Estimate(ea.mean - eb.mean, None, None, min(ea.n, eb.n)),
               note=equal, labels=(f"{a.setting('random_features')} random features", "BN-only"))


def gradient_ratio(group: Group, bn_group: str) -> Optional[Row]:
    """Per run, the mean over training of mean |grad| of `bn_group` over that of conv weights; their mean,
    interval, and a one-sample t-test of the ratio against 1 (equal magnitudes)."""
    from scipy import stats

    ratios = [float(np.mean(run.grad_groups[bn_group]) / np.mean(run.grad_groups["conv_weight"]))
              for run in group.runs if bn_group in run.grad_groups and "conv_weight" in run.grad_groups]
    if not ratios:
        return None
    kind, _, param = bn_group.partition("_")  # bn_gamma, gn_beta, ... (core.formats.NORM_GROUPS)
    row = Row(f"mean |grad| of {kind.upper()} {'γ' if param == 'gamma' else 'β'} / conv weights", "number",
              estimate(ratios, NON_NEGATIVE))
    if len(ratios) < 2:
        row.note = SINGLE
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row.test, row.p = "one-sample t-test against 1", _finite(float(stats.ttest_1samp(ratios, 1.0).pvalue))
    return row


# ---- output ----------------------------------------------------------------------------------------------------


@dataclass
class Findings:
    groups: list[Group]
    findings: list[Finding]

    def to_json(self) -> dict[str, Any]:
        return _finite_or_none({
            "format": FORMAT, "version": 1, "confidence": CONFIDENCE,
            "groups": [{"label": g.label, "runs": [run.name for run in g.runs], "seeds": g.seeds, "repeats": g.repeats,
                        "settings": dict((name, json.loads(value)) for name, value in g.key),
                        "summary": {name: asdict(e) for name, e in g.summary().items()}} for g in self.groups],
            "findings": [{"kind": f.kind, "title": f.title,
                          "rows": [{**asdict(row), "sentence": row.sentence} for row in f.rows]}
                         for f in self.findings],
        })


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a number that is not finite (a metric a run did not record) is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def findings_of(runs: Sequence, ablations: Sequence = ()) -> Findings:
    """The findings of `runs`; `ablations` (bnprobe.reporting.read.Ablation, each linked to its run) add how much
    accuracy clamping small γ costs: each run's global clamp sweep of γ (β kept), the first found."""
    groups = group_runs(runs)
    sweeps: dict[int, Any] = {}
    for ablation in ablations:
        if (ablation.run is not None and ablation.mode == "threshold" and not ablation.per_layer
                and not ablation.zero_beta and ablation.test_acc is not None):  # not an --eval's metrics
            sweeps.setdefault(id(ablation.run), ablation)
    return Findings(groups, build_findings(groups, sweeps))


def json_path(report: Path) -> Path:
    """Where a report's findings go: report.pdf -> report.findings.json, beside it."""
    return report.with_name(f"{report.stem}.findings.json")


def check_json_output(path: Path) -> None:
    """Replace only a findings file (or nothing): never a file bnprobe did not write as one, nor write one
    inside a run directory."""
    schema.check_outside_runs(path)
    if not os.path.lexists(path):
        return
    try:
        stored = schema.read_json(path)  # a FIFO or device is refused unopened
        ours = isinstance(stored, dict) and stored.get("format") == FORMAT
    except BnprobeError:
        ours = False
    if not ours:
        raise BnprobeError(f"will not replace {path}: it is not a findings file bnprobe wrote; move it away")


def write_json(findings: Findings, path: Path) -> None:
    check_json_output(path)
    text = json.dumps(findings.to_json(), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def tables(findings: Findings) -> list:
    """The findings as rich tables, for the terminal: the groups, then each finding (their labels hold settings
    from the runs' config.json: printed escaped)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    out = []
    groups = Table(title="Runs grouped by seed: mean [95% interval]", box=box.SIMPLE_HEAD)
    groups.add_column("group", overflow="fold", min_width=20)
    for header in ("seeds", "test accuracy", "gap (train − test)"):  # fits 80 columns; the JSON has the rest
        groups.add_column(header, no_wrap=True)
    for g in findings.groups:
        summary = g.summary()
        groups.add_row(escape(printable(g.label)), ", ".join(map(str, g.seeds)), *(
            show(summary.get(m), "pct", n=False) for m in ("test accuracy", "gap (train − test accuracy)")))
    out.append(groups)
    for f in findings.findings:
        table = Table(title=escape(printable(f"{f.kind}: {f.title}")), box=box.SIMPLE_HEAD, show_header=False)
        table.add_column("finding", overflow="fold")
        for row in f.rows:
            table.add_row(escape(printable(row.sentence)))
        out.append(table)
    return out
