"""HDF5 storage: every file is built in memory and its bytes written to a temporary file renamed into place,
so a crash at any moment leaves the previous complete file, and HDF5 itself never meets a full disk (it
crashes on one). The schemas themselves are documented in docs/hdf5-schema.md; reading them back goes
through bnprobe.schema.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import h5py
import numpy as np

from bnprobe.atomic import atomic_write
from bnprobe.errors import BnprobeError

COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)


@contextmanager
def atomic_h5(path: Path, *, update: bool = False) -> Iterator[h5py.File]:
    """An HDF5 file in memory (a copy of `path` when `update`), written over `path` in one atomic write on success."""
    path = Path(path)
    existing = update and path.exists()
    buffer = io.BytesIO(path.read_bytes() if existing else b"")
    with h5py.File(buffer, "r+" if existing else "w") as f:
        yield f
    atomic_write(path, lambda out: out.write(buffer.getbuffer()))


def h5_format(path: Path) -> Optional[str]:
    """The `format` attribute of an HDF5 file (e.g. "bnprobe-probe"); None for anything else."""
    if not Path(path).is_file():  # never open a FIFO or device: that could block
        return None
    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("format")
    except (OSError, ValueError):
        return None
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


def check_replaceable(path: Path, kind: str) -> None:
    """Before any slow work: an existing `path` is replaced only by a file of its own kind (its `format`
    attribute is `kind`), so an --out naming a run's checkpoint.pt or telemetry.h5 destroys nothing."""
    path = Path(path)
    if not os.path.lexists(path) or path.is_dir():  # nothing to lose; replacing() answers a folder
        return
    found = h5_format(path)
    if found != kind:
        what = f"a {found} file" if found else "not a file bnprobe wrote"
        raise BnprobeError(f"will not replace {path}: it is {what}, and only a {kind} file is replaced by this "
                           f"command; name another output file")


def provenance(**options: Any) -> dict[str, str]:
    """Attributes saying what wrote a result file: bnprobe's and torch's versions, and each options dataclass
    given (e.g. load=LoadOptions, probe=ProbeOptions) as JSON in `options_json`."""
    import dataclasses
    import json

    import torch

    from bnprobe import __version__

    settings = {name: dataclasses.asdict(value) for name, value in options.items()}
    return {"bnprobe_version": __version__, "torch_version": str(torch.__version__),  # a str subclass h5py refuses
            "options_json": json.dumps(settings, sort_keys=True, default=str)}


def set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    """Store plain values as HDF5 attributes; None becomes the string 'none' (HDF5 has no null)."""
    for key, value in attrs.items():
        obj.attrs[key] = "none" if value is None else value


def append_rows(group: h5py.Group, name: str, rows: np.ndarray, **attrs: Any) -> h5py.Dataset:
    """Append along axis 0 to a chunked, compressed, resizable dataset (created on first use)."""
    rows = np.asarray(rows)
    if name not in group:
        chunk_rows = max(1, min(1024, (1 << 16) // max(1, rows[0].nbytes if len(rows) else 1)))
        dataset = group.create_dataset(
            name, data=rows, maxshape=(None, *rows.shape[1:]), chunks=(chunk_rows, *rows.shape[1:]), **COMPRESSION
        )
        set_attrs(dataset, attrs)
        return dataset
    dataset = group[name]
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows
    return dataset


def write_array(group: h5py.Group, name: str, data: np.ndarray, **attrs: Any) -> h5py.Dataset:
    """Write a whole array (replacing any dataset of that name), compressed when it is worth it."""
    if name in group:
        del group[name]
    data = np.asarray(data)
    options = COMPRESSION if data.size >= 256 else {}
    if data.dtype.kind in "UO":  # text: variable-length UTF-8, readable by any HDF5 tool (no filters on vlen)
        options = {"dtype": h5py.string_dtype()}
        data = data.astype(object)
    dataset = group.create_dataset(name, data=data, **options)
    set_attrs(dataset, attrs)
    return dataset
