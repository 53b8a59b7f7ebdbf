"""`bnprobe ablate --clamp-dims`: which dimensions of which norm layers a row of the ablation clamps.

An index names the same hidden dimension only in layers of one width (a transformer's residual stream, a conv
net's stage), so every clamp here is a set of dimensions of one width, applied to every norm layer of that width:

    308,381        those dimensions, in the layers of the most common width that has them all (index < width);
    308,381@768    in the layers of width 768
    recurring      the dimensions the static probe lists as recurring outliers (an outlier of >= 2 layers of one
                   width, bnprobe.analysis.probe_results), each in the layers of its width
    random:K       K distinct dimensions drawn at random (numpy's PCG64 seeded by --seed and the repeat), in the
                   layers of the width of the named dimensions given beside it (else the most common width): the
                   control that says how much of a drop chance alone gives; --repeats draws it that many times

Torch-free: it sees the layers' widths, never their tensors.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from bnprobe.core.errors import BnprobeError

# A row clamps at most this many dimensions and --repeats draws at most this many rows: each row is an evaluation.
MAX_DIMS = 100_000
MAX_REPEATS = 1000
_RANDOM = re.compile(r"random:(\d+)(?:@(\d+))?")
_DIMS = re.compile(r"(\d+(?:,\d+)*)(?:@(\d+))?")


@dataclass(frozen=True)
class DimsSpec:
    kind: str  # "dims", "recurring" or "random"
    dims: tuple[int, ...] = ()  # kind "dims"
    count: int = 0  # kind "random"
    width: Optional[int] = None  # @WIDTH, when given


@dataclass
class DimsRow:
    """One row of a --clamp-dims ablation: a label and, per layer width, the dimensions clamped in its layers."""

    label: str
    dims: dict[int, np.ndarray]  # width -> sorted dimension indices


def parse_clamp_dims(text: str) -> DimsSpec:
    """One --clamp-dims value, with a one-line error naming what is wrong."""
    spec = text.replace(" ", "")
    if spec == "recurring":
        return DimsSpec("recurring")
    if match := _RANDOM.fullmatch(spec):
        count = int(match.group(1))
        if not 1 <= count <= MAX_DIMS:
            raise BnprobeError(f"--clamp-dims {text!r}: K must be in [1, {MAX_DIMS:,}]")
        return DimsSpec("random", count=count, width=_width(match.group(2), text))
    if match := _DIMS.fullmatch(spec):
        parts = match.group(1).split(",")
        if len(parts) > MAX_DIMS:
            raise BnprobeError(f"--clamp-dims {text[:40]!r}...: more than {MAX_DIMS:,} dimensions")
        dims = tuple(sorted({int(part) for part in parts}))
        return DimsSpec("dims", dims=dims, width=_width(match.group(2), text))
    raise BnprobeError(f"--clamp-dims must be dimensions like 308,381 (optionally @WIDTH), recurring, or random:K; "
                       f"got {text[:60]!r}")


def _width(text: Optional[str], spec: str) -> Optional[int]:
    if text is None:
        return None
    if int(text) < 1:
        raise BnprobeError(f"--clamp-dims {spec!r}: the width after @ must be >= 1")
    return int(text)


def choose_width(widths: Sequence[int], dims: Sequence[int], spec: str) -> int:
    """The most common layer width that has every one of `dims` (ties: the wider); a one-line error if none has."""
    need = max(dims, default=-1) + 1
    counts = Counter(w for w in widths if w >= need)
    if not counts:
        raise BnprobeError(f"--clamp-dims {spec}: no norm layer has dimension {need - 1} (the widest has "
                           f"{max(widths, default=0)} dimensions)")
    return max(counts, key=lambda w: (counts[w], w))


def _check_width(widths: Sequence[int], width: int, dims: Sequence[int], spec: str) -> None:
    if width not in widths:
        shown = ", ".join(str(w) for w in sorted(set(widths))[:8])
        raise BnprobeError(f"--clamp-dims {spec}: no norm layer has width {width} (the widths are {shown})")
    if dims and max(dims) >= width:
        raise BnprobeError(f"--clamp-dims {spec}: dimension {max(dims)} is outside width {width}")


def dims_rows(specs: Sequence[str], widths: Sequence[int], recurring: Optional[dict[int, np.ndarray]],
              seed: int, repeats: int) -> list[DimsRow]:
    """The rows that `specs` (each --clamp-dims value, in order) clamp in layers of these `widths`.
    `recurring`: width -> recurring outlier dimensions (needed only for `recurring`)."""
    if not 1 <= repeats <= MAX_REPEATS:
        raise BnprobeError(f"--repeats must be in [1, {MAX_REPEATS}], got {repeats}")
    if seed < 0:
        raise BnprobeError(f"--seed must be >= 0, got {seed}")
    parsed = [(text, parse_clamp_dims(text)) for text in specs]
    rows: list[DimsRow] = []
    named_width: Optional[int] = None  # the width random draws follow: that of the named dimensions
    for text, spec in parsed:
        if spec.kind == "dims":
            width = spec.width if spec.width is not None else choose_width(widths, spec.dims, text)
            _check_width(widths, width, spec.dims, text)
            named_width = named_width or width
            rows.append(DimsRow(f"dims {_short(spec.dims)} @{width}", {width: np.array(spec.dims, dtype=np.int64)}))
        elif spec.kind == "recurring":
            found = {w: np.asarray(d, dtype=np.int64) for w, d in (recurring or {}).items() if len(d)}
            if not found:
                raise BnprobeError("--clamp-dims recurring: no dimension is an outlier in two or more norm layers of "
                                   "one width (see --outlier-factor); name the dimensions instead")
            named_width = named_width or max(found, key=lambda w: (len(found[w]), w))
            label = "; ".join(f"{_short(found[w].tolist())} @{w}" for w in sorted(found))
            rows.append(DimsRow(f"recurring {label}", {w: np.sort(d) for w, d in found.items()}))
    for text, spec in parsed:
        if spec.kind != "random":
            continue
        width = spec.width or named_width or choose_width(widths, (), text)
        _check_width(widths, width, (), text)
        if spec.count > width:
            raise BnprobeError(f"--clamp-dims {text}: cannot draw {spec.count} distinct dimensions of width {width}")
        for repeat in range(repeats):
            dims = random_dims(width, spec.count, seed, repeat)
            rows.append(DimsRow(f"random:{spec.count} @{width} #{repeat + 1} (seed {seed}): {_short(dims.tolist())}",
                                {width: dims}))
    return rows


def random_dims(width: int, count: int, seed: int, repeat: int) -> np.ndarray:
    """`count` distinct dimensions of `width`, sorted: the same (seed, repeat, count, width) always draws the same,
    whatever other --clamp-dims values are given beside it."""
    rng = np.random.default_rng([seed, repeat, count, width])
    return np.sort(rng.choice(width, size=count, replace=False)).astype(np.int64)


def _short(dims: Sequence[int], limit: int = 8) -> str:
    shown = ",".join(str(int(d)) for d in list(dims)[:limit])
    return shown + (f",... ({len(dims)} in all)" if len(dims) > limit else "")
