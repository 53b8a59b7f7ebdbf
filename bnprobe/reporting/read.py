"""One run, or one result file, read for the report: defensively, through bnprobe.files.schema (regular files only,
JSON and HDF5 layouts checked before use) and bnprobe.files.headers. A run that is partial (no finished epoch, no
checkpoint, unfinished), damaged or unreadable raises RunSkipped with the reason, which the report shows as a
line: one bad run never costs the whole report. Torch-free, but for runs from before telemetry.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.core.config import IDENTITY_DEFAULTS, TrainConfig
from bnprobe.core.errors import BnprobeError, first_line, printable
from bnprobe.core.formats import (
    ABLATION_FORMAT,
    BATCHNORM,
    CHECKPOINT_FILE,
    COMPACT_FORMAT,
    CONFIG_FILE,
    METRICS_FILE,
    PROBE_FORMAT,
    PROBE_NORM_KINDS,
    TELEMETRY_FILE,
    TELEMETRY_FORMAT,
)
from bnprobe.core.measures import MAX_CURVE_POINTS, GammaDigest, fraction_below, gamma_digest, window_means
from bnprobe.core.modelnames import model_depth, model_family
from bnprobe.core.norm_names import norm_name
from bnprobe.core.options import OFF_THRESHOLD
from bnprobe.files import schema
from bnprobe.files.file_tensors import torch_tensors
from bnprobe.files.headers import check_complete, read_export_header
from bnprobe.files.store import file_format

EXPORT_SUFFIX = ".safetensors"  # `bnprobe export` files, shown in their own table


# ---- what the report shows ----------------------------------------------------------------------------


@dataclass
class Skipped:
    name: str
    reason: str


@dataclass
class Run:
    name: str  # path relative to the reported directory
    path: Path
    config: dict[str, Any]
    history: dict[str, np.ndarray]  # per-epoch columns: epoch, test_acc, train_acc, train_eval_acc, gap, ...
    trainable: Optional[int] = None
    total: Optional[int] = None
    gamma_layers: list[str] = field(default_factory=list)
    gamma_final: list[np.ndarray] = field(default_factory=list)  # per BN layer, input -> output order
    gamma_init: list[np.ndarray] = field(default_factory=list)  # empty when only the checkpoint had γ
    gamma_epoch: int = 0
    grad_steps: Optional[np.ndarray] = None  # None: no gradient telemetry; window means, see grad_window
    grad_window: int = 1  # recorded steps averaged into each point of the curves
    grad_groups: dict[str, np.ndarray] = field(default_factory=dict)  # trainable groups only
    frozen_groups: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    family: str = ""
    figure: Any = None  # its page's SvgFigure (or figures.late_figure's stand-in while it is drawn)
    # What the tables, captions and figure need of γ once the arrays are let go (see keep_gamma_summary): a deep
    # net's γ arrays are megabytes, and a report holds hundreds of runs.
    gamma_count: Optional[int] = None
    gamma_below: dict[float, float] = field(default_factory=dict)
    gamma_had_init: bool = False
    digest: Optional[GammaDigest] = None

    @property
    def figure_key(self) -> str:
        """Its page figure's key (salting the SVG ids: see bnprobe.reporting.figures)."""
        return f"run:{self.name}"

    @property
    def model(self) -> str:
        return str(self.config.get("model", "?"))

    @property
    def depth(self) -> Optional[int]:
        return model_depth(self.model)

    @property
    def dataset(self) -> str:
        return str(self.config.get("dataset", "?"))

    @property
    def freeze(self) -> str:
        return str(self.config.get("freeze", "none"))

    @property
    def bn(self) -> str:
        """BN variant; runs made before the `bn` setting existed had BN after every conv."""
        variant = str(self.config.get("bn") or "full")
        if variant == "every-k" and self.config.get("bn_every"):
            return f"every-{self.config['bn_every']}"
        return variant

    @property
    def norm(self) -> str:
        """Its norm layers: BN (runs made before the `norm` setting too), GN<groups> or LN."""
        return norm_name(str(self.config.get("norm") or IDENTITY_DEFAULTS["norm"]),
                         self.config.get("norm_groups", IDENTITY_DEFAULTS["norm_groups"]))

    @property
    def width(self) -> int:
        return int(self.config.get("width", 1) or 1)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0) or 0)

    @property
    def epochs_done(self) -> int:
        return int(self.history["epoch"][-1])

    @property
    def epochs_planned(self) -> Optional[int]:
        value = self.config.get("epochs")
        return int(value) if isinstance(value, (int, float)) else None

    @property
    def test_acc(self) -> float:
        return float(self.history["test_acc"][-1])

    @property
    def train_acc_is_running(self) -> bool:
        """True for runs that predate eval-mode train accuracy: the running, augmented one stands in."""
        return "train_eval_acc" not in self.history

    @property
    def train_acc(self) -> float:
        column = "train_acc" if self.train_acc_is_running else "train_eval_acc"
        return float(self.history[column][-1]) if column in self.history else float("nan")

    @property
    def gap(self) -> float:
        if "gap" in self.history:
            return float(self.history["gap"][-1])
        return self.train_acc - self.test_acc

    @property
    def gamma_channels(self) -> int:
        return self.gamma_count if self.gamma_count is not None else int(sum(g.size for g in self.gamma_final))

    @property
    def has_gamma_init(self) -> bool:
        return bool(self.gamma_init) or self.gamma_had_init

    def fraction_below(self, tau: float) -> float:
        """Fraction of all BN channels (every layer) with |γ| < τ after the last epoch."""
        if tau in self.gamma_below:
            return self.gamma_below[tau]
        if self.gamma_count is not None:
            raise ValueError(f"{self.name}: γ was summarised for τ in {sorted(self.gamma_below)}, not {tau}")
        return float(fraction_below(self.gamma_final, [tau], per_layer=False)[0]) if self.gamma_channels else float("nan")

    def gamma_digest(self, taus: Sequence[float]) -> Optional[GammaDigest]:
        """What the run's figure shows of γ at `taus` (None: the run has no γ)."""
        if self.gamma_count is None:
            return gamma_digest(self.gamma_final, self.gamma_init, self.gamma_layers, self.gamma_epoch, taus)
        if self.digest is not None and self.digest.taus != tuple(float(t) for t in taus):
            raise ValueError(f"{self.name}: γ was summarised for τ in {list(self.digest.taus)}, not {list(taus)}")
        return self.digest

    def keep_gamma_summary(self, taus: Sequence[float]) -> None:
        """Replace the γ arrays by the numbers the report shows of them at `taus`: in its tables and captions,
        and in its figure (a digest: histogram counts, fraction per layer)."""
        self.digest = self.gamma_digest(taus)
        self.gamma_below = {tau: self.fraction_below(tau) for tau in (*taus, OFF_THRESHOLD)}  # the findings' "off"
        self.gamma_count, self.gamma_had_init = self.gamma_channels, self.has_gamma_init
        self.gamma_final, self.gamma_init = [], []


@dataclass
class Ablation:
    name: str  # file path relative to the reported directory
    label: str
    mode: str
    per_layer: bool
    zero_beta: bool
    values: np.ndarray
    clamped_fraction: np.ndarray
    test_acc: Optional[np.ndarray]  # None: measured by --eval/--text (version 3), see metrics
    train_acc: Optional[np.ndarray]
    baseline_test_acc: Optional[float]
    checkpoint: str
    freeze: str  # of the ablated checkpoint, when it was a bnprobe run
    run: Optional[Run] = None
    written_by: str = ""  # "bnprobe X, torch Y" (files of earlier versions do not say)
    labels: list[str] = field(default_factory=list)  # what each row clamped (version 3)
    metrics: dict[str, np.ndarray] = field(default_factory=dict)  # --eval/--text: name -> (T,)
    baseline_metrics: dict[str, float] = field(default_factory=dict)  # the same, nothing clamped


# What the report's figure of a checkpoint's norms shows of its dimensions recurring as outliers: the first ones
# (probe.h5 keeps them all, most layers first).
RECURRING_PLOTTED = 12


@dataclass
class NormDigest:
    """The norm picture of a checkpoint with a norm other than BatchNorm (probe.h5 version 4), small enough to
    keep and draw: |γ| quantiles by depth, each layer's kind, and the dimensions recurring as outliers."""

    names: list[str]
    kinds: list[str]
    levels: np.ndarray  # (Q,) quantile levels
    quantiles: np.ndarray  # (L, Q) of each layer's |γ|
    outlier_factor: float
    recurring: dict[str, np.ndarray]  # width, dim, layers, of_layers, max_abs_gamma: the first RECURRING_PLOTTED
    recurring_total: int
    recurring_off_total: Optional[int] = None  # dimensions off in several layers of one width (version 5)


@dataclass
class ProbeRow:
    name: str  # file path relative to the reported directory
    label: str
    accuracy: Optional[float]
    mean_abs_gamma: Optional[float]
    frac_below: list[tuple[float, float]]
    off: Optional[int]
    bn_channels: Optional[int]
    zero_fraction: Optional[float]
    forward_pass: bool = True  # False: a checkpoint file probed alone (`bnprobe probe FILE`), not a run
    bn_layers: Optional[int] = None
    off_dead: Optional[int] = None
    file_format: str = ""
    written_by: str = ""  # "bnprobe X, torch Y" (files of earlier versions do not say)
    kinds: str = ""  # "12 BatchNorm, 25 LayerNorm/GroupNorm-like" (version 4; before it, BatchNorm alone)
    outliers: Optional[int] = None  # outlier dimensions over all layers (version 4)
    norms: Optional[NormDigest] = None  # with a norm other than BatchNorm: what its figure shows

    @property
    def figure_key(self) -> str:
        return f"norms-{self.name}-{self.label}"


@dataclass
class Export:
    """A `bnprobe export` file found under the reported directories (its header only: no torch, no tensor)."""

    name: str  # file path relative to the reported directory
    model: str
    dataset: str
    freeze: str
    seed: Optional[int]
    epoch: int
    compact: bool
    numbers: int  # elements stored in the file
    size: int  # bytes
    full_size: int  # bytes of the full state dict as safetensors

    @property
    def ratio(self) -> float:
        return self.full_size / max(1, self.size)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def printable_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (os gives them as surrogates) shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# ---- reading one run --------------------------------------------------------------------------------------


class RunSkipped(Exception):
    """Why one run (or result file) is left out of the report."""

    @classmethod
    def from_error(cls, exc: BnprobeError, path: Path) -> "RunSkipped":
        """bnprobe.files.schema's one line about `path`, naming the file without its folder (the run is named)."""
        return cls(str(exc).replace(str(path), path.name))


def read_run(run_dir: Path, name: str, include_unfinished: bool = False) -> Run:
    """Everything the report shows of one run; raises RunSkipped with the reason when it cannot."""
    config = _read_config(run_dir)
    history = _read_metrics(run_dir)
    telemetry = run_dir / TELEMETRY_FILE
    run = Run(name=name, path=run_dir, config=config, history=history or {})
    has_telemetry = os.path.lexists(telemetry)  # a broken link or a loop is read, to say what it is
    if has_telemetry:
        _read_telemetry(run, telemetry, use_epochs=history is None)
    else:
        run.notes.append("no telemetry.h5 (the run predates telemetry): γ from the checkpoint, no gradient curves")
    if not run.history or "epoch" not in run.history or not len(run.history["epoch"]):
        raise RunSkipped("no finished epoch (neither metrics.json nor telemetry.h5 holds one)")
    if "test_acc" not in run.history:
        raise RunSkipped("metrics.json has no test_acc")
    planned = run.epochs_planned
    if left_behind(run_dir, history is not None, has_telemetry, planned is not None and run.epochs_done >= planned):
        run.notes.append("no checkpoint.pt (the run's files were copied without it): γ from telemetry.h5")
    else:
        _check_checkpoint(run_dir)
    if planned is not None and run.epochs_done < planned:
        if not include_unfinished:
            raise RunSkipped(f"unfinished: {run.epochs_done} of {planned} epochs (--include-unfinished shows it)")
        run.notes.append(f"unfinished: {run.epochs_done} of {planned} epochs")
    if not has_telemetry:
        _read_checkpoint_fallback(run)
    if run.train_acc_is_running:
        run.notes.append("no eval-mode train accuracy recorded: the table's train accuracy and gap use the running "
                         "(augmented) train accuracy")
    run.family = model_family(run.model)
    return run


def _read_config(run_dir: Path) -> dict[str, Any]:
    # Plain JSON, not TrainConfig.from_dict: a run written by a newer or older bnprobe (a field added or
    # removed) is still reported.
    path = run_dir / CONFIG_FILE
    if not os.path.lexists(path):
        raise RunSkipped("no config.json")
    try:
        config = schema.read_config(path)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    if not isinstance(config.get("model"), str):
        raise RunSkipped("config.json does not name a model")
    return config


def _read_metrics(run_dir: Path) -> Optional[dict[str, np.ndarray]]:
    path = run_dir / METRICS_FILE
    if not os.path.lexists(path):
        return None
    try:
        rows = schema.read_json(path)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "epoch" in r for r in rows):
        raise RunSkipped("metrics.json is not a list of per-epoch records")
    if not rows:
        return None
    for number, row in enumerate(rows, 1):  # NaN, Infinity and 1e999 parse as floats: no epoch or accuracy is one
        odd = next((key for key, value in row.items() if isinstance(value, float) and not math.isfinite(value)), None)
        if odd is not None:
            raise RunSkipped(f"metrics.json row {number} has {printable(str(odd), limit=60)} = {row[odd]}, not a "
                             f"finite number")
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


def _read_telemetry(run: Run, path: Path, use_epochs: bool) -> None:
    try:
        f = schema.open_h5(path, TELEMETRY_FORMAT)
        with f:
            sizes = schema.check_telemetry(f, bn_fields=("gamma",))  # every shape and type read, before reading
            _read_telemetry_data(run, f, sizes.checked, use_epochs)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    except (KeyError, OSError, ValueError, IndexError, TypeError) as exc:
        raise RunSkipped(f"telemetry.h5 is damaged ({first_line(exc)})")


def _read_telemetry_data(run: Run, f, checked: dict[str, Any], use_epochs: bool) -> None:
    """Read from the objects `checked` (path -> object, as schema.check_telemetry found them): only what was
    checked is read, and none is looked up in the file twice."""
    if use_epochs and "epochs" in checked:
        run.history = {k: checked[f"epochs/{k}"][:].astype(np.float64) for k in checked["epochs"]}
    epochs_done = int(run.history["epoch"][-1]) if run.history.get("epoch") is not None and len(
        run.history["epoch"]) else 0

    names = checked["params/name"].asstr()[:]
    groups = checked["params/group"].asstr()[:]
    numel = checked["params/numel"][:]
    trainable = checked["params/trainable"][:].astype(bool)
    run.trainable, run.total = int(numel[trainable].sum()), int(numel.sum())
    counts = [f.attrs.get(k) for k in ("trainable_params", "total_params")]  # exact under --random-features
    if all(isinstance(c, (int, np.integer)) and 0 <= c <= run.total for c in counts):
        run.trainable, run.total = int(counts[0]), int(counts[1])

    # γ in network order: params/name follows named_parameters(), h5py lists groups alphabetically.
    layers = [n[: -len(".weight")] for n, g in zip(names, groups) if g.endswith("_gamma") and n.endswith(".weight")]
    if "bn" in checked and layers:
        snapshot_epochs = checked["bn/epoch"][:]
        # A run killed between the telemetry and checkpoint writes has one snapshot more than metrics.json.
        later = np.nonzero(snapshot_epochs <= epochs_done)[0] if epochs_done else []
        row = int(later[-1]) if len(later) else len(snapshot_epochs) - 1
        run.gamma_epoch = int(snapshot_epochs[row])
        for layer in layers:
            gamma = checked.get(f"bn/{layer}/gamma")  # a name from params/name: only among the layers checked
            if gamma is not None:
                gamma = gamma[:]  # all rows at once: they share a compressed chunk
                run.gamma_layers.append(layer)
                run.gamma_final.append(gamma[row].astype(np.float64))
                run.gamma_init.append(gamma[0].astype(np.float64))

    if "steps/step" in checked and "steps/groups" in checked and len(checked["steps/step"]):
        keep = checked["steps/epoch"][:] <= epochs_done if epochs_done else slice(None)
        step = checked["steps/step"][:][keep]
        run.grad_window = max(1, math.ceil(len(step) / MAX_CURVE_POINTS))
        for group in checked["steps/groups"]:
            if bool(checked[f"steps/groups/{group}"].attrs.get("frozen", False)):
                run.frozen_groups.append(group)
            else:
                # window means right away: a run keeps MAX_CURVE_POINTS per curve, not 60k steps
                run.grad_steps, run.grad_groups[group] = window_means(
                    step, checked[f"steps/groups/{group}/grad_abs_mean"][:][keep])
        if run.grad_steps is None:
            run.grad_steps = step[:0]
    else:
        run.notes.append("no gradient telemetry (--telemetry-every 0)")


def left_behind(run_dir: Path, has_metrics: bool, has_telemetry: bool, finished: bool) -> bool:
    """Whether a run's checkpoint was left out on purpose, so that the run is reported without it: a finished
    run's metrics.json is written after its last checkpoint, so with both it and telemetry.h5 (which holds γ) and
    no checkpoint.pt at all, the run's files were copied without it (bench/gpu_study.sh brings runs back so)."""
    return has_metrics and has_telemetry and finished and not os.path.lexists(run_dir / CHECKPOINT_FILE)


def _check_checkpoint(run_dir: Path) -> None:
    path = run_dir / CHECKPOINT_FILE
    if not os.path.lexists(path):
        raise RunSkipped("no checkpoint.pt")
    try:
        check_complete(path)
        _check_agrees(path)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)


def _check_agrees(path: Path) -> None:
    """The run's checkpoint.pt and config.json agree on what was computed (schema.check_agrees), as probe,
    ablate, export and inspect check it: the checkpoint's pickle read inertly, without torch and without its
    tensors' bytes."""
    state, _ = torch_tensors(path)
    stored = state.get("config") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        raise BnprobeError(f"{path} holds no run config: not a checkpoint bnprobe wrote")
    schema.check_agrees(TrainConfig.from_dict(stored, path), path)


def _read_checkpoint_fallback(run: Run) -> None:
    """γ and parameter counts of a run without telemetry.h5, from its checkpoint (weights only). The one place
    the report loads torch: only runs from before telemetry need it."""
    from bnprobe.analysis.static import bn_from_tensors
    from bnprobe.files.checkpoints import load_checkpoint
    from bnprobe.files.file_tensors import FileTensors

    path = run.path / CHECKPOINT_FILE
    try:
        state = load_checkpoint(path)
        weights = state.get("model")
        if not isinstance(weights, dict):
            raise RunSkipped("checkpoint.pt holds no model weights")
        bn = bn_from_tensors(FileTensors(weights, "torch zip", "model", [], "file"), path)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    if isinstance(state.get("trainable"), int) and isinstance(state.get("total"), int):
        run.trainable, run.total = state["trainable"], state["total"]
    run.gamma_epoch = int(state.get("epoch", run.epochs_done))
    run.gamma_layers, run.gamma_final = list(bn.names), list(bn.gamma)


# ---- probe and ablation result files ----------------------------------------------------------------------


def read_result_file(path: Path, name: str) -> Optional[Ablation | list[ProbeRow] | Export]:
    """An ablation.h5 or probe.h5 (found by its `format` attribute, whatever its name), or a `bnprobe export`
    .safetensors file (by its metadata); None for others."""
    if path.suffix == EXPORT_SUFFIX:
        try:
            return _read_export(path, name)
        except BnprobeError as exc:
            raise RunSkipped.from_error(exc, path)
    kind = ""
    try:
        with schema.open_h5(path) as f:
            kind = file_format(f)
            if kind == ABLATION_FORMAT:
                schema.check_ablation(f)
                return _read_ablation(f, name)
            if kind == PROBE_FORMAT:
                schema.check_probe(f)
                return _read_probe(f, name)
            return None
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    except (KeyError, OSError, ValueError, IndexError, TypeError) as exc:
        raise RunSkipped(f"damaged {kind or 'HDF5'} file ({first_line(exc)})")


def _read_ablation(f, name: str) -> Ablation:
    # Format `bnprobe-ablation` v1 to v3 as written by bnprobe.analysis.ablate.write_ablation_h5
    # (docs/probe-schema.md); schema.check_ablation checked every shape read here.
    values = f["values"][:].astype(np.float64)
    if "clamped_fraction" in f:
        fraction = f["clamped_fraction"][:].astype(np.float64)
    else:
        fraction = f["clamped"][:] / max(1, int(f.attrs["total_channels"]))
    test = f["test_acc"][:].astype(np.float64) if "test_acc" in f else None
    train = f["train_acc"][:].astype(np.float64) if "train_acc" in f else None
    baseline = f.attrs.get("baseline_test_acc")
    labels = [_text(label) for label in f["labels"][:]] if "labels" in f else []
    metrics, baselines = {}, {}
    for metric in f.get("eval", {}):
        metrics[_text(metric)] = f["eval"][metric][:].astype(np.float64)
        value = f["eval"][metric].attrs.get("baseline")
        baselines[_text(metric)] = float(value) if value is not None else float("nan")
    return Ablation(
        name=name, label=_text(f.attrs.get("label", name)), mode=_text(f.attrs.get("mode", "threshold")),
        per_layer=bool(f.attrs.get("per_layer", False)), zero_beta=bool(f.attrs.get("zero_beta", False)),
        values=values, clamped_fraction=fraction, test_acc=test, train_acc=train,
        baseline_test_acc=float(baseline) if baseline is not None else None,
        checkpoint=_text(f.attrs.get("checkpoint", "")), freeze=_text(f.attrs.get("freeze", "?")),
        written_by=_written_by(f), labels=labels, metrics=metrics, baseline_metrics=baselines,
    )


def _read_export(path: Path, name: str) -> Optional[Export]:
    header = read_export_header(path)
    if header is None:
        return None  # a safetensors file bnprobe did not export
    config, size = header.config, os.stat(path).st_size
    compact = header.format == COMPACT_FORMAT
    return Export(name=name, model=_text(config.get("model", "?")), dataset=_text(config.get("dataset", "?")),
                  freeze=_text(config.get("freeze", "?")), seed=config.get("seed"), epoch=header.epoch,
                  compact=compact, numbers=header.numbers, size=size,
                  full_size=header.full_bytes if compact and header.full_bytes is not None else size)


def _written_by(f) -> str:
    """Which bnprobe and torch wrote a result file (its provenance attributes; "" in files from before them)."""
    versions = [f"{tool} {_text(f.attrs[f'{tool}_version'])}" for tool in ("bnprobe", "torch")
                if f"{tool}_version" in f.attrs]
    return ", ".join(versions)


def _read_probe(f, name: str) -> list[ProbeRow]:
    # Format `bnprobe-probe` v1 to v4 as written by bnprobe.analysis.probe_h5.write_probe_h5 (docs/probe-schema.md).
    taus = f["taus"][:].tolist() if "taus" in f else []
    rows = []
    for key in sorted(f["checkpoints"]):
        g = f["checkpoints"][key]
        get = lambda attr, kind, g=g: kind(g.attrs[attr]) if attr in g.attrs else None  # noqa: E731
        below = g["frac_below_all"][:].tolist() if "frac_below_all" in g else []
        rows.append(ProbeRow(
            name=name, label=_text(g.attrs.get("label", key)), accuracy=get("accuracy", float),
            mean_abs_gamma=get("mean_abs_gamma", float), frac_below=list(zip(taus, below)),
            off=get("off", int), bn_channels=get("bn_channels", int), zero_fraction=get("zero_fraction", float),
            forward_pass=bool(g.attrs.get("forward_pass", True)), bn_layers=get("bn_layers", int),
            off_dead=get("off_dead", int), file_format=_text(g.attrs.get("file_format", "")),
            written_by=_written_by(f), outliers=get("outliers", int), **_read_norms(f, g),
        ))
    return rows


def _read_norms(f, g) -> dict[str, Any]:
    """A version-4 group's kinds, and its NormDigest where it has a norm other than BatchNorm (schema.check_probe
    checked the shapes)."""
    if "kind" not in g["bn"]:
        return {}
    kinds = [kind if kind in PROBE_NORM_KINDS else "?" for kind in g["bn/kind"].asstr()[:]]
    found = {"kinds": ", ".join(f"{kinds.count(kind)} {kind}" for kind in dict.fromkeys(kinds))}
    if set(kinds) <= {BATCHNORM}:
        return found
    recurring = {name: g[f"recurring/{name}"][:RECURRING_PLOTTED]
                 for name in ("width", "dim", "layers", "of_layers", "max_abs_gamma")}
    found["norms"] = NormDigest(
        names=[printable(name) for name in g["bn/names"].asstr()[:]], kinds=kinds,
        levels=f["quantile_levels"][:].astype(np.float64), quantiles=g["bn/abs_gamma_quantiles"][:].astype(np.float64),
        outlier_factor=float(f.attrs.get("outlier_factor", math.nan)), recurring=recurring,
        recurring_total=len(g["recurring/dim"]),
        recurring_off_total=len(g["recurring_off/dim"]) if "recurring_off" in g else None)
    return found


