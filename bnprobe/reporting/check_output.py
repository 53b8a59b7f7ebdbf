"""`bnprobe check`'s presenters over one CheckResult: text for the terminal (grouped by file, coloured with rich),
JSON (format bnprobe-check, docs/check-schema.md) and SARIF 2.1.0 (the shape GitHub code scanning accepts: the
rules in tool.driver.rules, one result per finding, the file as its physical location and the layer as its
logical one). And the rules' own text: the list, and one rule explained. Nothing here computes or writes."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from bnprobe import __version__
from bnprobe.analysis.rules import RULES, SEVERITIES, Rule
from bnprobe.core.errors import printable
from bnprobe.core.formats import CHECK_FORMAT, CHECK_VERSION
from bnprobe.files.atomic import atomic_write

if TYPE_CHECKING:  # the results' types only: check.py reads checkpoints (the presenters stay light)
    from bnprobe.analysis.check import CheckResult, FileResult, Finding

COLOURS = {"error": "bold red", "warning": "yellow", "note": "cyan"}
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def _shown(text: str) -> str:
    from rich.markup import escape

    return escape(printable(text))


def _plural(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _dims(finding: Finding) -> str:
    if not finding.dims_total:
        return ""
    more = f" +{finding.dims_total - 8}" if finding.dims_total > 8 else ""
    return f" [dim{'s' if finding.dims_total > 1 else ''} {','.join(str(d) for d in finding.dims[:8])}{more}]"


def text_lines(result: CheckResult, colour: bool = True) -> list[str]:
    """rich markup (or, colour=False, plain text): per file its findings, most severe first, then a summary."""
    style = (lambda s, text: f"[{COLOURS[s]}]{text}[/]") if colour else (lambda s, text: text)  # noqa: E731
    bold = (lambda text: f"[bold]{text}[/]") if colour else (lambda text: text)  # noqa: E731
    lines = []
    for f in result.files:
        findings = sorted(f.findings, key=lambda x: (SEVERITIES.index(x.severity), x.depth if x.depth is not None
                                                     else -1, x.code))
        head = f"{bold(_shown(f.path))} — {_plural(f.layers, 'norm layer')}"
        if not findings:
            lines.append(f"{head}: no findings")
            continue
        lines.append(f"{head}, {_plural(len(findings), 'finding')}")
        for x in findings:
            where = "(model)" if x.layer is None else f"{x.depth} {_shown(x.layer)}"
            lines.append(f"  {style(x.severity, x.code)} {style(x.severity, x.severity)} {where}: "
                         f"{_shown(x.message + _dims(x))}")
    counts = ", ".join(style(s, _plural(result.count(s), s)) for s in SEVERITIES)
    verdict = "fails" if result.failed() else "passes"
    lines.append(f"{_plural(len(result.files), 'checkpoint')}, {_plural(len(result.rules), 'rule')}: {counts}; "
                 f"{verdict} --fail-on {result.config.fail_on}")
    return lines


def _json_number(x: float) -> Optional[float]:
    return x if math.isfinite(x) else None


def _finding_json(x: Finding) -> dict[str, Any]:
    return {"code": x.code, "name": x.name, "severity": x.severity, "layer": x.layer, "depth": x.depth,
            "dims": x.dims, "dims_total": x.dims_total, "value": _json_number(x.value),
            "threshold": _json_number(x.threshold), "message": x.message}


def _file_json(f: FileResult) -> dict[str, Any]:
    return {"path": f.path, "file": f.file, "label": f.label, "layers": f.layers,
            "file_format": str(f.attrs.get("file_format", "")), "findings": [_finding_json(x) for x in f.findings]}


def json_document(result: CheckResult) -> dict[str, Any]:
    """The JSON report (docs/check-schema.md)."""
    return {
        "format": CHECK_FORMAT, "version": CHECK_VERSION, "bnprobe_version": __version__,
        "config": {"source": result.config.source, "select": list(result.config.select),
                   "ignore": list(result.config.ignore), "fail_on": result.config.fail_on,
                   "thresholds": {rule.code: result.config.thresholds(rule) for rule in result.rules}},
        "rules": [{"code": r.code, "name": r.name, "severity": r.severity, "summary": r.summary}
                  for r in result.rules],
        "files": [_file_json(f) for f in result.files],
        "summary": {"files": len(result.files), "findings": sum(len(f.findings) for f in result.files),
                    **{s: result.count(s) for s in SEVERITIES}, "failed": result.failed()},
    }


def rule_help(rule: Rule) -> str:
    thresholds = "".join(f"\n- {name} (default {p.default:g}): {p.doc}" for name, p in rule.params.items())
    sources = "".join(f"\n- {source}" for source in rule.sources)
    return (f"{rule.summary}.\n\n{rule.doc}\n\nThresholds:{thresholds or ' none'}\n\nSources:{sources}")


def _uri(path: str) -> str:
    """A file as SARIF names it: relative to the current folder where it lies under it (what code scanning maps
    to the repository), else an absolute file URI."""
    absolute = Path(os.path.abspath(path))
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return absolute.as_uri()


def _fingerprint(f: FileResult, x: Finding) -> str:
    key = "\0".join([x.code, _uri(f.file), x.layer or "", ",".join(map(str, x.dims))])
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def sarif_document(result: CheckResult) -> dict[str, Any]:
    """SARIF 2.1.0: every enabled rule in tool.driver.rules, one result per finding."""
    index = {rule.code: k for k, rule in enumerate(result.rules)}
    rules = [{"id": r.code, "name": "".join(part.title() for part in r.name.split("-")),
              "shortDescription": {"text": r.summary}, "fullDescription": {"text": r.doc},
              "help": {"text": rule_help(r)},
              "defaultConfiguration": {"level": r.severity},
              "properties": {"thresholds": result.config.thresholds(r)}} for r in result.rules]
    results = []
    for f in result.files:
        for x in f.findings:
            location: dict[str, Any] = {"physicalLocation": {"artifactLocation": {"uri": _uri(f.file)},
                                                             "region": {"startLine": 1}}}
            if x.layer is not None:
                location["logicalLocations"] = [{"name": x.layer, "fullyQualifiedName": x.layer, "kind": "member"}]
            where = "the whole model" if x.layer is None else f"layer {x.layer}"
            results.append({
                "ruleId": x.code, "ruleIndex": index[x.code], "level": x.severity,
                "message": {"text": f"{f.label}, {where}: {x.message}"}, "locations": [location],
                "partialFingerprints": {"bnprobeFinding/v1": _fingerprint(f, x)},
                "properties": {"depth": x.depth, "dims": x.dims, "dimsTotal": x.dims_total,
                               "value": _json_number(x.value), "threshold": _json_number(x.threshold)}})
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [{
        "tool": {"driver": {"name": "bnprobe", "version": __version__, "rules": rules}},
        "results": results}]}


def rules_table() -> Any:
    """Every rule: code, name, default severity, what it flags, its thresholds with their defaults."""
    from rich import box
    from rich.table import Table

    table = Table(title="bnprobe check rules", box=box.SIMPLE_HEAD)
    table.add_column("code", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("rule: what it flags", ratio=1)  # the one column that wraps, so 80 columns stay readable
    table.add_column("thresholds", no_wrap=True)
    for rule in RULES.values():
        thresholds = "\n".join(f"{name}={p.default:g}" for name, p in rule.params.items()) or "-"
        table.add_row(rule.code, f"[{COLOURS[rule.severity]}]{rule.severity}[/]",
                      f"[bold]{rule.name}[/]\n{rule.summary}", thresholds)
    return table


def rule_text(rule: Rule) -> str:
    """`bnprobe rules CODE`: one rule explained, plain text."""
    return f"{rule.code} {rule.name} (default severity: {rule.severity})\n\n{rule_help(rule)}"


def rendered(result: "CheckResult", output_format: str) -> str:
    """The whole report as text to write: plain text (no markup), JSON or SARIF."""
    if output_format == "text":
        return "\n".join(text_lines(result, colour=False)) + "\n"
    document = json_document(result) if output_format == "json" else sarif_document(result)
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def emit(text: str, output: Optional[Path]) -> None:
    """A rendered check or diff report: printed, or written atomically to `output`."""
    if output is None:
        print(text, end="")
    else:
        atomic_write(output, lambda f: f.write(text.encode("utf-8", "surrogateescape")))
