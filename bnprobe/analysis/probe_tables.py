"""The probe's terminal tables: a summary with a column per checkpoint, γ and β by depth (laid out to fit the
console), and ReLU sparsity per call site."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.analysis.measured import ProbeResult, histograms, layer_mean
from bnprobe.core.errors import printable
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


def layer_tables(r: ProbeResult, taus: Sequence[float], off_threshold: float, edges: np.ndarray,
                 width: Optional[int] = None) -> list:
    """One checkpoint's per-layer tables: "γ and β by depth", with a column per τ when that fits in `width`
    columns (None: no limit), else the τ columns in tables of their own ("|γ| < τ by depth"), as many as it
    takes. Numbers are never wrapped; only the layer names fold, and only when a name alone is too wide."""
    from rich import box
    from rich.table import Table

    below, off, dead = r.bn.frac_below(taus), r.bn.off(off_threshold), r.bn.off_dead(off_threshold)
    hists = histograms(r.bn.gamma, edges)
    caption = (f"|γ|, β: means over the layer's channels; γ histogram: 12 bins over [{edges[0]:.2f}, {edges[-1]:.2f}], shared by all layers; "
               f"<τ: fraction |γ| < τ; off: |γ| < {off_threshold:g}; β≤0: off with β ≤ 0")

    def table(title: str, tau_columns: Sequence[int], main: bool) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, caption=caption if main else None, collapse_padding=True,
                  show_edge=False, pad_edge=False)
        t.add_column("#", justify="right", no_wrap=True)
        t.add_column("BN layer", justify="left", overflow="fold")
        if main:
            for column in ("C", "|γ|", "γ histogram"):
                t.add_column(column, justify="left" if column == "γ histogram" else "right", no_wrap=True)
        for k in tau_columns:
            t.add_column(f"<{taus[k]:g}", justify="right", no_wrap=True)
        if main:
            for column in ("off", "β≤0", "β"):
                t.add_column(column, justify="right", no_wrap=True)
        for i, name in enumerate(r.bn.names):
            g, b = r.bn.gamma[i], r.bn.beta[i]
            taus_cells = [_pct_short(below[i][k]) for k in tau_columns]
            if main:
                t.add_row(str(i), shown(name), str(g.size), _num(layer_mean(np.abs(g))), sparkline(hists[i]),
                          *taus_cells, str(off[i]), str(dead[i]), _num(layer_mean(b), "+.3f"))
            else:
                t.add_row(str(i), shown(name), *taus_cells)
        return t

    title = f"γ and β by depth — {shown(r.label)}"
    every = table(title, range(len(taus)), main=True)
    if width is None or _table_width(every) <= width or not taus:
        return [every]
    tables = [table(title, [], main=True)]
    chunk: list[int] = []
    for k in range(len(taus)):
        # Greedy: as many τ columns per table as fit (at least one, however narrow the console).
        if chunk and _table_width(table("", chunk + [k], main=False)) > width:
            tables.append(chunk)
            chunk = []
        chunk.append(k)
    tables.append(chunk)
    return [tables[0]] + [table(f"|γ| < τ by depth — {shown(r.label)}", c, main=False) for c in tables[1:]]


def probe_tables(results: Sequence[ProbeResult], taus: Sequence[float], off_threshold: float, brief: bool,
                 width: Optional[int] = None) -> list:
    """The terminal tables; per-layer ones are laid out to fit `width` columns (None: no limit)."""
    from rich import box
    from rich.table import Table

    tables = []
    # Summary: one column per checkpoint, so BN-only and full models sit side by side.
    summary = Table(title="BatchNorm probe" + (" — comparison" if len(results) > 1 else ""), box=box.SIMPLE_HEAD)
    summary.add_column("", style="bold", no_wrap=True)
    for r in results:
        summary.add_column(shown(r.label), justify="right", overflow="fold")
    stats = [r.summary(taus, off_threshold) for r in results]
    measured = [r for r in results if r.forward_pass]  # a file probed alone has no ReLU sparsity
    images = measured[0].images if measured else 0
    rows = [
        ("model", [shown(str(r.attrs.get("model", "" if r.forward_pass else "(file only)"))) for r in results]),
        ("freeze", [shown(str(r.attrs.get("freeze", "-"))) for r in results]),
        (f"accuracy ({images} test images)" if measured else "accuracy (no forward pass)",
         [_pct(r.accuracy) for r in results]),
        ("BN layers / channels", [f"{s['bn_layers']} / {s['bn_channels']:,}" for s in stats]),
        ("mean |γ|  (median)", [f"{_num(s['mean_abs_gamma'])}  ({_num(s['median_abs_gamma'])})" for s in stats]),
        *((f"|γ| < {t:g}", [_pct(s["frac_below"][k]) for s in stats]) for k, t in enumerate(taus)),
        (f"off: |γ| < {off_threshold:g}", [f"{s['off']:,}" for s in stats]),
        ("off and β ≤ 0", [f"{s['off_dead']:,}" for s in stats]),
        ("ReLU outputs = 0", [_pct(s["zero_fraction"]) for s in stats]),
        ("dead ReLU channels", [f"{s['dead_channels']:,} of {s['relu_channels']:,}" if r.forward_pass else "-"
                                for r, s in zip(results, stats)]),
    ]
    for name, cells in rows:
        summary.add_row(name, *cells)
    tables.append(summary)
    if brief or not results:
        return tables

    same_layers = all(r.bn.names == results[0].bn.names for r in results)
    same_sites = all([s.name for s in r.sites] == [s.name for s in measured[0].sites] for r in measured)
    edges = histogram_edges([g for r in results for g in r.bn.gamma], 12)
    if len(results) == 1 or not same_layers:
        for r in (r for r in results if r.bn.names):
            tables.extend(layer_tables(r, taus, off_threshold, edges, width))
    else:
        table = Table(title=f"γ by depth: mean |γ| / channels off (|γ| < {off_threshold:g})", box=box.SIMPLE_HEAD)
        table.add_column("#", justify="right")
        table.add_column("BN layer", no_wrap=True)
        table.add_column("C", justify="right")
        for r in results:
            table.add_column(shown(r.label), justify="right", overflow="fold")
        offs = [r.bn.off(off_threshold) for r in results]
        for i, name in enumerate(results[0].bn.names):
            cells = [f"{_num(layer_mean(np.abs(r.bn.gamma[i])))} / {off[i]}" for r, off in zip(results, offs)]
            table.add_row(str(i), shown(name), str(results[0].bn.gamma[i].size), *cells)
        tables.append(table)

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
        table = Table(title=f"ReLU output sparsity per call ({images} test images): zeros / dead channels",
                      box=box.SIMPLE_HEAD)
        table.add_column("ReLU call", no_wrap=True)
        table.add_column("input")
        for r in measured:
            table.add_column(shown(r.label), justify="right", overflow="fold")
        for i, site in enumerate(measured[0].sites):
            table.add_row(shown(site.name), shown(site.input),
                          *(f"{_pct(r.sites[i].zero_fraction)} / {r.sites[i].dead}" for r in measured))
        tables.append(table)
    return tables


