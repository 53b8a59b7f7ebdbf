"""Flags shared by `bnprobe probe` and `bnprobe ablate`, and the syntax of their value lists.

Kept free of torch (and numpy), because the CLI builds its commands from these at import time and
`bnprobe --help` should not wait for torch to load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bnprobe.errors import BnprobeError

NORM_UNITS = ("auto", "unit", "pixel")
DEFAULT_TAUS = "0.001,0.01,0.05,0.1"
REPORT_TAUS = "0.01,0.05,0.1"  # the report's figures and tables: fewer columns
# Each value is at least one evaluation (ablate) or a column (probe, report): more than this is a typo, and
# would otherwise spend minutes and gigabytes before saying anything.
MAX_SWEEP_VALUES = 10_000
SWEEP_SYNTAX = (
    "One value (0.05), a comma-separated list (0.01,0.05,0.1), or START:STOP:COUNT for COUNT evenly spaced "
    "values from START to STOP inclusive (0:0.2:20 is 20 values 0, 0.0105, ..., 0.2); items can be mixed "
    "(0,0.001,0.01:0.2:10). Values are sorted and de-duplicated; at most 10,000 in all."
)


def _help(text: str) -> dict[str, Any]:
    return {"help": text, "identity": False}


@dataclass
class LoadOptions:
    """How to turn a checkpoint file into a model and its evaluation data (see bnprobe.loading)."""

    model: Optional[str] = field(default=None, metadata=_help(
        "Build the model with a factory of your own: path/to/file.py:factory or package.module:factory "
        "[default: rebuild a bnprobe checkpoint's model from its config]."))
    model_arg: Optional[list[str]] = field(default=None, metadata=_help(
        "key=value keyword argument of the --model factory, repeatable; values are parsed as JSON when they "
        "are JSON (10, 0.5, true, \"text\"), else taken as strings."))
    dataset: Optional[str] = field(default=None, metadata=_help(
        "Data set to evaluate on: mnist | cifar10 | cifar100 | digits "
        "[default: the run's; required for other checkpoints]."))
    data_dir: Optional[Path] = field(default=None, metadata=_help(
        "Data folder [default: the run's, else $BNPROBE_DATA_DIR or ./data]."))
    mean: Optional[str] = field(default=None, metadata=_help(
        "Input normalisation mean, one value or one per channel, e.g. 0.4914,0.4822,0.4465 "
        "[default: a bnprobe checkpoint's stored statistics, else the training set's per-channel mean]."))
    std: Optional[str] = field(default=None, metadata=_help(
        "Input normalisation std, as --mean (e.g. 0.247,0.243,0.261)."))
    norm_units: str = field(default="auto", metadata=_help(
        "Units of --mean/--std: unit (0..1, as torchvision's Normalize after ToTensor), pixel (0..255), or auto "
        "(unit when every value is <= 1)."))
    download: Optional[bool] = field(default=None, metadata=_help(
        "Download missing data [default: the run's, else yes]."))
    verify: Optional[bool] = field(default=None, metadata=_help(
        "Check md5 sums of data files [default: the run's, else yes]; --no-verify for modified copies."))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N."))


def parse_sweep(text: str, flag: str, upper: Optional[float] = None) -> list[float]:
    """`0.05`, `0.01,0.05,0.1`, `0:0.2:20` (20 values, both ends included), or a mix, as sorted floats.

    Every error is one line naming `flag` and the offending item: an empty item (`0.1,,0.2`, a trailing
    comma), a non-number, a non-finite value (inf, nan), a value < 0 or above `upper`, a bad range."""
    if not text.strip():
        raise BnprobeError(f"{flag} needs at least one value; got {text!r}")
    values: list[float] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            raise BnprobeError(f"{flag} has an empty item in {text!r} (two commas in a row, or a comma at an end)")
        parts = item.split(":")
        if len(parts) not in (1, 3):
            raise BnprobeError(
                f"{flag} must be a number, a list like 0.01,0.05,0.1 or a range START:STOP:COUNT; got {item!r}")
        try:
            ends = [float(p) for p in parts[:2]]
        except ValueError:
            raise BnprobeError(
                f"{flag} must be a number, a list like 0.01,0.05,0.1 or a range START:STOP:COUNT; got {item!r}")
        if not all(math.isfinite(end) for end in ends):
            raise BnprobeError(f"{flag} values must be finite and >= 0; got {item!r}")
        if len(parts) == 3 and ends[1] < ends[0]:
            raise BnprobeError(f"{flag}: STOP must be >= START in {item!r}")
        if min(ends) < 0:
            raise BnprobeError(f"{flag} values must be finite and >= 0; got {item!r}")
        if upper is not None and max(ends) > upper:
            raise BnprobeError(f"{flag} values must be in [0, {upper:g}]; got {item!r}")
        if len(parts) == 1:
            if len(values) == MAX_SWEEP_VALUES:
                raise BnprobeError(f"{flag} has more than {MAX_SWEEP_VALUES:,} values in {_short(text)}")
            values.append(ends[0])
            continue
        start, stop = ends
        try:
            count = int(parts[2])
        except ValueError:
            raise BnprobeError(f"{flag}: the COUNT of {item!r} must be a whole number >= 1")
        if not 1 <= count <= MAX_SWEEP_VALUES:
            raise BnprobeError(f"{flag}: the COUNT of {item!r} must be in [1, {MAX_SWEEP_VALUES:,}]")
        if len(values) + count > MAX_SWEEP_VALUES:
            raise BnprobeError(f"{flag} has more than {MAX_SWEEP_VALUES:,} values in {_short(text)}")
        step = (stop - start) / (count - 1) if count > 1 else 0.0
        values.extend([start + i * step for i in range(count - 1)] + [stop if count > 1 else start])
    return sorted(set(values))


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
