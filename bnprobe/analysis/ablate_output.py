"""The terminal output of `bnprobe ablate`: the sweep's progress bar, and the table of what it measured (a
bnprobe.analysis.ablate.SweepResult): one row per clamp (a τ, a p, or a set of --clamp-dims dimensions) with
bnprobe's image accuracy and loss, or the named metrics of --eval / --text, each with its change from nothing
clamped, and the notes below it. Computes nothing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bnprobe.core.errors import printable

# Table columns shown of the user's metrics; ablation.h5 keeps them all.
MAX_COLUMNS = 8


def ablation_table(result: Any, label: str) -> Table:
    """`result`: a bnprobe.analysis.ablate.SweepResult."""
    if result.mode == "threshold":
        what = "|γ| < τ·max|γ| per layer" if result.per_layer else "|γ| < τ"
        head = "τ·max" if result.per_layer else "τ"
    elif result.mode == "fraction":
        what = "the smallest p of |γ| in each layer" if result.per_layer else "the globally smallest p of |γ|"
        head = "p"
    else:
        what = "the named dimensions, in every norm layer of their width"
        head = "dimensions"
    table = Table(title=f"Clamp-to-zero ablation — {escape(printable(label))}: γ := 0 where {what}",
                  box=box.SIMPLE_HEAD)
    table.add_column(head, justify="left" if result.mode == "dims" else "right", no_wrap=result.mode != "dims")
    table.add_column("clamped", justify="right", no_wrap=True)
    if result.evaluation == "images":
        splits = [s for s in ("test", "train") if f"{s}_acc" in result.metrics]
        for split in splits:
            table.add_column(f"{split} acc (Δ)", justify="right", no_wrap=True)
            table.add_column("loss", justify="right", no_wrap=True)
        cells = lambda metrics, baseline: _image_cells(result, splits, metrics, baseline)  # noqa: E731
    else:
        names = list(result.baseline)[:MAX_COLUMNS]
        for name in names:
            table.add_column(f"{escape(printable(name))} (Δ)", justify="right", no_wrap=True)
        cells = lambda metrics, baseline: [  # noqa: E731
            f"{metrics[n]:.5g}" + ("" if baseline else f" ({metrics[n] - result.baseline[n]:+.3g})") for n in names]

    table.add_row("none", "0 (0.0%)", *cells(result.baseline, True), style="dim")
    n = max(1, result.total_channels)
    for i, value in enumerate(result.values):
        metrics = {k: float(v[i]) for k, v in result.metrics.items()}
        first = escape(result.labels[i]) if result.mode == "dims" else f"{value:.4g}"
        table.add_row(first, f"{int(result.clamped[i]):,} ({result.clamped[i] / n:.1%})", *cells(metrics, False))
    caption = (f"clamped: channels (and share) of the {result.total_channels:,} norm channels in "
               f"{len(result.layer_names)} layers; ")
    if result.evaluation == "images":
        caption += "Δ: accuracy change in percentage points vs. no clamping"
    else:
        caption += "Δ: change vs. no clamping"
        if len(result.baseline) > MAX_COLUMNS:
            caption += f" ({len(result.baseline) - MAX_COLUMNS} more metrics in the file)"
    table.caption = caption
    return table


def _image_cells(result: Any, splits: list[str], metrics: dict[str, float], baseline: bool) -> list[str]:
    row = []
    for split in splits:
        acc, loss = metrics[f"{split}_acc"], metrics[f"{split}_loss"]
        delta = acc - result.baseline[f"{split}_acc"]
        text = f"{100 * delta:+6.2f}"
        if abs(delta) >= 5e-4:
            text = f"[{'red' if delta < 0 else 'green'}]{text}[/]"
        row += [f"{acc:7.2%}" + ("        " if baseline else f" ({text})"), f"{loss:.4f}"]
    return row


def clamped_layers_line(result: Any) -> str:
    """Which layers --clamp-dims clamped: those of the widths named, by name (the rest untouched)."""
    hit = [i for i in range(len(result.layer_names)) if result.clamped_per_layer[:, i].any()]
    widths = sorted({result.layer_channels[i] for i in hit})
    names = [printable(result.layer_names[i]) for i in hit]
    shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
    return (f"--clamp-dims clamped {len(hit)} of {len(result.layer_names)} norm layers (width "
            f"{', '.join(map(str, widths))}): {shown}")


def present_ablation(result: Any, label: str, note: str, out: Path, console: Any) -> None:
    """Everything `bnprobe ablate` prints once the sweep is measured: the table, how β and the layers were handled
    (`note`: folded or in place, images or --eval), the layers --clamp-dims hit, the file written."""
    console.print(ablation_table(result, label))
    beta = ("zeroed too (--zero-beta): each clamped channel outputs 0" if result.zero_beta
            else "kept: each clamped channel outputs its constant β (pass --zero-beta to zero it)")
    console.print(
        f"β of clamped channels {beta}. {note} "
        f"{len(result.values)} row(s): {result.evaluations} evaluation(s) with the baseline, in {result.seconds:.1f} s "
        f"(identical clamp sets are evaluated once).",
        soft_wrap=True,
    )
    if result.mode == "dims":
        console.print(clamped_layers_line(result), soft_wrap=True, markup=False)
    console.print(f"Wrote [bold]{out}[/]")


@contextmanager
def sweep_progress(labels: Sequence[str], console: Any) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """A transient progress bar over the rows (`labels`; none for a single row), and the callback that advances it
    with the row's first metric."""
    progress = Progress(
        TextColumn("[bold blue]clamp sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, transient=True,
        disable=len(labels) < 2,
    )
    with progress:
        task = progress.add_task("sweep", total=len(labels), status="")
        yield lambda i, row: progress.update(task, advance=1, status=f"{labels[i]}: {_first_metric(row)}")


def _first_metric(row: dict[str, float]) -> str:
    name, value = next(iter(row.items()))
    return f"{name} {value:.4g}"
