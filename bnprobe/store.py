"""HDF5 storage: every file is changed on a temporary copy and renamed into place, so a crash at any
moment leaves the previous complete file. The schemas themselves are documented in docs/hdf5-schema.md;
reading them back goes through bnprobe.schema.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from bnprobe.atomic import replacing

COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)


@contextmanager
def atomic_h5(path: Path, *, update: bool = False) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file (a copy of `path` when `update`), rename it over `path` on success."""
    with replacing(path) as tmp:
        if update and Path(path).exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a" if update else "w") as f:
            yield f


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
