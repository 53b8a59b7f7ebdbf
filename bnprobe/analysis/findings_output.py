"""The findings (bnprobe.analysis.findings' results) as people and programs read them: numbers as text (`show`,
`sentence`), rich tables for the terminal, and the JSON file (format bnprobe-findings). Computes nothing.

It takes the results by their attributes and does not import bnprobe.analysis.findings, which still hands
`tables`, `write_json` and `check_json_output` on to the command line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from bnprobe.analysis.seed_statistics import CONFIDENCE, Estimate, Row
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.files import schema
from bnprobe.files.atomic import atomic_write

FORMAT = "bnprobe-findings"


def show(value: Optional[Estimate], unit: str, signed: bool = False, n: bool = True) -> str:
    """`71.2% [68.0, 74.4] (n = 3)`, `98.0% [93.1, 100.0] clipped (n = 3)`, or `71.2% (n = 1)`; differences of
    fractions are in points."""
    if value is None:
        return "–"

    def number(x: float, sign: bool = signed) -> str:
        if not math.isfinite(x):
            return "–"
        plus = "+" if sign else ""
        # Rounded first, then + 0.0: a bound such as -0.0004 is printed "0.0", not "-0.0" (-0.0 + 0.0 is 0.0).
        if unit == "pct":
            return f"{round(100 * x, 1) + 0.0:{plus}.1f}"
        if unit == "count":
            return f"{round(x) + 0.0:{plus},.0f}"
        return f"{x + 0.0:{plus}.3g}"

    suffix = (" points" if signed else "%") if unit == "pct" else ""
    interval = f" [{number(value.low, False)}, {number(value.high, False)}]" if value.low is not None else ""
    interval += " clipped" if value.clipped else ""  # to the values the quantity can take
    return f"{number(value.mean)}{suffix}{interval}" + (f" (n = {value.n})" if n else "")


def p_value(p: Optional[float]) -> str:
    """`= 0.018`, `< 0.0001`, or `= –` (not computable: no spread at all)."""
    if p is None or not math.isfinite(p):
        return "= –"
    return f"= {p:.2g}" if p >= 1e-4 else "< 0.0001"


def sentence(row: Row) -> str:
    """The row as one sentence, every number from this row."""
    a_label, b_label = row.labels
    text = f"{row.metric}: {a_label + ' ' if a_label else ''}{show(row.a, row.unit)}"
    if row.b is not None:
        text += f" vs {b_label + ' ' if b_label else ''}{show(row.b, row.unit)}"
    if row.difference is not None:
        text += f"; difference {show(row.difference, row.unit, signed=True)}"
    if row.test:
        text += f"; {row.test}, p {p_value(row.p)}"
    if row.note:
        text += f" ({row.note})"
    return text + "."


# ---- the JSON file ---------------------------------------------------------------------------------------------


def findings_json(findings) -> dict[str, Any]:
    """The document `write_json` writes, from a bnprobe.analysis.findings.Findings."""
    return _finite_or_none({
        "format": FORMAT, "version": 1, "confidence": CONFIDENCE,
        "groups": [{"label": g.label, "runs": [run.name for run in g.runs], "seeds": g.seeds, "repeats": g.repeats,
                    "settings": dict((name, json.loads(value)) for name, value in g.key),
                    "summary": {name: asdict(e) for name, e in g.summary().items()}} for g in findings.groups],
        "findings": [{"kind": f.kind, "title": f.title,
                      "rows": [{**asdict(row), "sentence": sentence(row)} for row in f.rows]}
                     for f in findings.findings],
    })


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: a number that is not finite (a metric a run did not record) is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_path(report: Path) -> Path:
    """Where a report's findings go: report.pdf -> report.findings.json, beside it."""
    return report.with_name(f"{report.stem}.findings.json")


def check_json_output(path: Path) -> None:
    """Replace only a findings file (or nothing): never a file bnprobe did not write as one, nor write one
    inside a run directory."""
    schema.check_outside_runs(path)
    if not os.path.lexists(path):
        return
    try:
        stored = schema.read_json(path)  # a FIFO or device is refused unopened
        ours = isinstance(stored, dict) and stored.get("format") == FORMAT
    except BnprobeError:
        ours = False
    if not ours:
        raise BnprobeError(f"will not replace {path}: it is not a findings file bnprobe wrote; move it away")


def write_json(findings, path: Path) -> None:
    """`findings` (a bnprobe.analysis.findings.Findings) to `path`, atomically, after check_json_output."""
    check_json_output(path)
    text = json.dumps(findings_json(findings), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---- the terminal ----------------------------------------------------------------------------------------------


def tables(findings) -> list:
    """The findings as rich tables, for the terminal: the groups, then each finding (their labels hold settings
    from the runs' config.json: printed escaped)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    out = []
    groups = Table(title="Runs grouped by seed: mean [95% interval]", box=box.SIMPLE_HEAD)
    groups.add_column("group", overflow="fold", min_width=20)
    for header in ("seeds", "test accuracy", "gap (train − test)"):  # fits 80 columns; the JSON has the rest
        groups.add_column(header, no_wrap=True)
    for g in findings.groups:
        summary = g.summary()
        groups.add_row(escape(printable(g.label)), ", ".join(map(str, g.seeds)), *(
            show(summary.get(m), "pct", n=False) for m in ("test accuracy", "gap (train − test accuracy)")))
    out.append(groups)
    for f in findings.findings:
        table = Table(title=escape(printable(f"{f.kind}: {f.title}")), box=box.SIMPLE_HEAD, show_header=False)
        table.add_column("finding", overflow="fold")
        for row in f.rows:
            table.add_row(escape(printable(sentence(row))))
        out.append(table)
    return out
