"""Run directories: their files' paths, names a run may take, what --overwrite may delete or set aside, and
the writing of config.json, metrics.json and checkpoint.pt (each to a temporary name, renamed into place). The
files are named in bnprobe.core.formats; checkpoints are read back through bnprobe.files.checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FILES,
    SET_ASIDE_FORMAT,
    SET_ASIDE_MARKER,
)
from bnprobe.files import schema
from bnprobe.files.atomic import atomic_write
from bnprobe.files.file_tensors import checkpoint_file
from bnprobe.files.store import h5_format


def config_path(run_dir: Path) -> Path:
    return run_dir / CONFIG_FILE


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_FILE


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS_FILE


MAX_RUN_NAME = 240


def check_run_name(name: str) -> str:
    """A run name is one folder inside --runs-dir: never a path that could point at (and, with --overwrite,
    replace) some other folder, nor a hidden name (.NAME.replaced, .NAME.lock are bnprobe's bookkeeping)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BnprobeError(f"--name must be a single folder name (no '/', not '.' or '..'), got {name!r}")
    if any(unicodedata.category(char) == "Cc" for char in name):  # a newline would split every later message
        raise BnprobeError(f"--name must not contain control characters (newline, tab, ...), got {name!r}")
    if len(os.fsencode(name)) > MAX_RUN_NAME:  # the file system's 255, less what bnprobe's .NAME.replaced adds
        raise BnprobeError(f"--name must be at most {MAX_RUN_NAME} bytes (a file name has at most 255, and bnprobe "
                           f"keeps .NAME.replaced beside a run), got {len(os.fsencode(name)):,}: "
                           f"{printable(name, limit=60)}")
    if name.startswith("."):
        raise BnprobeError(f"--name must not start with '.': hidden names are bnprobe's own bookkeeping "
                           f"(.NAME.replaced, .NAME.lock) and reports skip them; got {name!r}")
    return name


is_run = schema.is_run  # the one test, torch-free, for the report too


def foreign_files(run_dir: Path) -> list[str]:
    """The entries of a run directory that bnprobe did not write, which --overwrite must never delete: all but
    the run files, bnprobe's HDF5 results (by their format attribute) and its hidden temporary and lock files."""

    def ours(path: Path) -> bool:
        if not path.is_file() or path.is_symlink():
            return False
        if path.name.startswith(".") and path.name.endswith((".tmp", ".lock")):
            return True
        if path.suffix == ".h5":
            return h5_format(path).startswith("bnprobe-")
        return path.name.removesuffix(".journal") in RUN_FILES or path.name == SET_ASIDE_MARKER  # .journal: a killed update's (bnprobe.files.store)

    return sorted(path.name for path in run_dir.iterdir() if not ours(path))


class Replacement:
    """--overwrite without losing the old run before the new one is worth more: the old folder is renamed to
    a hidden sibling, deleted once the new run has saved its first checkpoint, and put back if the new run
    fails or is interrupted before that. `recover` finishes or undoes one that a killed process left.

    Only what bnprobe set aside itself is ever moved or deleted: a marker file (SET_ASIDE_MARKER) is written
    into the old run before it is renamed, and a folder named like a set-aside one without it is a user's."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.aside = run_dir.with_name(f".{run_dir.name}.replaced")
        self.pending = False

    def recover(self) -> str:
        """Finish or undo an --overwrite a killed process left; what was done, as a sentence ("" if nothing)."""
        if not schema.is_set_aside(self.aside):
            return ""
        if checkpoint_path(self.run_dir).is_file():  # the new run got its checkpoint: the old one can go
            self._remove_aside()
            return (f"removed {self.aside}, the old run set aside by an interrupted --overwrite (the new run had "
                    f"saved its checkpoint)")
        self._restore()
        return f"put back the old run from {self.aside}: the --overwrite that set it aside was interrupted"

    def set_aside(self) -> None:
        if os.path.lexists(self.aside):  # a user's folder of that name: never replaced, never deleted
            raise BnprobeError(f"will not set {self.run_dir} aside for --overwrite: {self.aside} exists and bnprobe "
                               f"did not make it; move it away")
        write_json(self.run_dir / SET_ASIDE_MARKER, {"format": SET_ASIDE_FORMAT, "run": self.run_dir.name})
        self.run_dir.rename(self.aside)
        self.pending = True

    def commit(self) -> None:
        if self.pending:
            self.pending = False
            self._remove_aside()

    def undo(self) -> None:
        if self.pending:
            self.pending = False
            self._restore()

    def _remove_aside(self) -> None:
        foreign = foreign_files(self.aside)
        if foreign:  # put there after it was set aside: not bnprobe's to delete
            raise BnprobeError(f"{self.aside} (an old run set aside by --overwrite) now holds files bnprobe did "
                               f"not write ({', '.join(map(repr, foreign[:3]))}); move them away")
        shutil.rmtree(self.aside, ignore_errors=True)

    def _restore(self) -> None:
        if os.path.lexists(self.run_dir):  # what the interrupted new run wrote, and nothing else
            if not self.run_dir.is_dir() or self.run_dir.is_symlink() or foreign_files(self.run_dir):
                raise BnprobeError(f"cannot put the old run back from {self.aside}: {self.run_dir} holds files "
                                   f"bnprobe did not write; move one of them away")
            shutil.rmtree(self.run_dir)
        self.aside.rename(self.run_dir)
        (self.run_dir / SET_ASIDE_MARKER).unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (allow_nan=False: a bare NaN is no JSON; the numbers written are checked finite before)."""
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True, allow_nan=False), mode="w")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch  # here alone: the probe command finds its output through this module and must not wait for torch

    from bnprobe import __version__

    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "bnprobe_version": __version__}
    atomic_write(path, lambda f: torch.save({**header, **state}, f))


def read_config(run_dir: Path) -> TrainConfig:
    path = config_path(run_dir)
    if not os.path.lexists(path):
        raise BnprobeError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return TrainConfig.from_dict(schema.read_config(path))


def default_output(paths: Sequence[Path], name: str) -> Path:
    """Where a probe's or ablation's result goes by default: <run dir>/<name> for one run directory's
    checkpoint, else ./<name>."""
    if len(paths) == 1:
        file = checkpoint_file(paths[0])
        if file.name == CHECKPOINT_FILE and config_path(file.parent).exists():
            return file.parent / name
    return Path(name)
