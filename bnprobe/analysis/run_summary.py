"""What `bnprobe inspect` reports, computed: a run's settings, accuracies, gap and gradient magnitudes read from
its telemetry (`summarize_run`), and what an exported run holds, every hash checked (`summarize_export`).
bnprobe.analysis.run_summary_tables draws them as tables."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import COMPACT_FORMAT, TELEMETRY_FILE, TELEMETRY_FORMAT
from bnprobe.files import runs
from bnprobe.files.checkpoints import check_run, read_weights
from bnprobe.files.compact import stored_verified
from bnprobe.files.headers import read_export_header
from bnprobe.files.schema import check_telemetry, is_set_aside, open_h5
from bnprobe.files.shards import not_a_run

# The /epochs columns the results table shows (files from before eval-mode train accuracy lack two of them).
SHOWN_EPOCH_FIELDS = ("epoch", "train_eval_acc", "train_acc", "test_acc", "gap", "train_eval_loss", "test_loss")


@dataclass
class Results:
    """The last epoch's accuracies and losses, the best test accuracy and the largest gap, with their epochs."""
    epoch: int
    train_eval_acc: float
    train_acc: float
    test_acc: float
    best_test_acc: float
    best_epoch: int
    gap: float
    train_eval_loss: float
    test_loss: float
    largest_gap: float
    largest_gap_epoch: int


@dataclass
class GroupGradients:
    """One parameter group's mean |grad| and grad L2 over the recorded steps of the last recorded epoch."""
    name: str
    tensors: int
    elements: int
    frozen: bool
    grad_abs_mean: float  # NaN when frozen
    grad_l2: float


@dataclass
class RunSummary:
    name: str
    config: TrainConfig
    results: Results
    recorded_epoch: Optional[int] = None  # None: no gradient telemetry
    recorded_steps: int = 0
    groups: list[GroupGradients] = field(default_factory=list)
    # Mean |grad| per trainable tensor: (name, value) lists, largest first then smallest first; one list, largest
    # first, when `top` would list every tensor (all_tensors); none when top is 0 or nothing trains.
    extremes: list[list[tuple[str, float]]] = field(default_factory=list)
    all_tensors: bool = False
    top: int = 0
    note: str = ""  # where an old run an interrupted --overwrite set aside beside this one is, or ""


def aside_note(run_dir: Path, aside: Path) -> str:
    """What the old run set aside at `aside` is, and what the next `bnprobe train` does with it."""
    return (f"{aside} holds the old run {run_dir.name}, set aside by an --overwrite that was interrupted; the "
            f"next `bnprobe train` of {run_dir.name} puts it back, or removes it if the new run has saved a "
            f"checkpoint")


def summarize_run(run_dir: Path, top: int = 5) -> RunSummary:
    """A run's summary; `top` largest and smallest per-tensor gradients (0: none). An old run that an interrupted
    --overwrite set aside beside it is named, in the summary or in the error when the run cannot be read."""
    aside = runs.Replacement(run_dir).aside
    note = aside_note(run_dir, aside) if is_set_aside(aside) else ""
    try:
        summary = _summarize_run(run_dir, top)
    except BnprobeError as exc:
        raise BnprobeError(f"{exc}; {note}" if note else str(exc)) from None
    summary.note = note
    return summary


def _summarize_run(run_dir: Path, top: int) -> RunSummary:
    if top < 0:
        raise BnprobeError(f"--top must be >= 0 (how many of the largest and smallest gradients to list; 0: none), got {top}")
    model_folder = not_a_run(run_dir, "inspect")
    if model_folder is not None:
        raise model_folder
    if run_dir.is_file():
        raise BnprobeError(f"{run_dir} is a file; inspect takes a run directory (runs/<name>)")
    if not run_dir.is_dir():
        raise BnprobeError(f"no run directory at {run_dir}")
    config = check_run(run_dir)
    path = run_dir / TELEMETRY_FILE
    if not os.path.lexists(path):
        raise BnprobeError(f"{run_dir} has no telemetry.h5 (it did not finish an epoch)")
    with open_h5(path, TELEMETRY_FORMAT) as f:
        sizes = check_telemetry(f)  # every shape and type, before anything is read
        if not sizes.epochs:
            raise BnprobeError(f"{run_dir} has not finished an epoch yet")
        missing = [name for name in SHOWN_EPOCH_FIELDS if name not in f["epochs"]]
        if missing:
            raise BnprobeError(f"{path}: /epochs lacks {', '.join(missing)}")
        summary = RunSummary(run_dir.name, config, _results({k: v[:] for k, v in f["epochs"].items()}), top=top)
        steps = f.get("steps")
        if sizes.steps and "grad_abs_mean" in steps:
            _gradients(summary, f, steps, top)
    return summary


def _results(epochs: dict[str, np.ndarray]) -> Results:
    last, best, widest = -1, int(np.argmax(epochs["test_acc"])), int(np.argmax(epochs["gap"]))
    return Results(
        int(epochs["epoch"][last]), float(epochs["train_eval_acc"][last]), float(epochs["train_acc"][last]),
        float(epochs["test_acc"][last]), float(epochs["test_acc"][best]), int(epochs["epoch"][best]),
        float(epochs["gap"][last]), float(epochs["train_eval_loss"][last]), float(epochs["test_loss"][last]),
        float(epochs["gap"].max()), int(epochs["epoch"][widest]))


def _gradients(summary: RunSummary, f, steps, top: int) -> None:
    """Per group and per tensor, the mean over the last recorded epoch's steps (with few steps per epoch and
    --telemetry-every > 1, the last epoch may have no recorded step: the last one that has is used)."""
    summary.recorded_epoch = int(steps["epoch"][-1])
    in_last = steps["epoch"][:] == summary.recorded_epoch
    summary.recorded_steps = int(in_last.sum())
    for name, g in steps["groups"].items():
        frozen = bool(g.attrs["frozen"])
        summary.groups.append(GroupGradients(
            name, int(g.attrs["tensors"]), int(g.attrs["numel"]), frozen,
            math.nan if frozen else float(np.mean(g["grad_abs_mean"][in_last])),
            math.nan if frozen else float(np.mean(g["grad_l2"][in_last]))))

    names = [n.decode() if isinstance(n, bytes) else n for n in f["params/name"][:]]
    trainable = f["params/trainable"][:].astype(bool)
    if trainable.any() and top > 0:
        per_tensor = np.full(len(names), np.nan)
        per_tensor[trainable] = steps["grad_abs_mean"][in_last, :][:, trainable].mean(axis=0)
        order = [i for i in np.argsort(per_tensor) if trainable[i]]
        summary.all_tensors = 2 * top >= len(order)  # the two lists would share tensors: each one once instead
        sections = [order[::-1]] if summary.all_tensors else [order[::-1][:top], order[:top]]
        summary.extremes = [[(names[i], float(per_tensor[i])) for i in section] for section in sections]


@dataclass
class ExportSummary:
    """What an exported run holds: its config, how it was stored, and whether its hashes matched."""
    name: str
    config: TrainConfig
    compact: bool
    epoch: int
    exported_with: str  # the torch version the file was written with, "?" when unrecorded
    torch_here: str
    stored: int  # numbers stored in the file
    total: int  # numbers in the model
    size: int  # bytes
    stored_verified: bool


def summarize_export(path: Path) -> ExportSummary:
    """`bnprobe inspect model.safetensors`: what an exported run holds, its frozen tensors regenerated and checked."""
    header = read_export_header(path)
    if header is None and not_a_run(path, "inspect") is not None:
        raise not_a_run(path, "inspect")
    if header is None:
        raise BnprobeError(f"{path} is not a model bnprobe exported; inspect takes a run directory or an export")
    metadata = header.metadata
    checkpoint = read_weights(path)  # a compact file's frozen tensors: regenerated, and the hash checked
    return ExportSummary(
        path.name, TrainConfig.from_dict(checkpoint["config"]), header.format == COMPACT_FORMAT, checkpoint["epoch"],
        str(metadata.get("torch", "?")), torch.__version__, header.numbers,
        sum(t.numel() for t in checkpoint["model"].values()), path.stat().st_size, stored_verified(metadata))
