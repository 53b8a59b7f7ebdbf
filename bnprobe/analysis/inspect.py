"""`bnprobe inspect RUN` (a run's config, accuracies, gap and gradient magnitudes) and `bnprobe inspect
model.safetensors` (what an exported run holds, every hash checked), as rich tables."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from bnprobe.core.config import TrainConfig, norm_name
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import COMPACT_FORMAT, TELEMETRY_FILE, TELEMETRY_FORMAT
from bnprobe.files import runs
from bnprobe.files.checkpoints import read_weights
from bnprobe.files.compact import stored_verified
from bnprobe.files.headers import read_export_header
from bnprobe.files.schema import check_telemetry, is_set_aside, open_h5
from bnprobe.files.shards import not_a_run

# The /epochs columns the results table shows (files from before eval-mode train accuracy lack two of them).
SHOWN_EPOCH_FIELDS = ("epoch", "train_eval_acc", "train_acc", "test_acc", "gap", "train_eval_loss", "test_loss")


def _table(title: str, *columns: str, numbers: bool = True) -> Table:
    """A name column, then value columns. Nothing is ever cut with an ellipsis (rich uses 80 columns when
    piped): text folds, and numbers (`numbers=True`) neither wrap nor are cut while text can fold instead."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=numbers and i > 0, overflow="fold")
    return table


def inspect_run(run_dir: Path, top: int = 5) -> Group:
    """The summary tables of a run; `top` largest and smallest per-tensor gradients (0: no such table).
    An old run that an interrupted --overwrite set aside beside it is mentioned, with or without the run."""
    aside = runs.Replacement(run_dir).aside
    note = (f"{aside} holds the old run {run_dir.name}, set aside by an --overwrite that was interrupted; the "
            f"next `bnprobe train` of {run_dir.name} puts it back, or removes it if the new run has saved a "
            f"checkpoint") if is_set_aside(aside) else ""
    try:
        tables = _inspect_run(run_dir, top)
    except BnprobeError as exc:
        raise BnprobeError(f"{exc}; {note}" if note else str(exc)) from None
    return Group(tables, f"[yellow]note:[/] {escape(note)}") if note else tables


def _inspect_run(run_dir: Path, top: int) -> Group:
    if top < 0:
        raise BnprobeError(f"--top must be >= 0 (how many of the largest and smallest gradients to list; 0: none), got {top}")
    model_folder = not_a_run(run_dir, "inspect")
    if model_folder is not None:
        raise model_folder
    if run_dir.is_file():
        raise BnprobeError(f"{run_dir} is a file; inspect takes a run directory (runs/<name>)")
    if not run_dir.is_dir():
        raise BnprobeError(f"no run directory at {run_dir}")
    config = runs.check_run(run_dir)
    path = run_dir / TELEMETRY_FILE
    if not os.path.lexists(path):
        raise BnprobeError(f"{run_dir} has no telemetry.h5 (it did not finish an epoch)")
    parts = []
    with open_h5(path, TELEMETRY_FORMAT) as f:
        sizes = check_telemetry(f)  # every shape and type, before anything is read
        if not sizes.epochs:
            raise BnprobeError(f"{run_dir} has not finished an epoch yet")
        missing = [name for name in SHOWN_EPOCH_FIELDS if name not in f["epochs"]]
        if missing:
            raise BnprobeError(f"{path}: /epochs lacks {', '.join(missing)}")
        epochs = {k: v[:] for k, v in f["epochs"].items()}

        settings = _table(f"Run {escape(printable(run_dir.name))}", "setting", "value",
                          numbers=False)  # values: paths too
        for key, value in config.to_dict().items():
            settings.add_row(key, escape(printable(str(value))))
        parts.append(settings)

        last, best = -1, int(np.argmax(epochs["test_acc"]))
        results = _table(f"After {int(epochs['epoch'][last])} of {config.epochs} epochs", "measure", "value")
        results.add_row("train acc (eval mode)", f"{epochs['train_eval_acc'][last]:.2%}")
        results.add_row("train acc (running, augmented)", f"{epochs['train_acc'][last]:.2%}")
        results.add_row("test acc", f"{epochs['test_acc'][last]:.2%}")
        results.add_row("best test acc", f"{epochs['test_acc'][best]:.2%} (epoch {int(epochs['epoch'][best])})")
        results.add_row("generalisation gap", f"{epochs['gap'][last]:+.2%}")
        results.add_row("train / test loss", f"{epochs['train_eval_loss'][last]:.4f} / {epochs['test_loss'][last]:.4f}")
        results.add_row("largest gap", f"{epochs['gap'].max():+.2%} (epoch {int(epochs['epoch'][np.argmax(epochs['gap'])])})")
        parts.append(results)

        steps = f.get("steps")
        if sizes.steps and "grad_abs_mean" in steps:
            recorded_epoch = int(steps["epoch"][-1])
            in_last = steps["epoch"][:] == recorded_epoch
            # With few steps per epoch and --telemetry-every > 1, the last epoch may have no recorded step.
            title = f"epoch {recorded_epoch}'s {int(in_last.sum())} recorded step(s)"
            groups = _table(f"Mean |grad| per parameter group ({title})",
                            "group", "tensors", "elements", "mean |grad|", "grad L2")
            for name, g in steps["groups"].items():
                frozen = bool(g.attrs["frozen"])
                groups.add_row(escape(printable(name)), str(g.attrs["tensors"]), f"{g.attrs['numel']:,}",
                               "frozen" if frozen else f"{np.mean(g['grad_abs_mean'][in_last]):.3e}",
                               "frozen" if frozen else f"{np.mean(g['grad_l2'][in_last]):.3e}")
            parts.append(groups)

            names = [n.decode() if isinstance(n, bytes) else n for n in f["params/name"][:]]
            trainable = f["params/trainable"][:].astype(bool)
            if trainable.any() and top > 0:
                per_tensor = np.full(len(names), np.nan)
                per_tensor[trainable] = steps["grad_abs_mean"][in_last, :][:, trainable].mean(axis=0)
                order = [i for i in np.argsort(per_tensor) if trainable[i]]
                if 2 * top >= len(order):  # the two lists would share tensors: each one once instead
                    title = f"Mean |grad| of all {len(order)} trainable tensors, largest first"
                    sections = [order[::-1]]
                else:
                    title = f"Largest and smallest mean |grad| per tensor (top {top})"
                    sections = [order[::-1][:top], order[:top]]
                extremes = _table(title, "tensor", "mean |grad|")
                for n, section in enumerate(sections):
                    if n:
                        extremes.add_section()
                    for i in section:
                        extremes.add_row(escape(printable(names[i])), f"{per_tensor[i]:.3e}")
                parts.append(extremes)
    return Group(*parts)


def _norm(config: TrainConfig) -> str:
    """` (GN16)` or ` (LN)` after a model whose norm layers are not BatchNorm."""
    return "" if config.norm == "batch" else f" ({norm_name(config.norm, config.norm_groups)})"


def inspect_export(path: Path) -> Table:
    """`bnprobe inspect model.safetensors`: what an exported run holds, its frozen tensors regenerated and checked."""
    header = read_export_header(path)
    if header is None and not_a_run(path, "inspect") is not None:
        raise not_a_run(path, "inspect")
    if header is None:
        raise BnprobeError(f"{path} is not a model bnprobe exported; inspect takes a run directory or an export")
    metadata, compact, stored = header.metadata, header.format == COMPACT_FORMAT, header.numbers
    checkpoint = read_weights(path)  # a compact file's frozen tensors: regenerated, and the hash checked
    config = TrainConfig.from_dict(checkpoint["config"])
    total = sum(t.numel() for t in checkpoint["model"].values())
    table = Table(title=f"{escape(printable(path.name))}: a bnprobe run, exported", box=box.SIMPLE_HEAD,
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in (
        ("kind", "compact: the seed plus what trained" if compact else "the full state dict"),
        ("model / data / freeze", f"{config.model}{_norm(config)} / {config.dataset} / {config.freeze}"
                                  + (f" + {config.random_features} random features" if config.random_features else "")),
        ("seed, epoch", f"{config.seed}, {checkpoint['epoch']}"),
        ("exported with", f"torch {metadata.get('torch', '?')} (this is torch {torch.__version__})"),
        ("numbers stored", f"{stored:,} of {total:,}"),
        ("file", f"{path.stat().st_size:,} bytes"),
        ("frozen tensors", f"regenerated from seed {config.seed}; SHA-256 matches" if compact else "stored"),
        ("stored tensors", "SHA-256 matches" if stored_verified(metadata)
         else "not verified (a version 2 file holds no hash of them)"),
    ):
        table.add_row(name, escape(printable(value)))  # the file's metadata and config, as they are
    return table
