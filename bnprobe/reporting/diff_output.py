"""`bnprobe diff`'s presenters over one DiffResult: a table for the terminal and the JSON document (format
bnprobe-diff, docs/check-schema.md). Nothing here computes or writes."""

from __future__ import annotations

import json
import math
from io import StringIO
from typing import TYPE_CHECKING, Any, Optional

from bnprobe import __version__
from bnprobe.core.errors import printable
from bnprobe.core.formats import DIFF_FORMAT, DIFF_VERSION

if TYPE_CHECKING:  # the results' type only: diff.py reads checkpoints (the presenters stay light)
    from bnprobe.analysis.diff import DiffResult, LayerDiff, Side

KIND_SHORT = {"BatchNorm": "BN", "LayerNorm/GroupNorm-like": "LN/GN", "RMSNorm-like": "RMS"}


def _shown(text: str) -> str:
    from rich.markup import escape

    return escape(printable(text))


def _num(x: float, spec: str = ".3g") -> str:
    return "-" if x != x else "inf" if x == math.inf else format(x, spec)


def _dims(dims: list[int], shown: int = 3) -> str:
    if not dims:
        return "0"
    more = f" +{len(dims) - shown}" if len(dims) > shown else ""
    return f"{len(dims)}: " + ",".join(str(d) for d in dims[:shown]) + more


def _plus_minus(up: list[int], down: list[int]) -> str:
    return "0" if not up and not down else f"+{len(up)} −{len(down)}"


def diff_tables(result: "DiffResult") -> list[Any]:
    """Per layer what changed, then the layers that changed most."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"What changed in the norm layers — {_shown(result.a.label)} → {_shown(result.b.label)}",
                  box=box.SIMPLE_HEAD, collapse_padding=True, show_edge=False, pad_edge=False,
                  caption=f"Δγ, Δβ: ‖B − A‖ / ‖A‖ (‖B − A‖ alone, in ‖ ‖, where A is 0); max |Δ|: over γ and β, at that channel; r(γ): correlation of γ in "
                          f"A and B; off: channels whose |γ| fell below {result.off_threshold:g} (+) or rose above "
                          f"it (−); outliers: dimensions with |γ| > {result.outlier_factor:g}x the layer's median "
                          f"that appeared (+) or vanished (−)")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("layer", overflow="fold")
    for header in ("kind", "C", "Δγ", "Δβ", "max |Δ|", "r(γ)", "off", "outliers"):
        table.add_column(header, justify="left" if header == "kind" else "right", no_wrap=True)
    for k, d in enumerate(result.layers):
        at = "" if d.max_at_param is None else f" ({'γ' if d.max_at_param == 'gamma' else 'β'}{d.max_at_dim})"
        table.add_row(str(k), _shown(d.name), KIND_SHORT.get(d.kind, d.kind), str(d.channels), _num(d.rel_gamma),
                      _num(d.rel_beta) if d.rel_beta != math.inf else f"‖{_num(d.delta_beta)}‖", _num(d.max_abs_delta) + at, _num(d.gamma_corr, ".4f"),
                      _plus_minus(d.turned_off, d.turned_on), _plus_minus(d.outliers_appeared, d.outliers_vanished))
    tables: list[Any] = [table]
    most = result.changed_most()
    if len(result.layers) > len(most) and most:  # a short model's table already shows them all
        ranked = Table(title="Changed most (relative change of γ)", box=box.SIMPLE_HEAD, show_edge=False,
                       pad_edge=False, collapse_padding=True)
        for header in ("layer", "Δγ", "turned off", "outliers appeared"):
            ranked.add_column(header, justify="left" if header == "layer" else "right", overflow="fold")
        for d in most:
            ranked.add_row(_shown(d.name), _num(d.rel_gamma), _dims(d.turned_off), _dims(d.outliers_appeared))
        tables.append(ranked)
    return tables


def summary_line(result: "DiffResult") -> str:
    changed = sum(1 for d in result.layers if d.rel_gamma != 0 or (d.rel_beta == d.rel_beta and d.rel_beta != 0))
    off = sum(len(d.turned_off) for d in result.layers)
    on = sum(len(d.turned_on) for d in result.layers)
    top = ", ".join(f"{d.name} ({_num(d.rel_gamma)})" for d in result.changed_most(3))
    return (f"{changed} of {len(result.layers)} norm layers changed their γ or β; {off:,} channels turned off, "
            f"{on:,} turned on" + (f"; γ changed most in {top}" if top else ""))


def _number(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _side(side: "Side") -> dict[str, str]:
    return {"path": side.path, "file": side.file, "label": side.label, "file_format": side.file_format}


def _layer(d: "LayerDiff") -> dict[str, Any]:
    return {"name": d.name, "kind": d.kind, "channels": d.channels, "rel_gamma": _number(d.rel_gamma),
            "rel_beta": _number(d.rel_beta), "delta_gamma": _number(d.delta_gamma),
            "delta_beta": _number(d.delta_beta), "rel_running_mean": _number(d.rel_running_mean),
            "rel_running_var": _number(d.rel_running_var), "max_abs_delta": _number(d.max_abs_delta),
            "max_at_param": d.max_at_param, "max_at_dim": d.max_at_dim, "gamma_corr": _number(d.gamma_corr),
            "turned_off": d.turned_off, "turned_on": d.turned_on, "outliers_appeared": d.outliers_appeared,
            "outliers_vanished": d.outliers_vanished}


def json_document(result: "DiffResult") -> dict[str, Any]:
    """The JSON document (docs/check-schema.md)."""
    return {"format": DIFF_FORMAT, "version": DIFF_VERSION, "bnprobe_version": __version__,
            "a": _side(result.a), "b": _side(result.b), "off_threshold": result.off_threshold,
            "outlier_factor": result.outlier_factor, "layers": [_layer(d) for d in result.layers],
            "changed_most": [d.name for d in result.changed_most()]}


def rendered(result: "DiffResult", output_format: str) -> str:
    """The whole diff as text to write: the tables without colour (160 columns), or JSON."""
    if output_format == "json":
        return json.dumps(json_document(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    from rich.console import Console

    buffer = StringIO()
    plain = Console(file=buffer, width=160, no_color=True, highlight=False)
    for table in diff_tables(result):
        plain.print(table)
    plain.print(summary_line(result), soft_wrap=True)
    return buffer.getvalue()
