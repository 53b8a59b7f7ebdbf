"""`bnprobe diff --format json` files (NAME.diff.json) found under a reported folder, read defensively into what
the report's "What changed" section shows: both checkpoints, how many norm layers changed, the channels turned
off and on, and the layers whose γ changed most."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import DIFF_FORMAT
from bnprobe.files import schema

DIFF_SUFFIX = ".diff.json"  # the name that makes a report read a diff (`bnprobe diff A B --format json -o X.diff.json`)
SHOWN = 5  # layers listed as those that changed most


@dataclass
class DiffRow:
    name: str  # the file, relative to the reported folder
    a: str  # the checkpoints' labels
    b: str
    layers: int
    changed: int  # layers whose γ or β changed
    turned_off: int
    turned_on: int
    most: list[tuple[str, Optional[float]]]  # (layer, ‖Δγ‖/‖γ_A‖; None where A's γ is 0), largest first


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value) else None


def _dims(layer: dict, key: str, where: str) -> int:
    dims = layer.get(key)
    if not isinstance(dims, list):
        raise BnprobeError(f"{where}: {key} is not a list")
    return len(dims)


def read_diff(path: Path, name: str) -> DiffRow:
    """A diff file, its shape checked (format, version, a layer list of bounded length with the fields shown)."""
    document = schema.read_json(path, "a diff file")
    if not isinstance(document, dict) or document.get("format") != DIFF_FORMAT:
        raise BnprobeError(f"{path}: not a bnprobe diff file (format {DIFF_FORMAT})")
    version, layers = document.get("version"), document.get("layers")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BnprobeError(f"{path}: version {version!r} is not a version number")
    if not isinstance(layers, list) or len(layers) > schema.MAX_TENSORS:
        raise BnprobeError(f"{path}: layers must be a list of at most {schema.MAX_TENSORS:,} layers")
    labels = []
    for side in ("a", "b"):
        entry = document.get(side)
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise BnprobeError(f"{path}: {side} names no checkpoint label")
        labels.append(printable(entry["label"]))
    rows = []
    for k, layer in enumerate(layers):
        where = f"{path}: layer {k}"
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            raise BnprobeError(f"{where} has no name")
        rel_gamma, delta_beta = _number(layer.get("rel_gamma")), _number(layer.get("delta_beta"))
        rows.append((printable(layer["name"]), rel_gamma, bool(rel_gamma or (delta_beta or 0) > 0),
                     _dims(layer, "turned_off", where), _dims(layer, "turned_on", where)))
    ranked = sorted((row for row in rows if row[1] != 0), key=lambda row: -(row[1] if row[1] is not None else math.inf))
    return DiffRow(name, labels[0], labels[1], len(rows), sum(row[2] for row in rows), sum(row[3] for row in rows),
                   sum(row[4] for row in rows), [(row[0], row[1]) for row in ranked[:SHOWN]])
