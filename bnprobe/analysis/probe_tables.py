"""The probe's terminal tables: a summary with a column per checkpoint, γ and β by depth (laid out to fit the
console), and ReLU sparsity per call site."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.analysis.probe_results import QUANTILE_LEVELS, RECURRING_MIN_LAYERS, ProbeResult, histograms, layer_mean
from bnprobe.core.errors import printable
from bnprobe.core.formats import BATCHNORM, PROBE_NORM_KINDS, SCALE_ONLY, SCALE_SHIFT
from bnprobe.core.measures import histogram_edges


def shown(text: str) -> str:
    """A name from a file (a layer, a tensor, a checkpoint's label) as rich prints it: control characters
    escaped (bnprobe.core.errors.printable), and brackets too, so none is taken for markup."""
    from rich.markup import escape

    return escape(printable(text))


def sparkline(counts: np.ndarray) -> str:
    """A histogram as one line of block characters, for the terminal table."""
    blocks = " ▁▂▃▄▅▆▇█"
    top = counts.max() if counts.size else 0
    if not top:
        return " " * len(counts)
    return "".join(blocks[int(np.ceil(c / top * (len(blocks) - 1)))] for c in counts)


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def _num(x: float, spec: str = ".3f") -> str:
    return "-" if x != x else format(x, spec)


def _pct_short(x: float) -> str:
    """A fraction as a whole percentage, at most 4 characters; never rounds a non-zero fraction to 0% or a
    fraction short of 1 to 100%."""
    if x != x:
        return "-"
    if 0 < x < 0.005:
        return "<1%"
    if 0.995 <= x < 1:
        return ">99%"
    return f"{100 * x:.0f}%"


def _table_width(table: Any) -> int:
    """Columns `table` takes when nothing has to be wrapped or cut."""
    from io import StringIO

    from rich.console import Console

    return Console(file=StringIO(), width=100_000).measure(table).maximum


def widest_rows(rows: Sequence[Sequence[str]]) -> list[int]:
    """The rows that a table's measurement depends on: per column, the one whose cell is widest and the one whose
    longest word is (rich measures a column by the largest of each, over its cells: a table of these rows alone
    measures as the whole table does, and a table of 161 layers is measured in a tenth of the time)."""
    from rich.cells import cell_len
    from rich.markup import render

    if not rows:
        return []
    plain = [[render(cell).plain for cell in row] for row in rows]
    picked = set()
    for column in range(len(plain[0])):
        texts = [row[column] for row in plain]
        widths = [max((cell_len(line) for line in text.splitlines()), default=0) for text in texts]
        words = [max((cell_len(word) for word in text.split()), default=0) for text in texts]
        picked.update((widths.index(max(widths)), words.index(max(words))))
    return sorted(picked)


KIND_SHORT = {BATCHNORM: "BN", SCALE_SHIFT: "LN/GN", SCALE_ONLY: "RMS"}
RECURRING_SHOWN = 20  # rows of the recurring-dimensions table; probe.h5 has them all


def _outlier_cell(dims: np.ndarray, shown_dims: int = 2) -> str:
    """`3: 1415,2533 +1`: how many, and the first few (never "…": that would read as a number cut short)."""
    if not len(dims):
        return "0"
    more = f" +{len(dims) - shown_dims}" if len(dims) > shown_dims else ""
    return f"{len(dims)}: " + ",".join(str(d) for d in dims[:shown_dims]) + more


def _layer_columns(r: ProbeResult, off_threshold: float, edges: np.ndarray,
                   outlier_factor: float) -> tuple[str, str, str, list, list]:
    """(title, name header, caption, columns before the τ ones, columns after), a column being (header,
    justify, cell of layer i). BatchNorm alone: the table as it always was; any other norm: the |γ| distribution
    and outlier dimensions instead of the histogram and β ≤ 0."""
    g, b = r.bn.gamma, r.bn.beta
    off = r.bn.off(off_threshold)
    beta = lambda i: _num(layer_mean(b[i]), "+.3f")  # noqa: E731
    if r.bn.only_batchnorm:
        dead, hists = r.bn.off_dead(off_threshold), histograms(g, edges)
        caption = (f"|γ|, β: means over the layer's channels; γ histogram: 12 bins over [{edges[0]:.2f}, {edges[-1]:.2f}], shared by all layers; "
                   f"<τ: fraction |γ| < τ; off: |γ| < {off_threshold:g}; β≤0: off with β ≤ 0")
        return (f"γ and β by depth — {shown(r.label)}", "BN layer", caption,
                [("C", "right", lambda i: str(g[i].size)), ("|γ|", "right", lambda i: _num(layer_mean(np.abs(g[i])))),
                 ("γ histogram", "left", lambda i: sparkline(hists[i]))],
                [("off", "right", lambda i: str(off[i])), ("β≤0", "right", lambda i: str(dead[i])),
                 ("β", "right", beta)])
    quantiles, outliers = r.bn.abs_quantiles(), r.bn.outliers(outlier_factor)
    median, top = QUANTILE_LEVELS.index(0.5), QUANTILE_LEVELS.index(1.0)
    caption = (f"kind: see the note below; |γ|: median and largest over the layer's channels; outliers: dimensions "
               f"with |γ| > {outlier_factor:g}x the median (how many: the first); <τ: fraction |γ| < τ; off: |γ| < "
               f"{off_threshold:g}; β: mean (- where none)")
    return (f"|γ| by depth — {shown(r.label)}", "layer", caption,
            [("kind", "left", lambda i: KIND_SHORT[r.bn.kinds[i]]), ("C", "right", lambda i: str(g[i].size)),
             ("med |γ|", "right", lambda i: _num(quantiles[i, median], ".3g")),
             ("max |γ|", "right", lambda i: _num(quantiles[i, top], ".3g")),
             ("outliers", "left", lambda i: _outlier_cell(outliers[i]))],
            [("off", "right", lambda i: str(off[i])), ("β", "right", beta)])


def layer_tables(r: ProbeResult, taus: Sequence[float], off_threshold: float, edges: np.ndarray,
                 width: Optional[int] = None, outlier_factor: float = 10.0) -> list:
    """One checkpoint's per-layer tables: "γ and β by depth" (BatchNorm alone) or "|γ| by depth" (other norms),
    with a column per τ when that fits in `width` columns (None: no limit), else the τ columns in tables of their
    own ("|γ| < τ by depth"), as many as it takes. Numbers are never wrapped; only the layer names fold, and only
    when a name alone is too wide."""
    from rich import box
    from rich.table import Table

    below = r.bn.frac_below(taus)
    title, name_header, caption, before, after = _layer_columns(r, off_threshold, edges, outlier_factor)

    # Each row's cells once: #, name, the columns before the τ ones, one per τ, those after.
    rows = [(str(i), shown(name), [cell(i) for _, _, cell in before], [_pct_short(below[i][k]) for k in range(len(taus))],
             [cell(i) for _, _, cell in after]) for i, name in enumerate(r.bn.names)]

    def table(title: str, tau_columns: Sequence[int], main: bool, only: Optional[Sequence[int]] = None) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, caption=caption if main else None, collapse_padding=True,
                  show_edge=False, pad_edge=False)
        t.add_column("#", justify="right", no_wrap=True)
        t.add_column(name_header, justify="left", overflow="fold")
        columns = [*before, *((f"<{taus[k]:g}", "right", None) for k in tau_columns), *after] if main else [
            (f"<{taus[k]:g}", "right", None) for k in tau_columns]
        for header, justify, _ in columns:
            t.add_column(header, justify=justify, no_wrap=True)
        for i in range(len(rows)) if only is None else only:
            number, name, first, tau_cells, last = rows[i]
            taus_cells = [tau_cells[k] for k in tau_columns]
            t.add_row(number, name, *([*first, *taus_cells, *last] if main else taus_cells))
        return t

    # Widths are measured on the rows that decide them (widest_rows), not on every layer.
    widest = widest_rows([[number, name, *first, *tau_cells, *last] for number, name, first, tau_cells, last in rows])
    every = table(title, range(len(taus)), main=True)
    if width is None or _table_width(table(title, range(len(taus)), True, widest)) <= width or not taus:
        return [every]
    tables = [table(title, [], main=True)]
    chunk: list[int] = []
    for k in range(len(taus)):
        # Greedy: as many τ columns per table as fit (at least one, however narrow the console).
        if chunk and _table_width(table("", chunk + [k], False, widest)) > width:
            tables.append(chunk)
            chunk = []
        chunk.append(k)
    tables.append(chunk)
    return [tables[0]] + [table(f"|γ| < τ by depth — {shown(r.label)}", c, main=False) for c in tables[1:]]


def _dims_table(title: str, caption: str, headers: Sequence[str]) -> Any:
    """A table of dimensions recurring over layers: numbers right-aligned, the last column (layer names or
    depths) left-aligned and folded."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, caption=caption, collapse_padding=True, show_edge=False,
              pad_edge=False)
    for header in headers:
        last = header == headers[-1]
        t.add_column(header, justify="left" if last else "right", no_wrap=not last, overflow="fold")
    return t


def recurring_table(r: ProbeResult, outlier_factor: float) -> Optional[Any]:
    """The dimensions that are outliers in several layers of one width (none: None), most layers first."""
    recurring = r.bn.recurring(r.bn.outliers(outlier_factor))
    if not len(recurring.dim):
        return None
    more = len(recurring.dim) - RECURRING_SHOWN
    t = _dims_table(f"Outlier dimensions in several layers — {shown(r.label)}",
                    f"|γ| > {outlier_factor:g}x the layer's median |γ| in {RECURRING_MIN_LAYERS} or more layers of "
                    f"one width; largest |γ| over them, at that layer" + (
                        f"; {more:,} more in probe.h5 (recurring/)" if more > 0 else ""),
                    ("width", "dim", "layers", "largest |γ|", "at"))
    for k in range(min(len(recurring.dim), RECURRING_SHOWN)):
        t.add_row(str(recurring.width[k]), str(recurring.dim[k]), f"{recurring.layers[k]} of {recurring.of_layers[k]}",
                  _num(recurring.max_abs_gamma[k], ".3g"), shown(r.bn.names[recurring.at[k]]))
    return t


def _depths_cell(r: ProbeResult, depths: np.ndarray, shown_layers: int = 3) -> str:
    """`4, 9, 17 +5` (depths), with the first layer's name when it is alone."""
    if len(depths) == 1:
        return f"{depths[0]} ({shown(r.bn.names[depths[0]])})"
    more = f" +{len(depths) - shown_layers}" if len(depths) > shown_layers else ""
    return ", ".join(str(d) for d in depths[:shown_layers]) + more


def recurring_off_table(r: ProbeResult, off_threshold: float) -> Optional[Any]:
    """The dimensions off in several layers of one width (none: None), most layers first."""
    off = r.bn.recurring_off(off_threshold)
    if not len(off.dim):
        return None
    more = len(off.dim) - RECURRING_SHOWN
    t = _dims_table(f"Dimensions off in several layers — {shown(r.label)}",
                    f"|γ| < {off_threshold:g} at the same index in {RECURRING_MIN_LAYERS} or more layers of one "
                    f"width; where: the layers' depths (#)" + (
                        f"; {more:,} more in probe.h5 (recurring_off/)" if more > 0 else ""),
                    ("width", "dim", "layers", "where"))
    for k in range(min(len(off.dim), RECURRING_SHOWN)):
        t.add_row(str(off.width[k]), str(off.dim[k]), f"{off.layers[k]} of {off.of_layers[k]}",
                  _depths_cell(r, off.where[k]))
    return t


def _kinds_cell(r: ProbeResult) -> str:
    counts = {kind: r.bn.kinds.count(kind) for kind in PROBE_NORM_KINDS}
    return ", ".join(f"{n} {KIND_SHORT[kind]}" for kind, n in counts.items() if n) or "-"


def _outliers_cell(r: ProbeResult, outlier_factor: float) -> str:
    outliers = r.bn.outliers(outlier_factor)
    total, layers = sum(len(dims) for dims in outliers), sum(1 for dims in outliers if len(dims))
    return f"{total:,} in {layers} layer{'s' if layers > 1 else ''}" if total else "0"


def probe_tables(results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float, brief: bool,
                 width: Optional[int] = None, outlier_factor: float = 10.0) -> list:
    """The terminal tables; per-layer ones are laid out to fit `width` columns (None: no limit). Where a
    checkpoint has a norm other than BatchNorm: its kinds, |γ| distribution and outlier dimensions too."""
    tables = [summary_table(results, taus, off_threshold, outlier_factor)]
    if brief or not results:
        return tables
    same_layers = all(r.bn.names == results[0].bn.names for r in results)
    edges = histogram_edges([g for r in results for g in r.bn.gamma], 12)
    if len(results) == 1 or not same_layers:
        for r in (r for r in results if r.bn.names):
            tables.extend(layer_tables(r, taus, off_threshold, edges, width, outlier_factor))
    else:
        tables.append(depth_comparison_table(results, off_threshold))
    for r in results:
        if not r.bn.only_batchnorm:
            tables.extend(t for t in (recurring_table(r, outlier_factor), recurring_off_table(r, off_threshold))
                          if t is not None)
    return tables + relu_tables(results)


def summary_table(results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float,
                  outlier_factor: float) -> Any:
    """One column per checkpoint, so BN-only and full models sit side by side."""
    from rich import box
    from rich.table import Table

    only_bn = all(r.bn.only_batchnorm for r in results)
    summary = Table(title=("BatchNorm probe" if only_bn else "Normalisation probe")
                    + (" — comparison" if len(results) > 1 else ""), box=box.SIMPLE_HEAD)
    summary.add_column("", style="bold", no_wrap=True)
    for r in results:
        summary.add_column(shown(r.label), justify="right", overflow="fold")
    for name, cells in summary_rows(results, taus, off_threshold, outlier_factor):
        summary.add_row(name, *cells)
    return summary


def summary_rows(results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float,
                 outlier_factor: float) -> list[tuple[str, list[str]]]:
    """The summary's rows: (heading, one cell per checkpoint)."""
    only_bn = all(r.bn.only_batchnorm for r in results)
    stats = [r.summary(taus, off_threshold) for r in results]
    measured = [r for r in results if r.forward_pass]  # a file probed alone has no ReLU sparsity
    images = measured[0].images if measured else 0
    return [
        ("model", [shown(str(r.attrs.get("model", "" if r.forward_pass else "(file only)"))) for r in results]),
        ("freeze", [shown(str(r.attrs.get("freeze", "-"))) for r in results]),
        (f"accuracy ({images} test images)" if measured else "accuracy (no forward pass)",
         [_pct(r.accuracy) for r in results]),
        ("BN layers / channels" if only_bn else "norm layers / channels",
         [f"{s['bn_layers']} / {s['bn_channels']:,}" for s in stats]),
        *([] if only_bn else [("kinds", [_kinds_cell(r) for r in results])]),
        ("mean |γ|  (median)", [f"{_num(s['mean_abs_gamma'])}  ({_num(s['median_abs_gamma'])})" for s in stats]),
        *((f"|γ| < {t:g}", [_pct(s["frac_below"][k]) for s in stats]) for k, t in enumerate(taus)),
        (f"off: |γ| < {off_threshold:g}", [f"{s['off']:,}" for s in stats]),
        ("off and β ≤ 0", [f"{s['off_dead']:,}" for s in stats]),
        *([] if only_bn else [
            (f"outliers: |γ| > {outlier_factor:g}x median", [_outliers_cell(r, outlier_factor) for r in results]),
            ("in several layers", [f"{len(r.bn.recurring(r.bn.outliers(outlier_factor)).dim):,} dims"
                                   for r in results]),
            ("off in several layers", [f"{len(r.bn.recurring_off(off_threshold).dim):,} dims" for r in results])]),
        ("ReLU outputs = 0", [_pct(s["zero_fraction"]) for s in stats]),
        ("dead ReLU channels", [f"{s['dead_channels']:,} of {s['relu_channels']:,}" if r.forward_pass else "-"
                                for r, s in zip(results, stats)]),
    ]


def depth_comparison_table(results: Sequence[ProbeResult], off_threshold: float) -> Any:
    """Checkpoints with the same layers, side by side: per depth, each one's mean |γ| and channels off."""
    from rich import box
    from rich.table import Table

    only_bn = all(r.bn.only_batchnorm for r in results)
    table = Table(title=f"γ by depth: mean |γ| / channels off (|γ| < {off_threshold:g})", box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right")
    table.add_column("BN layer" if only_bn else "layer", no_wrap=True)
    table.add_column("C", justify="right")
    for r in results:
        table.add_column(shown(r.label), justify="right", overflow="fold")
    offs = [r.bn.off(off_threshold) for r in results]
    for i, name in enumerate(results[0].bn.names):
        cells = [f"{_num(layer_mean(np.abs(r.bn.gamma[i])))} / {off[i]}" for r, off in zip(results, offs)]
        table.add_row(str(i), shown(name), str(results[0].bn.gamma[i].size), *cells)
    return table


def relu_tables(results: Sequence[ProbeResult]) -> list:
    """ReLU output sparsity per call site: a table per checkpoint, or one with a column per checkpoint when they
    share their call sites (none without a forward pass)."""
    from rich import box
    from rich.table import Table

    measured = [r for r in results if r.forward_pass]
    same_sites = all([s.name for s in r.sites] == [s.name for s in measured[0].sites] for r in measured)
    tables = []
    if len(measured) == 1 or (measured and not same_sites):
        for r in measured:
            table = Table(title=f"ReLU output sparsity — {shown(r.label)} ({r.images} test images)",
                          box=box.SIMPLE_HEAD)
            for column in ("ReLU call", "input", "C", "zeros", "dead"):
                table.add_column(column, justify="left" if column in ("ReLU call", "input") else "right",
                                 no_wrap=column != "input")
            for s in r.sites:
                table.add_row(shown(s.name), shown(s.input), str(s.channels), _pct(s.zero_fraction), str(s.dead))
            tables.append(table)
    elif measured:
        table = Table(title=f"ReLU output sparsity per call ({measured[0].images} test images): zeros / dead "
                            f"channels", box=box.SIMPLE_HEAD)
        table.add_column("ReLU call", no_wrap=True)
        table.add_column("input")
        for r in measured:
            table.add_column(shown(r.label), justify="right", overflow="fold")
        for i, site in enumerate(measured[0].sites):
            table.add_row(shown(site.name), shown(site.input),
                          *(f"{_pct(r.sites[i].zero_fraction)} / {r.sites[i].dead}" for r in measured))
        tables.append(table)
    return tables
