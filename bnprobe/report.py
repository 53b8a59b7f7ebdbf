"""`bnprobe report RUNS -o report.html|.pdf`: every run under a directory, plus its probe and ablation
results, in one document.

Reading is defensive: every file goes through bnprobe.schema (regular files only, JSON and HDF5 layouts
checked before use), and a run that is partial (no finished epoch, no checkpoint, unfinished), damaged,
unreadable, hidden (`.name`) or named in bytes that are not UTF-8 becomes a `Skipped(name, reason)` line of
the report, which still renders: one bad run never costs the whole report.
Figures come from bnprobe.figures as SVG text. The Jinja2 template and its CSS live in the repository's
top-level `templates/` folder; a wheel ships them as data files under PREFIX/share/bnprobe/templates
(see find_templates).
"""

from __future__ import annotations

import math
import os
import re
import signal
import site
import sys
import sysconfig
import threading
import time
import zipfile
from concurrent.futures import Executor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

import bnprobe
from bnprobe import pdf, schema
from bnprobe.atomic import atomic_write
from bnprobe.errors import BnprobeError, first_line
from bnprobe.figures import MAX_CURVE_POINTS, window_means
from bnprobe.formats import CHECKPOINT_FILE, CONFIG_FILE, FREEZE_MODES, METRICS_FILE, RUN_FILES, TELEMETRY_FILE
from bnprobe.lock import locked
from bnprobe.measures import GammaDigest, fraction_below, gamma_digest
from bnprobe.options import REPORT_TAUS, parse_sweep

SOURCE_TEMPLATES = Path(bnprobe.__file__).resolve().parents[1] / "templates"  # a checkout or an editable install
INSTALLED_TEMPLATES = Path("share", "bnprobe", "templates")  # under an install prefix: pyproject.toml's data-files
TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
TEMPLATE_FILES = (TEMPLATE, "findings.html.j2", STYLESHEET)  # every file the report reads from its templates folder
OUTPUT_FORMATS = {".html": "html", ".htm": "html", ".pdf": "pdf"}
SET_ASIDE = ".replaced"  # .NAME.replaced: the old run an --overwrite killed midway left (bnprobe.runs.Replacement)
BOTTLENECK_RESNET_DEPTHS = (50, 101, 152, 200)  # bnprobe/models/bottleneck_resnet.py
FREEZE_ORDER = FREEZE_MODES  # the report's column order
EXPORT_SUFFIX = ".safetensors"  # `bnprobe export` files, shown in their own table
FEW = 4  # fewer runs than this are read and drawn in the report's own process: quicker than in workers


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
        """Its page figure's key (salting the SVG ids: see bnprobe.figures)."""
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
        self.gamma_below = {tau: self.fraction_below(tau) for tau in taus}
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
    test_acc: np.ndarray
    train_acc: Optional[np.ndarray]
    baseline_test_acc: Optional[float]
    checkpoint: str
    freeze: str  # of the ablated checkpoint, when it was a bnprobe run
    run: Optional[Run] = None
    written_by: str = ""  # "bnprobe X, torch Y" (files of earlier versions do not say)


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


@dataclass
class Collection:
    roots: list[Path]
    runs: list[Run]
    skipped: list[Skipped]
    ablations: list[Ablation]
    probes: list[ProbeRow]
    exports: list[Export] = field(default_factory=list)


# ---- small parsers ---------------------------------------------------------------------------------------


def model_depth(model: str) -> Optional[int]:
    """Depth from the model name: resnet110 -> 110, vgg38 -> 38; None when the name has no number."""
    match = re.match(r"^[A-Za-z_-]*?(\d+)", model)
    return int(match.group(1)) if match else None


def model_family(model: str) -> str:
    """'CIFAR ResNet', 'Bottleneck ResNet', 'Bottleneck ResNet by convs', 'VGG', else the name's letters.

    The name alone is ambiguous (resnet56 is a CIFAR ResNet, resnet50 a bottleneck one, and they must not
    share a line in accuracy vs depth); the registry's descriptions say which, but importing it loads
    torch and torchvision (seconds), so the registry's bottleneck depths are mirrored here.
    """
    prefix = re.match(r"^[A-Za-z_-]*", model).group(0).rstrip("_-").lower()
    depth = model_depth(model)
    if prefix == "resnet":
        return "Bottleneck ResNet" if depth in BOTTLENECK_RESNET_DEPTHS else "CIFAR ResNet"
    if prefix == "convs":  # bottleneck ResNets named by main-path conv count: a depth of another kind
        return "Bottleneck ResNet by convs"
    if prefix == "vgg":
        return "VGG"
    return prefix or model


def parse_taus(text: str) -> list[float]:
    """The same syntax as `bnprobe probe --taus` (a list or START:STOP:COUNT), sorted and de-duplicated."""
    return parse_sweep(text, "--taus")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _printable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (os gives them as surrogates) shown as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _holds_run_files(folder: Path) -> bool:
    try:
        return any(name in RUN_FILES for name in os.listdir(folder))
    except OSError:
        return False


# ---- reading one run --------------------------------------------------------------------------------------


class RunSkipped(Exception):
    """Why one run (or result file) is left out of the report."""

    @classmethod
    def from_error(cls, exc: BnprobeError, path: Path) -> "RunSkipped":
        """bnprobe.schema's one line about `path`, naming the file without its folder (the run is named)."""
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
    _check_checkpoint(run_dir)
    planned = run.epochs_planned
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
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}


def _read_telemetry(run: Run, path: Path, use_epochs: bool) -> None:
    try:
        f = schema.open_h5(path, schema.TELEMETRY_FORMAT)
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
    layers = [n[: -len(".weight")] for n, g in zip(names, groups) if g == "bn_gamma" and n.endswith(".weight")]
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


def _check_checkpoint(run_dir: Path) -> None:
    path = run_dir / CHECKPOINT_FILE
    if not os.path.lexists(path):
        raise RunSkipped("no checkpoint.pt")
    try:
        kind = schema.torch_file_kind(schema.regular_file(path))
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    if not kind:
        raise RunSkipped("checkpoint.pt is empty" if not path.stat().st_size else "checkpoint.pt is not a PyTorch checkpoint")
    if kind == "zip":
        # A zip archive keeps its central directory at the end: opening it (no tensor is read) catches a copy
        # cut short. A legacy pickle checkpoint has no such cheap check and is taken as it is.
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise RunSkipped(f"checkpoint.pt is truncated or damaged (not a complete zip archive: {first_line(exc)})")


def _read_checkpoint_fallback(run: Run) -> None:
    """γ and parameter counts of a run without telemetry.h5, from its checkpoint (weights only)."""
    from bnprobe import runs

    try:
        state = runs.load_checkpoint(run.path / CHECKPOINT_FILE)
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, run.path / CHECKPOINT_FILE)
    if isinstance(state.get("trainable"), int) and isinstance(state.get("total"), int):
        run.trainable, run.total = state["trainable"], state["total"]
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise RunSkipped("checkpoint.pt holds no model weights")
    run.gamma_epoch = int(state.get("epoch", run.epochs_done))
    for key in weights:
        # A BN layer is a module with running statistics; its `weight` is γ.
        if key.endswith(".running_mean") and key[: -len("running_mean")] + "weight" in weights:
            layer = key[: -len(".running_mean")]
            run.gamma_layers.append(layer)
            run.gamma_final.append(weights[f"{layer}.weight"].detach().double().cpu().numpy())


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
            kind = schema.file_format(f)
            if kind == schema.ABLATION_FORMAT:
                schema.check_ablation(f)
                return _read_ablation(f, name)
            if kind == schema.PROBE_FORMAT:
                schema.check_probe(f)
                return _read_probe(f, name)
            return None
    except BnprobeError as exc:
        raise RunSkipped.from_error(exc, path)
    except (KeyError, OSError, ValueError, IndexError, TypeError) as exc:
        raise RunSkipped(f"damaged {kind or 'HDF5'} file ({first_line(exc)})")


def _read_ablation(f, name: str) -> Ablation:
    # Format `bnprobe-ablation` v1 or v2 as written by bnprobe.ablate.write_ablation_h5 (docs/probe-schema.md).
    values = f["values"][:].astype(np.float64)
    if "clamped_fraction" in f:
        fraction = f["clamped_fraction"][:].astype(np.float64)
    else:
        fraction = f["clamped"][:] / max(1, int(f.attrs["total_channels"]))
    train = f["train_acc"][:].astype(np.float64) if "train_acc" in f else None
    baseline = f.attrs.get("baseline_test_acc")
    return Ablation(
        name=name, label=_text(f.attrs.get("label", name)), mode=_text(f.attrs.get("mode", "threshold")),
        per_layer=bool(f.attrs.get("per_layer", False)), zero_beta=bool(f.attrs.get("zero_beta", False)),
        values=values, clamped_fraction=fraction, test_acc=f["test_acc"][:].astype(np.float64), train_acc=train,
        baseline_test_acc=float(baseline) if baseline is not None else None,
        checkpoint=_text(f.attrs.get("checkpoint", "")), freeze=_text(f.attrs.get("freeze", "?")),
        written_by=_written_by(f),
    )


def _read_export(path: Path, name: str) -> Optional[Export]:
    header = schema.read_export_header(path)
    if header is None:
        return None  # a safetensors file bnprobe did not export
    config, size = header.config, os.stat(path).st_size
    compact = header.format == schema.COMPACT_FORMAT
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
    # Format `bnprobe-probe` v1 to v3 as written by bnprobe.probe.write_probe_h5 (docs/probe-schema.md).
    taus = f["taus"][:].tolist() if "taus" in f else []
    rows = []
    for key in sorted(f["checkpoints"]):
        g = f["checkpoints"][key]
        get = lambda attr, kind: kind(g.attrs[attr]) if attr in g.attrs else None  # noqa: E731
        below = g["frac_below_all"][:].tolist() if "frac_below_all" in g else []
        rows.append(ProbeRow(
            name=name, label=_text(g.attrs.get("label", key)), accuracy=get("accuracy", float),
            mean_abs_gamma=get("mean_abs_gamma", float), frac_below=list(zip(taus, below)),
            off=get("off", int), bn_channels=get("bn_channels", int), zero_fraction=get("zero_fraction", float),
            forward_pass=bool(g.attrs.get("forward_pass", True)), bn_layers=get("bn_layers", int),
            off_dead=get("off_dead", int), file_format=_text(g.attrs.get("file_format", "")),
            written_by=_written_by(f),
        ))
    return rows


# ---- walking a directory ----------------------------------------------------------------------------------


def collect(roots: Sequence[Path], include_unfinished: bool = False, *, taus: Optional[Sequence[float]] = None,
            jobs: int = 1, pool: Optional[Workers] = None) -> Collection:
    """Every run directory under each of `roots` (or the root itself) and every probe/ablation file there,
    read defensively. Names are paths relative to their root, prefixed by the root's name when there are several.

    Runs are read in `pool` (see `workers`), else in up to `jobs` processes. With `taus`, a run's γ arrays are let go
    where it was read, for the numbers and the digest the report shows of them at those τ (keep_gamma_summary):
    what comes back is small, whatever the depth of the net.
    """
    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.exists():
            raise BnprobeError(f"no runs directory at {root}")
        if not root.is_dir():
            raise BnprobeError(f"{root} is not a directory")
    run_dirs: dict[Path, str] = {}  # resolved path -> name: a run named twice (runs/ and runs/a) is read once
    set_aside: list[Skipped] = []
    result_files: dict[Path, tuple[Path, str]] = {}
    passed_over: list[Skipped] = []  # what the walk itself cannot take: unreadable, hidden, not UTF-8
    for root in roots:
        prefix = f"{root.resolve().name}/" if len(roots) > 1 else ""

        def display(path: Path) -> str:
            relative = path.relative_to(root).as_posix()
            return _printable(path.name if relative == "." else prefix + relative)

        def unreadable(exc: OSError) -> None:
            passed_over.append(Skipped(display(Path(exc.filename)), f"cannot be read ({exc.strerror or exc})"))

        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
            set_aside += [Skipped(display(Path(dirpath, d)), _set_aside_reason(d[1:-len(SET_ASIDE)]))
                          for d in sorted(dirnames) if d.startswith(".") and d.endswith(SET_ASIDE)
                          and schema.is_set_aside(Path(dirpath, d))]
            here = Path(dirpath)
            for d in sorted(dirnames):  # .foo: hidden; named when it holds a run (.NAME.replaced: see Replacement)
                if d.startswith(".") and not schema.is_set_aside(here / d) and _holds_run_files(here / d):
                    passed_over.append(Skipped(display(here / d), "hidden: its name starts with '.' (rename it to "
                                                                  "include it)"))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files = {f for f in filenames if not f.startswith(".")}
            if files.intersection(RUN_FILES):
                if _printable(dirpath) != dirpath:
                    passed_over.append(Skipped(display(here), "its name is not valid UTF-8 (rename it to include it)"))
                    files = set()  # its result files go with it
                else:
                    run_dirs.setdefault(_real(here), display(here))
            for f in sorted(files):
                if (f.endswith(".h5") and f != TELEMETRY_FILE) or f.endswith(EXPORT_SUFFIX):
                    if _printable(str(here / f)) != str(here / f):
                        passed_over.append(Skipped(display(here / f), "its name is not valid UTF-8 (rename it)"))
                    else:
                        result_files.setdefault(_real(here / f), (here / f, display(here / f)))

    collection = Collection(roots, [], passed_over, [], [])
    tasks = [(run_dir, name, include_unfinished, taus) for run_dir, name in run_dirs.items()]
    skipped_runs: dict[Path, Skipped] = {}
    with workers(jobs) if pool is None else nullcontext(pool) as readers:
        outcomes = readers.map(_read, tasks)
    for (run_dir, *_), outcome in zip(tasks, outcomes):
        if isinstance(outcome, Run):
            collection.runs.append(outcome)
        else:
            collection.skipped.append(outcome)
            skipped_runs[run_dir] = outcome
    collection.skipped += set_aside
    left_out: dict[Path, list[str]] = {}
    for resolved, (path, name) in list(result_files.items()):
        # A result file inside a skipped run is left out with it (it would still label a curve and a table
        # row with that run's name); the nearest run directory above the file is the one it belongs to.
        owner = next((d for d in resolved.parents if d in run_dirs), None)
        if owner in skipped_runs:
            del result_files[resolved]
            left_out.setdefault(owner, []).append(resolved.relative_to(owner).as_posix())
    for owner, files in left_out.items():
        skipped_runs[owner].reason += f"; left out with it: {', '.join(sorted(files))}"
    for path, name in result_files.values():
        try:
            result = read_result_file(path, name)
        except RunSkipped as reason:
            collection.skipped.append(Skipped(name, str(reason)))
            continue
        except Exception as exc:  # noqa: BLE001 -- as in _read: one file, not the report
            collection.skipped.append(Skipped(name, f"could not be read ({first_line(exc, typed=True)})"))
            continue
        if isinstance(result, Ablation):
            result.run = _owner(path, result.checkpoint, collection.runs)
            if result.run is not None and _real(path.parent) == _real(result.run.path):
                result.name = path.name  # its run is named in the next column
            collection.ablations.append(result)
        elif isinstance(result, list):
            collection.probes += result
        elif isinstance(result, Export):
            collection.exports.append(result)
    collection.runs.sort(key=_run_order)
    collection.ablations.sort(key=lambda a: (_run_order(a.run) if a.run else (1,), a.name))
    if not (collection.runs or collection.skipped or collection.ablations or collection.probes or collection.exports):
        where = ", ".join(str(r) for r in roots)
        raise BnprobeError(f"no runs under {where} (a run directory holds config.json, metrics.json, checkpoint.pt)")
    return collection


def _set_aside_reason(name: str) -> str:
    return (f"the old run {name}, set aside by an --overwrite that was interrupted; the next `bnprobe train` "
            f"of {name} puts it back, or removes it if the new run has saved a checkpoint")


def _read(task: tuple[Path, str, bool, Optional[Sequence[float]]]) -> Run | Skipped:
    run_dir, name, include_unfinished, taus = task
    try:
        run = read_run(run_dir, name, include_unfinished)
        if taus is not None:
            run.keep_gamma_summary(taus)  # the arrays stay in this process
    except RunSkipped as reason:
        return Skipped(name, str(reason))
    except Exception as exc:  # noqa: BLE001 -- data no reader foresaw must cost one run, not the report
        return Skipped(name, f"could not be read ({first_line(exc, typed=True)})")
    return run


def _draw(task: tuple[Run, Sequence[float], bool]) -> Any:
    """A run's page figure (an SvgFigure), with hover values if asked. Never raises for the data: a figure that
    cannot be drawn is replaced by one that says why, so that a run already in the report's tables keeps its page."""
    from bnprobe import figures

    run, taus, hover_values = task
    try:
        return figures.run_figure(run, taus, run.figure_key, hover_values)
    except Exception as exc:  # noqa: BLE001 -- data no reader foresaw (the run was read, its numbers are shown)
        return _failed(run.figure_key, exc)


def _failed(key: str, exc: Exception) -> Any:
    from bnprobe import figures

    return figures.failed_figure(key, f"This run's figure could not be drawn ({first_line(exc, typed=True)}).")


def draw_run_figures(runs: Sequence[Run], taus: Sequence[float], pool: Optional[Workers] = None,
                     hover_values: bool = True) -> None:
    """Each run's page figure that is not drawn yet, in `pool` when there is one, with hover values if asked."""
    missing = [run for run in runs if run.figure is None]
    tasks = [(run, tuple(taus), hover_values) for run in missing]
    for run, figure in zip(missing, (pool or Workers(1)).map(_draw, tasks)):
        run.figure = figure


def draw_late(runs: Sequence[Run], taus: Sequence[float], pool: Workers) -> dict[str, Callable[[], str]]:
    """Start drawing each run's figure in `pool`, in page order, and give each run a stand-in of its size
    (figures.late_figure) for the PDF's layout; returns what bnprobe.pdf.write needs to draw each figure in its
    stand-in's place. Nothing (the figures are drawn before the layout) without worker processes for so many
    runs, or where this WeasyPrint cannot take figures late. A PDF shows no hover values: none are drawn."""
    executor = pool.executor(len(runs))
    if executor is None or not pdf.can_draw_late():
        return {}
    from bnprobe import figures

    late = {}
    for index, run in enumerate(runs):
        drawing = executor.submit(_draw, (run, tuple(taus), False))
        run.figure = figures.late_figure(run.figure_key, index, figures.RUN_FIGURE_HEIGHT_IN)

        def finished(drawing=drawing, key=run.figure_key) -> str:
            try:
                return drawing.result().svg
            except Exception as exc:  # noqa: BLE001 -- a worker that died: the figure says so, the report goes on
                return _failed(key, exc).svg

        late[run.figure.data_uri] = finished
    return late


class Workers:
    """Up to `jobs` worker processes for reading runs and drawing their figures, started at the first task list
    long enough to pay for them (one per task at most); shorter lists are worked through in this process."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.started: Optional[Executor] = None

    def executor(self, tasks: int) -> Optional[Executor]:
        """The processes for a list of `tasks` tasks (started now if need be), or None: work here."""
        if self.jobs <= 1 or tasks < FEW:
            return None
        if self.started is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork on Linux: the workers start at once with everything imported. Elsewhere the platform's default
            # (macOS system libraries are not fork-safe).
            method = "fork" if sys.platform.startswith("linux") else None
            self.started = ProcessPoolExecutor(min(self.jobs, tasks), mp_context=multiprocessing.get_context(method),
                                               initializer=_worker_start, initargs=(os.getpid(),))
        return self.started

    def map(self, function: Callable, tasks: list) -> list:
        """`map`, in order: in the processes one task at a time (runs differ in size, workers stay busy), or here."""
        executor = self.executor(len(tasks))
        return list(executor.map(function, tasks)) if executor else [function(task) for task in tasks]


@contextmanager
def workers(jobs: int) -> Iterator[Workers]:
    """Workers(jobs), stopped when done; interrupted (Ctrl-C, TERM, an error), they stop at once, not after the
    queued tasks."""
    pool = Workers(jobs)
    try:
        yield pool
    except BaseException:
        if pool.started is not None:
            pool.started.shutdown(wait=False, cancel_futures=True)
            for process in list((pool.started._processes or {}).values()):
                process.terminate()
        raise
    else:
        if pool.started is not None:
            pool.started.shutdown(wait=True)


def _worker_start(parent: int) -> None:
    """In each pool worker: end with the report's process, however that ends (kill -9 too), instead of staying
    behind blocked on a pipe. Ctrl-C and TERM are the parent's to handle: it stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits _stop_on_sigterm's handler
    # Below the report's own process: while workers draw figures it lays out the PDF, and that is what the
    # report waits for; the workers take the cycles it leaves.
    os.nice(10)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the parent ends
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """TERM (`kill`, a scheduler's time limit) ends the report as Ctrl-C does: by unwinding, so the temporary
    output file is removed and the pool's workers are stopped, instead of dying on the spot."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    received = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:  # raised where Python ignores exceptions (an at-fork hook, a __del__): stop here instead
        raise KeyboardInterrupt


def _run_order(run: Run) -> tuple:
    freeze = FREEZE_ORDER.index(run.freeze) if run.freeze in FREEZE_ORDER else len(FREEZE_ORDER)
    depth = run.depth if run.depth is not None else 10**9
    return (0, run.dataset, run.family, run.width, depth, freeze, run.freeze, run.bn, run.seed, run.name)


def _owner(path: Path, checkpoint: str, runs: Sequence[Run]) -> Optional[Run]:
    """The run an ablation belongs to: the one it sits in, else the one whose checkpoint it read."""
    candidates = [path.parent]
    if checkpoint:  # stored as given on the command line: relative to wherever `bnprobe ablate` ran
        for source in (Path(checkpoint), path.parent / checkpoint):
            candidates.append(source if os.path.isdir(source) else source.parent)
    for candidate in candidates:
        resolved = _real(candidate)
        for run in runs:
            if _real(run.path) == resolved:
                return run
    return None


def _real(path: Path) -> Path:
    """The path with every symlink resolved; unlike Path.resolve, never raises (a symlink loop stays as it is)."""
    return Path(os.path.realpath(path))


# ---- figures and the document -----------------------------------------------------------------------------


def depth_panels(runs: Sequence[Run]) -> list:
    from bnprobe.figures import DepthPanel

    panels: dict[tuple, Any] = {}
    for run in runs:
        if run.depth is None:
            continue
        width = f", width ×{run.width}" if run.width != 1 else ""
        key = (run.dataset, run.family, run.width)
        panel = panels.setdefault(key, DepthPanel(f"{run.family}{width} on {run.dataset}", {}))
        label = run.freeze if run.bn == "full" else f"{run.freeze}, bn={run.bn}"
        panel.lines.setdefault((label, run.freeze), {}).setdefault(run.depth, []).append(run.test_acc)
    for panel in panels.values():  # legend in the canonical freeze-mode order
        panel.lines = dict(sorted(panel.lines.items(), key=lambda item: (
            FREEZE_ORDER.index(item[0][1]) if item[0][1] in FREEZE_ORDER else 99, item[0][0])))
    return list(panels.values())


def ablation_curves(ablations: Sequence[Ablation]) -> list:
    from bnprobe.figures import AblationCurve

    curves = []
    for a in ablations:
        owner = a.run.name if a.run else a.label
        what = ("τ×layer max" if a.per_layer else "τ") if a.mode == "threshold" else (
            "p per layer" if a.per_layer else "p")
        curves.append(AblationCurve(
            label=f"{owner} ({what}{', β:=0' if a.zero_beta else ''})", freeze=a.run.freeze if a.run else a.freeze,
            mode="threshold" if a.mode == "threshold" and not a.per_layer else "fraction",
            values=a.values, clamped_fraction=a.clamped_fraction, test_acc=a.test_acc, train_acc=a.train_acc,
            baseline_test_acc=a.baseline_test_acc,
        ))
    return curves


def build_figures(collection: Collection, taus: Sequence[float], pool: Optional[Workers] = None,
                  hover_values: bool = True) -> dict[str, Any]:
    """The figures across runs, and each run's own that is not drawn yet (in `pool` when there is one); with
    hover values (for HTML) if `hover_values`."""
    from bnprobe import figures

    draw_run_figures(collection.runs, taus, pool, hover_values)
    return {
        "depth": figures.accuracy_vs_depth(depth_panels(collection.runs), "accuracy-vs-depth", hover_values),
        "ablation": figures.ablation_curves(ablation_curves(collection.ablations), "ablation", hover_values),
    }


# Worker processes (each a Python with numpy and matplotlib, started at once for a large report): more than
# this is a typo, not a machine.
MAX_JOBS = 1024


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def install_prefixes() -> list[Path]:
    """Where an installer may have put bnprobe's data files: this environment's prefix (a virtualenv, conda,
    a plain install), the platform scheme's data folder where it differs (Debian's /usr/local for pip with
    the system Python), and the user base when user site-packages are importable (pip install --user)."""
    prefixes = [sys.prefix, sysconfig.get_path("data")]
    if site.ENABLE_USER_SITE and site.USER_BASE:
        prefixes.append(site.USER_BASE)
    return list(dict.fromkeys(Path(p) for p in prefixes if p))


def find_templates(explicit: Optional[Path] = None, *, source: Optional[Path] = None,
                   prefixes: Optional[Sequence[Path]] = None) -> Path:
    """The folder with the report's template and stylesheet: `explicit` (--templates) as given, else the
    repository's templates/ next to the package, else the copy a wheel installed under a prefix.

    The checkout comes first: templates being edited win over a copy left by an earlier `pip install .`.
    """
    if explicit is not None:
        return Path(explicit)  # template_environment names it if it lacks a file
    candidates = [SOURCE_TEMPLATES if source is None else source] + [
        Path(p) / INSTALLED_TEMPLATES for p in (install_prefixes() if prefixes is None else prefixes)]
    for candidate in candidates:
        if _has_templates(candidate):
            return candidate
    raise BnprobeError(f"report templates not found (looked in {', '.join(str(c) for c in candidates)}); "
                       f"reinstall bnprobe or pass --templates DIR")


def _has_templates(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TEMPLATE_FILES)


def template_environment(templates: Path):
    import jinja2

    if not _has_templates(templates):
        raise BnprobeError(f"report templates not found in {templates} (expected {', '.join(TEMPLATE_FILES)})")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, signed_pct=_signed_pct, count=_count, number=_number, unbroken=_unbroken,
                       words=_words)
    return env


def _words(text: str) -> Any:
    """`text` (escaped) with no-break spaces: a line may break around it, not inside it. (No-break spaces, not
    a nowrap span: each inline box costs WeasyPrint about a millisecond of layout.)"""
    from markupsafe import Markup, escape

    return Markup(str(escape(text)).replace(" ", "&nbsp;"))


INTERVAL = re.compile(r"(\S+ \[[^\]]*\])")  # "93.0% [86.1, 100.0]": a value and its interval


def _unbroken(text: str) -> Any:
    """`text` (escaped) with each value-and-interval kept on one line: a narrow table column breaks around them,
    not inside the brackets."""
    from markupsafe import Markup, escape

    return Markup(INTERVAL.sub(lambda match: match.group(1).replace(" ", "&nbsp;"), str(escape(text))))


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}%"


def _signed_pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:+.{digits}f}%"


def _count(value: Optional[int]) -> str:
    return "–" if value is None else f"{value:,}"


def _number(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def render_html(collection: Collection, taus: Sequence[float], *, embed: str = "inline", title: Optional[str] = None,
                templates: Optional[Path] = None, figures: Optional[dict[str, Any]] = None, findings=None) -> str:
    """The report as one self-contained HTML page. `embed`: "inline" <svg> elements, or "img" data URIs
    (what the PDF uses: WeasyPrint parses an SVG image with a fast XML parser, inline SVG with its slow
    HTML one and styles every node). `templates`: see find_templates."""
    templates = find_templates(templates)
    env = template_environment(templates)
    figures = figures if figures is not None else build_figures(collection, taus, hover_values=embed == "inline")
    from bnprobe import findings as statistics

    findings = findings if findings is not None else statistics.findings_of(collection.runs)
    runs_with_depth = [r for r in collection.runs if r.depth is not None]
    return env.get_template(TEMPLATE).render(
        title=title or "bnprobe report: " + ", ".join(r.resolve().name or str(r) for r in collection.roots),
        source=", ".join(str(r) for r in collection.roots),
        version=bnprobe.__version__,
        css=(templates / STYLESHEET).read_text(encoding="utf-8"),
        embed=embed,
        taus=list(taus),
        runs=collection.runs,
        skipped=collection.skipped,
        ablations=collection.ablations,
        probes=collection.probes,
        exports=collection.exports,
        depth_figure=figures["depth"],
        depth_missing=[r.name for r in collection.runs if r.depth is None],
        depth_points=len(runs_with_depth),
        ablation_figure=figures["ablation"],
        any_running_train_acc=any(r.train_acc_is_running for r in collection.runs),
        findings=findings, show=statistics.show, confidence=statistics.CONFIDENCE,
    )


@dataclass
class ReportSummary:
    output: Path
    runs: int
    skipped: list[Skipped]
    ablations: int
    probes: int
    pages: Optional[int]
    seconds: float
    exports: int = 0
    findings: Optional[Path] = None  # the findings' JSON file, beside the report


def check_output(output: Path) -> str:
    """The output format, after making sure the file can be written (before any slow work)."""
    kind = OUTPUT_FORMATS.get(output.suffix.lower())
    if kind is None:
        shown = f"'{output.suffix}'" if output.suffix else "none"
        raise BnprobeError(f"unknown output extension {shown} for {output}: use .html or .pdf")
    try:
        os.stat(output)  # a name too long for the file system, or a symlink loop, is an OSError here
    except (FileNotFoundError, NotADirectoryError):  # told apart below
        pass
    except OSError as exc:
        raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
    if output.is_dir():
        raise BnprobeError(f"cannot write {output}: it is a directory")
    schema.check_outside_runs(output)
    if os.path.lexists(output) and not _is_report(output, kind):
        raise BnprobeError(f"will not replace {output}: it is not a report bnprobe wrote; "
                           f"name another output file")
    parent = output.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise BnprobeError(f"cannot write {output}: {existing} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
    if not os.access(parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise BnprobeError(f"cannot write {output} (permission denied)")
    if kind == "pdf":
        pdf.weasyprint()
    return kind


def _is_report(path: Path, kind: str) -> bool:
    """Whether `report -o` may replace this file: an HTML page with bnprobe's generator tag, or a PDF (whose
    metadata naming bnprobe WeasyPrint compresses). A FIFO or device is never opened."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"%PDF-") if kind == "pdf" else b'<meta name="generator" content="bnprobe' in head


@_stop_on_sigterm()
def write_report(
    runs_dirs: Path | Sequence[Path],
    output: Path,
    *,
    taus: Sequence[float] = tuple(parse_taus(REPORT_TAUS)),
    include_unfinished: bool = False,
    title: Optional[str] = None,
    templates: Optional[Path] = None,
    jobs: Optional[int] = None,
    on_progress: Optional[Callable[[str], None]] = None,
) -> ReportSummary:
    """Walk `runs_dirs` (a directory of runs, a run directory, or several), render the report, write `output`
    (.html or .pdf) atomically, holding the lock beside it (one report writer per output)."""
    started = time.perf_counter()
    kind = check_output(output)  # a bad name or place is answered as such, before the lock beside it is taken
    with locked(output, str(output)):
        from bnprobe import findings as statistics

        findings_json = statistics.json_path(output)
        statistics.check_json_output(findings_json)
        templates = find_templates(templates)
        template_environment(templates)  # fail on missing templates before reading anything
        say = on_progress or (lambda message: None)
        roots = [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(r) for r in runs_dirs]
        with workers(jobs or default_jobs()) as pool:
            collection = collect(roots, include_unfinished, taus=taus, pool=pool)
            say(f"read {len(collection.runs)} runs, {len(collection.ablations)} ablations and "
                f"{len(collection.probes)} probes")
            # A PDF is laid out while the run figures are drawn (each is needed only when its page is painted);
            # an HTML page needs them all first.
            late = draw_late(collection.runs, taus, pool) if kind == "pdf" else {}
            embed = "inline" if kind == "html" else "img"
            figures = build_figures(collection, taus, pool, hover_values=embed == "inline")
            say("drew the figures across runs" + ("" if late else " and each run's figure"))
            findings = statistics.findings_of(collection.runs)
            html = render_html(collection, taus, embed=embed, title=title, templates=templates, figures=figures,
                               findings=findings)
            pages = None
            try:
                if kind == "html":
                    atomic_write(output, lambda f: f.write(html.encode("utf-8")))
                else:
                    document = pdf.render(html, str(templates))
                    pages = len(document.pages)
                    say("laid out the PDF")
                    atomic_write(output, lambda f: pdf.write(document, f, late=late))
            except OSError as exc:
                raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
        statistics.write_json(findings, findings_json)
        return ReportSummary(output, len(collection.runs), collection.skipped, len(collection.ablations),
                             len(collection.probes), pages, time.perf_counter() - started, len(collection.exports),
                             findings_json)
