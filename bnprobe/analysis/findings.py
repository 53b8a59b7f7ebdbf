"""Findings: what a set of runs answers, with statistics over seeds. Torch-free (numpy and scipy.stats).

Runs that differ only by seed form a group (bnprobe.core.config.seed_group). Each group gets the mean, a 95%
Student-t interval and n of every accuracy, loss and gap; each comparison whose runs exist gets its numbers,
the test (a paired t-test when both sides ran the same seeds, else Welch's) and its p-value
(bnprobe.analysis.seed_statistics). This module computes; bnprobe.analysis.findings_output says the results in
words, tables and JSON, every sentence from the numbers next to it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from bnprobe.analysis.seed_statistics import (
    FRACTION,
    NON_NEGATIVE,
    SINGLE,
    Estimate,
    Row,
    compare,
    estimate,
    finite,
)
from bnprobe.core.config import IDENTITY_DEFAULTS, seed_group
from bnprobe.core.options import OFF_THRESHOLD, REPORT_TAUS, parse_sweep
from bnprobe.core.modelnames import model_depth, model_family
from bnprobe.core.norm_names import norm_family, norm_name, norm_suffix

# Settings that change BN itself (the "changed BN"): compared with plain BN-only, i.e. these at default.
CHANGED_BN = ("gamma_init", "gamma_l1", "bn_l2", "bn_affine_off")
SHOWN = ("model", "dataset", "freeze", "bn", "norm", "norm_groups")  # always in a group's label; others when they vary


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


ACCURACY_GAP_DROP = ("test accuracy", "gap (train − test accuracy)", "best-epoch − final test accuracy")


def build_findings(groups: Sequence[Group], ablations: dict) -> list[Finding]:
    """One finding per comparison whose runs exist, in the order of the research questions. `ablations`: each
    run's clamp sweep, by id(run)."""
    index = {g.key: g for g in groups}
    return [*training_findings(groups, index, ablations), *depth_trends(groups), *changed_bn_findings(groups, index),
            *other_norm_findings(groups, index, ACCURACY_GAP_DROP), *reduced_bn_findings(groups, index),
            *random_feature_findings(groups, index),
            *(finding for g in groups if (finding := clamp_finding(g, ablations)) is not None),
            *gradient_findings(groups)]


def training_findings(groups: Sequence[Group], index: dict[tuple, Group], ablations: dict) -> list[Finding]:
    """BN-only vs full training of the same network, with what clamping small γ costs each."""
    out = []
    for g in groups:
        full = _counterpart(g, index, freeze="none") if g.setting("freeze") == "non-bn" else None
        if full is not None:
            finding = _compare_groups("BN-only vs full training", g, full, ACCURACY_GAP_DROP + (OFF,),
                                      ("BN-only", "full"))
            finding.rows += clamp_cost_rows(g, full, ablations, ("BN-only", "full"))
            out.append(finding)
    return out


def depth_trends(groups: Sequence[Group]) -> list[Finding]:
    """The depth trend of each series of groups alike but for the model, within one family (2 depths, 3 runs)."""
    series: dict[tuple, list[Group]] = {}
    for g in groups:
        if model_depth(g.setting("model")) is not None:
            rest = seed_group({**g.config, "model": ""})
            series.setdefault((model_family(g.setting("model")), rest), []).append(g)
    out = []
    for (family, _), members in series.items():
        runs = [run for g in members for run in g.runs]
        depths = sorted({model_depth(g.setting("model")) for g in members})
        if len(depths) >= 2 and len(runs) >= 3:
            out.append(depth_trend(family, members[0], runs))
    return out


def changed_bn_findings(groups: Sequence[Group], index: dict[tuple, Group]) -> list[Finding]:
    """Changed BN (γ/β regularised, other γ init, affine off) vs plain BN-only."""
    out = []
    for g in groups:
        changed = [name for name in CHANGED_BN if g.setting(name) != IDENTITY_DEFAULTS[name]]
        plain = _counterpart(g, index, **{name: IDENTITY_DEFAULTS[name] for name in changed}) if (
            changed and g.setting("freeze") == "non-bn") else None
        if plain is not None:
            what = ", ".join(f"{name}={g.setting(name)}" for name in changed)
            out.append(_compare_groups("changed BN vs plain BN-only", g, plain, ACCURACY_GAP_DROP + (OFF,),
                                       (what, "plain")))
    return out


def reduced_bn_findings(groups: Sequence[Group], index: dict[tuple, Group]) -> list[Finding]:
    """Reduced BN vs full BN, and vs another net (25/76/100 convs, ...) with as many BN layers."""
    out = []
    for g in groups:
        if g.setting("bn") != "every-k":
            continue
        full = _counterpart(g, index, bn="full")
        if full is not None:
            out.append(_compare_groups("reduced BN vs full BN", g, full, ACCURACY_GAP_DROP[:2],
                                       (f"BN every {g.setting('bn_every')}", "full BN")))
        layers = len(g.runs[0].gamma_layers)
        for other in groups:
            if (layers and other.setting("model") != g.setting("model") and other.setting("bn") == "full"
                    and len(other.runs[0].gamma_layers) == layers
                    and _counterpart(g, index, bn="full", model=other.setting("model")) is other):
                finding = _compare_groups("reduced BN vs fewer layers", g, other, ACCURACY_GAP_DROP[:2],
                                          (f"BN every {g.setting('bn_every')}", f"{other.setting('model')}"))
                finding.title += f" (both {layers} BN layers)"
                out.append(finding)
    return out


def random_feature_findings(groups: Sequence[Group], index: dict[tuple, Group]) -> list[Finding]:
    """Frankle's random-features baseline vs BN-only (with the output layer, as the baseline has)."""
    out = []
    for g in groups:
        if g.setting("random_features") and g.setting("freeze") == "all-but-output":
            bn_only = _counterpart(g, index, freeze="non-bn-output", random_features=0)
            if bn_only is not None:
                finding = _compare_groups("random features vs BN-only", g, bn_only, ACCURACY_GAP_DROP[:2],
                                          (f"{g.setting('random_features')} random features", "BN-only"))
                finding.rows.insert(0, _parameters_row(g, bn_only))
                out.append(finding)
    return out


def gradient_findings(groups: Sequence[Group]) -> list[Finding]:
    """BN γ/β vs conv weights: mean |grad| over training."""
    out = []
    for g in groups:
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
               test="Spearman rank correlation", p=finite(float(result.pvalue)),
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
            row.test, row.p = "one-sample t-test against 1", finite(float(stats.ttest_1samp(ratios, 1.0).pvalue))
    return row


# ---- results ---------------------------------------------------------------------------------------------------


@dataclass
class Findings:
    """What `findings_of` returns: the groups and every finding (bnprobe.analysis.findings_output presents them)."""
    groups: list[Group]
    findings: list[Finding]


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
