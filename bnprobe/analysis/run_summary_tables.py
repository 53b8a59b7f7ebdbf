"""`bnprobe inspect`'s tables: a run's (config, accuracies, gap and gradient magnitudes) and an export's (what it
holds, every hash checked), drawn from what bnprobe.analysis.run_summary computes; nothing computed here."""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from bnprobe.analysis.run_summary import ExportSummary, RunSummary
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import printable
from bnprobe.core.norm_names import norm_suffix


def _table(title: str, *columns: str, numbers: bool = True) -> Table:
    """A name column, then value columns. Nothing is ever cut with an ellipsis (rich uses 80 columns when
    piped): text folds, and numbers (`numbers=True`) neither wrap nor are cut while text can fold instead."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=numbers and i > 0, overflow="fold")
    return table


def run_tables(summary: RunSummary) -> Group:
    """A run's summary as tables: settings, results, gradients per group, extremes per tensor (as many as the
    summary's `top` kept); then the note on an old run that an interrupted --overwrite set aside beside it."""
    parts = [_settings_table(summary), _results_table(summary)]
    if summary.recorded_epoch is not None:
        parts.append(_groups_table(summary))
        if summary.extremes:
            parts.append(_extremes_table(summary))
    tables = Group(*parts)
    return Group(tables, f"[yellow]note:[/] {escape(summary.note)}") if summary.note else tables


def _settings_table(summary: RunSummary) -> Table:
    settings = _table(f"Run {escape(printable(summary.name))}", "setting", "value", numbers=False)  # values: paths too
    for key, value in summary.config.to_dict().items():
        settings.add_row(key, escape(printable(str(value))))
    return settings


def _results_table(summary: RunSummary) -> Table:
    r = summary.results
    results = _table(f"After {r.epoch} of {summary.config.epochs} epochs", "measure", "value")
    results.add_row("train acc (eval mode)", f"{r.train_eval_acc:.2%}")
    results.add_row("train acc (running, augmented)", f"{r.train_acc:.2%}")
    results.add_row("test acc", f"{r.test_acc:.2%}")
    results.add_row("best test acc", f"{r.best_test_acc:.2%} (epoch {r.best_epoch})")
    results.add_row("generalisation gap", f"{r.gap:+.2%}")
    results.add_row("train / test loss", f"{r.train_eval_loss:.4f} / {r.test_loss:.4f}")
    results.add_row("largest gap", f"{r.largest_gap:+.2%} (epoch {r.largest_gap_epoch})")
    return results


def _groups_table(summary: RunSummary) -> Table:
    title = f"epoch {summary.recorded_epoch}'s {summary.recorded_steps} recorded step(s)"
    groups = _table(f"Mean |grad| per parameter group ({title})", "group", "tensors", "elements", "mean |grad|",
                    "grad L2")
    for g in summary.groups:
        groups.add_row(escape(printable(g.name)), str(g.tensors), f"{g.elements:,}",
                       "frozen" if g.frozen else f"{g.grad_abs_mean:.3e}", "frozen" if g.frozen else f"{g.grad_l2:.3e}")
    return groups


def _extremes_table(summary: RunSummary) -> Table:
    if summary.all_tensors:
        title = f"Mean |grad| of all {len(summary.extremes[0])} trainable tensors, largest first"
    else:
        title = f"Largest and smallest mean |grad| per tensor (top {summary.top})"
    extremes = _table(title, "tensor", "mean |grad|")
    for n, section in enumerate(summary.extremes):
        if n:
            extremes.add_section()
        for name, value in section:
            extremes.add_row(escape(printable(name)), f"{value:.3e}")
    return extremes


def _norm(config: TrainConfig) -> str:
    """` (GN16)` or ` (LN)` after a model whose norm layers are not BatchNorm."""
    return norm_suffix(config.norm, config.norm_groups, " ({})")


def export_table(summary: ExportSummary) -> Table:
    """An export's summary as one table of names and values (the file's metadata and config, as they are)."""
    config = summary.config
    table = Table(title=f"{escape(printable(summary.name))}: a bnprobe run, exported", box=box.SIMPLE_HEAD,
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in (
        ("kind", "compact: the seed plus what trained" if summary.compact else "the full state dict"),
        ("model / data / freeze", f"{config.model}{_norm(config)} / {config.dataset} / {config.freeze}"
                                  + (f" + {config.random_features} random features" if config.random_features else "")),
        ("seed, epoch", f"{config.seed}, {summary.epoch}"),
        ("exported with", f"torch {summary.exported_with} (this is torch {summary.torch_here})"),
        ("numbers stored", f"{summary.stored:,} of {summary.total:,}"),
        ("file", f"{summary.size:,} bytes"),
        ("frozen tensors", f"regenerated from seed {config.seed}; SHA-256 matches" if summary.compact else "stored"),
        ("stored tensors", "SHA-256 matches" if summary.stored_verified
         else "not verified (a version 2 file holds no hash of them)"),
    ):
        table.add_row(name, escape(printable(value)))  # the file's metadata and config, as they are
    return table
