"""Run directories and checkpoints: every file is written to a temporary name and renamed into place.
The files of `runs/<name>/` (config.json, checkpoint.pt, metrics.json, telemetry.h5) are named in
bnprobe.formats.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
import warnings
import zipfile
from collections import deque
from pathlib import Path
from typing import Any

import torch

from bnprobe import schema
from bnprobe.atomic import atomic_write
from bnprobe.config import TrainConfig
from bnprobe.data import get_dataset_spec
from bnprobe.errors import BnprobeError
from bnprobe.formats import (CHECKPOINT_FILE, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CONFIG_FILE, METRICS_FILE, RUN_FILES,
                             SET_ASIDE_FORMAT, SET_ASIDE_MARKER)
from bnprobe.store import h5_format


def config_path(run_dir: Path) -> Path:
    return run_dir / CONFIG_FILE


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_FILE


def metrics_path(run_dir: Path) -> Path:
    return run_dir / METRICS_FILE


def check_run_name(name: str) -> str:
    """A run name is one folder inside --runs-dir: never a path that could point at (and, with --overwrite,
    replace) some other folder, nor a hidden name (.NAME.replaced, .NAME.lock are bnprobe's bookkeeping)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BnprobeError(f"--name must be a single folder name (no '/', not '.' or '..'), got {name!r}")
    if any(unicodedata.category(char) == "Cc" for char in name):  # a newline would split every later message
        raise BnprobeError(f"--name must not contain control characters (newline, tab, ...), got {name!r}")
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
        return path.name.removesuffix(".journal") in RUN_FILES or path.name == SET_ASIDE_MARKER  # .journal: a killed update's (bnprobe.store)

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
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True), mode="w")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from bnprobe import __version__

    header = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "bnprobe_version": __version__}
    atomic_write(path, lambda f: torch.save({**header, **state}, f))


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", lazy: bool = False) -> Any:
    """torch.load(weights_only=True) with one-line errors: not a checkpoint, or refused pickled code.

    lazy: memory-map a zip archive's tensors (torch.load(mmap=True)), so only the bytes of the tensors
    used are ever read; the legacy format cannot be mapped and is read whole."""
    kind = schema.torch_file_kind(path)
    is_zip = kind == "zip"
    if not kind:
        raise BnprobeError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes about pickle protocols are not the user's concern
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=lazy and is_zip)
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file is the same kind of answer
        message = str(exc)
        if "Weights only load failed" in message or "WeightsUnpickler" in message:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
            what = f"it references {refused.group(1)}" if refused else _weights_only_reason(message)
            raise BnprobeError(
                f"refused to load {path}: it holds pickled code or objects, not only tensors ({what}); "
                f"bnprobe reads checkpoints with weights_only=True and never runs code from them"
            )
        reason = _first_sentence(message) or {EOFError: "the file ends early"}.get(type(exc), type(exc).__name__)
        if is_zip and not zipfile.is_zipfile(path):  # no intact central directory: cut short or overwritten
            reason = f"truncated or damaged: {reason}"
        raise BnprobeError(f"{path} is not a readable PyTorch checkpoint ({reason})")
    unreadable = _unreadable_tensors(obj)
    if unreadable:
        shown = ", ".join(unreadable[:4]) + (f", ... ({len(unreadable) - 4} more)" if len(unreadable) > 4 else "")
        raise BnprobeError(f"{path} holds tensors bnprobe cannot read: {shown}; it reads dense tensors that hold "
                           f"their data (tensor.to_dense(); a model built on the meta device has none)")
    return obj


def _unreadable_tensors(obj: Any) -> list[str]:
    """Where a loaded checkpoint holds a tensor that is not strided (sparse, ...) or has no data (the meta device,
    whatever size it declares), as `key.key[i] (layout)`: numpy and every copy would fail on it, or allocate
    what it declares. Walked without recursion, each container once (a file's nesting, even a list holding
    itself, is the file's choice)."""
    found, pending, seen = [], deque([("", obj)]), set()
    while pending:
        where, value = pending.popleft()
        if isinstance(value, torch.Tensor):
            if value.is_meta or value.layout != torch.strided:
                kind = "meta, no data" if value.is_meta else str(value.layout).removeprefix("torch.")
                found.append(f"{where or '(top level)'} ({kind})")
        elif isinstance(value, (dict, list, tuple)) and id(value) not in seen:
            seen.add(id(value))
            if isinstance(value, dict):
                pending.extend((f"{where}.{key}" if where else str(key), item) for key, item in value.items())
            else:
                pending.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return found


def _first_sentence(message: str, limit: int = 160) -> str:
    """The first sentence of an error message's first line, for a one-line answer. A longer one is cut
    at a word boundary before any bracket it leaves open, and ends in "...": never mid-word or mid-parenthesis."""
    line = next((line.strip() for line in message.splitlines() if line.strip()), "")
    sentence = re.split(r"(?<=[^\s.])\.(?=\s+[A-Z]|$)", line, maxsplit=1)[0].strip()
    if len(sentence) <= limit:
        return sentence
    cut = sentence[: limit + 1].rsplit(" ", 1)[0] if " " in sentence[:limit] else sentence[:limit]
    opened: list[int] = []
    for i, char in enumerate(cut):
        if char in "([{":
            opened.append(i)
        elif char in ")]}" and opened:
            opened.pop()
    if opened and opened[0] >= limit // 2:  # end before the first bracket left open
        cut = cut[: opened[0]]
    elif opened:  # or, when that keeps too little, drop the brackets left open
        cut = "".join(char for i, char in enumerate(cut) if i not in opened)
    return cut.rstrip(" ,;:-") + "..."


def _weights_only_reason(message: str) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+)", message, re.DOTALL)
    return (_first_sentence(match.group(1)) if match else "") or "content outside the allowed tensor types"


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A bnprobe checkpoint (a dict), read with weights_only=True: tensors and plain containers only."""
    if not path.is_file():
        raise BnprobeError(f"no checkpoint at {path}")
    state = read_checkpoint(path, map_location)
    if not isinstance(state, dict):
        raise BnprobeError(f"{path} is not a bnprobe checkpoint")
    return state


# What every row of a checkpoint's history holds since bnprobe's first version (later ones add eval-mode train
# accuracy and the gap): training's summary and metrics.json read them back after a resume.
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s")


def check_checkpoint(state: Any, path: Path, *, resume: bool = False) -> TrainConfig:
    """The one check of a bnprobe checkpoint's structure, before anything uses it: its keys, their types, and
    its config as TrainConfig.from_dict validates it (tensor shapes are checked against the model it builds,
    by loading.load_state_strict). `resume` also asks for the optimizer and RNG states that training needs.
    Returns the config; a fault is one line naming the file and the key."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BnprobeError(f"{path} is not a bnprobe checkpoint")
    config = TrainConfig.from_dict(state.get("config"), f"{path}: config")
    config.check_model(f"{path}: config")  # the bounds train applies, before anything builds it

    def need(key: str, kinds: Any, what: str, container: dict = state, where: str = "") -> Any:
        value = container.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise BnprobeError(f"{path}: '{where}{key}' must be {what}, not {_describe(value)}")
        return value

    epoch = need("epoch", int, "a whole number")
    if not 0 <= epoch <= config.epochs:  # training would run an epoch past the end, then call the run finished
        raise BnprobeError(f"{path}: 'epoch' must be in [0, {config.epochs}] (the config's epochs), not {epoch}")
    model = need("model", dict, "a state dict")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        raise BnprobeError(f"{path}: 'model' must map parameter names to tensors")
    history = need("history", list, "a list of epochs")
    for number, row in enumerate(history, 1):  # training reads every row back when it resumes
        numbers = isinstance(row, dict) and all(isinstance(row.get(key), (int, float))
                                                and not isinstance(row.get(key), bool) for key in HISTORY_FIELDS)
        if not numbers or row["epoch"] != number:
            raise BnprobeError(f"{path}: 'history' must be a list of per-epoch tables numbered from 1, each with "
                               f"{', '.join(HISTORY_FIELDS)} as numbers; row {number} is {_describe(row)}")
    if resume and len(history) != epoch:  # (an export keeps no history)
        raise BnprobeError(f"{path}: 'history' has {len(history)} epochs, but the checkpoint is after epoch {epoch}")
    if "processes" in state and need("processes", int, "a whole number") < 1:
        raise BnprobeError(f"{path}: 'processes' must be >= 1, not {state['processes']}")
    if "normalization" in state:  # per pixel (C, H, W) or per channel (C, 1, 1), as training stores it
        norm = need("normalization", dict, "a table of mean and std")
        spec = get_dataset_spec(config.dataset)
        shapes = ((spec.channels, 1, 1), (spec.channels, spec.size, spec.size))
        for key in ("mean", "std"):
            value = need(key, torch.Tensor, "a tensor", norm, "normalization.")
            if (tuple(value.shape) not in shapes or not value.is_floating_point() or not torch.isfinite(value).all()
                    or (key == "std" and not (value > 0).all())):
                raise BnprobeError(f"{path}: 'normalization.{key}' must hold finite{' positive' * (key == 'std')} "
                                   f"numbers of shape {shapes[0]} or {shapes[1]} for {spec.name}, not "
                                   f"{_describe(value)} of shape {tuple(value.shape)}")
    if resume:
        optimizer = need("optimizer", dict, "an optimizer state")
        need("state", dict, "a table", optimizer, "optimizer.")
        need("param_groups", list, "a list", optimizer, "optimizer.")
        rng = need("rng", dict, "a table of RNG states")
        for key in ("torch", "data"):
            if need(key, torch.Tensor, "a tensor", rng, "rng.").dtype != torch.uint8:
                raise BnprobeError(f"{path}: 'rng.{key}' must be a byte tensor, not {rng[key].dtype}")
    return config


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return "missing" if value is None else f"{type(value).__name__} {_first_sentence(repr(value), 40)}"


def read_config(run_dir: Path) -> TrainConfig:
    path = config_path(run_dir)
    if not os.path.lexists(path):
        raise BnprobeError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return TrainConfig.from_dict(schema.read_config(path))
