"""Every checkpoint, whatever wrote it, is opened here and nowhere else: sniffed, checked, and handed back as
tensors (lazily where the format allows) plus what the file says about itself.

Formats: torch.save's zip archive and its legacy pickle (always `torch.load(weights_only=True)`: a file holding
pickled code is refused, never run), `.safetensors`, bnprobe's own checkpoints (a run's checkpoint.pt) and its
exports (full or compact, bnprobe.files.compact). A state dict may sit at the top level or under a common key
(`state_dict`, `model`, `ema`, ... two levels deep) and carry DataParallel/DDP (`module.`), torch.compile
(`_orig_mod.`) or Lightning (`model.`) prefixes. A run directory stands for its checkpoint.pt, a Hugging Face
model folder for its index or weights file; an index's shards are opened here too (the index itself is read
and checked by bnprobe.files.shards).
A GGUF file (llama.cpp's; a split model's parts together) is read by bnprobe.files.gguf, without torch.

What needs no torch is elsewhere: the sniffing, safetensors headers and exports' metadata in
bnprobe.files.headers (which the report reads without loading torch), and a file's tensors for the static probe
in bnprobe.files.file_tensors (no torch, pickles read inertly). The state dict is found inside a file by the
same rules in both (file_tensors.find_state_dict).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from bnprobe.core.config import TrainConfig
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.errors import BnprobeError, first_line, listing, printable
from bnprobe.core.formats import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    COMPACT_FORMAT,
    EXPORT_FORMATS,
    EXPORT_VERSIONS,
)
from bnprobe.files.compact import (
    frozen_digest,
    layout_digest,
    packed_layout,
    regenerate,
    stored_digest,
    stored_verified,
    unpack,
)
from bnprobe.files.file_tensors import (
    FileTensors,
    find_state_dict,
    is_stored,
    refuse_unreadable,
    torch_tensors,
    walk_tensors,
)
from bnprobe.files.gguf import is_gguf
from bnprobe.files.headers import export_fields, is_safetensors, torch_file_kind
from bnprobe.files.runs import checkpoint_path, config_path, read_config
from bnprobe.files.schema import check_agrees
from bnprobe.files.shards import is_index
from bnprobe.nets.check import check_model


# ---- torch files -----------------------------------------------------------------------------------------------


def read_checkpoint(path: Path, map_location: str | torch.device = "cpu", lazy: bool = False) -> Any:
    """torch.load(weights_only=True) with one-line errors: not a checkpoint, or refused pickled code. Where
    weights_only refuses a torch.save file for the objects beside its tensors (a Lightning checkpoint's omegaconf
    hyper_parameters, an argparse.Namespace, ...), bnprobe's inert unpickler reads it instead: those objects are
    stood in for (bnprobe.files.inert_pickle), never imported or run, and the tensors read whole. A file it cannot
    read either is refused as pickled code.

    lazy: memory-map a zip archive's tensors (torch.load(mmap=True)), so only the bytes of the tensors
    used are ever read; the legacy format cannot be mapped and is read whole."""
    kind = torch_file_kind(path)
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
            try:
                return _read_inertly(path)
            except BnprobeError as inert:
                raise BnprobeError(
                    f"refused to load {path}: it holds pickled code or objects, not only tensors ({what}); "
                    f"bnprobe reads checkpoints with weights_only=True and never runs code from them, and its "
                    f"inert reader could not read it either ({str(inert).removeprefix(str(path)).lstrip(': ')})"
                ) from None
        reason = _first_sentence(message) or {EOFError: "the file ends early"}.get(type(exc), type(exc).__name__)
        if is_zip and not zipfile.is_zipfile(path):  # no intact central directory: cut short or overwritten
            reason = f"truncated or damaged: {reason}"
        raise BnprobeError(f"{path} is not a readable PyTorch checkpoint ({reason})")
    # A tensor that is not strided (sparse, ...) or has no data (the meta device, whatever size it declares):
    # numpy and every copy would fail on it, or allocate what it declares.
    refuse_unreadable(path, [
        f"{where or '(top level)'} ({'meta, no data' if value.is_meta else str(value.layout).removeprefix('torch.')})"
        for where, value in walk_tensors(obj, _is_tensor) if value.is_meta or value.layout != torch.strided])
    return obj


def _read_inertly(path: Path) -> Any:
    """A torch.save file read by bnprobe's inert unpickler (nothing in it run), its tensors read into torch
    tensors where they sit in dicts and lists (the containers of state dicts and optimizer states)."""
    obj = torch_tensors(path)[0]
    pending = [obj]
    seen: set[int] = set()
    while pending:
        container = pending.pop()
        if id(container) in seen:
            continue
        seen.add(id(container))
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in list(items):
            if is_stored(value):
                array = FileTensors.read(value)  # (np.ascontiguousarray would make a 0-d array 1-d)
                tensor = torch.from_numpy(array if array.flags.c_contiguous and array.flags.writeable else array.copy())
                container[key] = tensor.to(torch.bfloat16) if value.dtype == "bfloat16" else tensor
            elif isinstance(value, (dict, list)):
                pending.append(value)
    return obj


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


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


# ---- bnprobe checkpoints ---------------------------------------------------------------------------------------


# What every row of a checkpoint's history holds since bnprobe's first version (later ones add eval-mode train
# accuracy and the gap): training's summary and metrics.json read them back after a resume.
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_s")


def check_checkpoint(state: Any, path: Path, *, resume: bool = False) -> TrainConfig:
    """The one check of a bnprobe checkpoint's structure, before anything uses it: its keys, their types, and
    its config as TrainConfig.from_dict validates it (tensor shapes are checked against the model it builds,
    by load_state_strict). `resume` also asks for the optimizer and RNG states that training needs.
    Returns the config; a fault is one line naming the file and the key."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise BnprobeError(f"{path} is not a bnprobe checkpoint")
    config = TrainConfig.from_dict(state.get("config"), f"{path}: config")
    check_model(config, f"{path}: config")  # the bounds train applies, before anything builds it
    check_agrees(config, path)  # a run's config.json says the same

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
        # Training records finite numbers only, and metrics.json (strict JSON) holds the history again on resume.
        odd = next((key for key, value in row.items() if not isinstance(key, str) or isinstance(value, bool)
                    or not isinstance(value, (int, float)) or not math.isfinite(value)), None)
        if odd is not None:
            raise BnprobeError(f"{path}: 'history' row {number} has {printable(str(odd))} = "
                               f"{_describe(row[odd])}, not a finite number")
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
            if tuple(value.shape) not in shapes or not value.is_floating_point():
                raise BnprobeError(f"{path}: 'normalization.{key}' must hold numbers of shape {shapes[0]} or "
                                   f"{shapes[1]} for {spec.name}, not {_describe(value)} of shape {tuple(value.shape)}")
            bad = value[~torch.isfinite(value) | ((value <= 0) if key == "std" else False)]
            if bad.numel():  # named by its value: a std of 0 or NaN would divide every image into NaN
                raise BnprobeError(f"{path}: 'normalization.{key}' holds {bad[0].item():g}; it must hold finite"
                                   f"{' positive' * (key == 'std')} numbers")
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


# ---- state dicts ---------------------------------------------------------------------------------------------


def extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint: bare, or under a common key (searched two levels deep)."""
    return find_state_dict(obj, path, _is_tensor)


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load with strict key and shape matching; on any difference, one line naming the differences."""
    expected = model.state_dict()
    # Old checkpoints lack BN's num_batches_tracked; it does not change what the model computes.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {listing(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} of other shape (checkpoint vs model): {listing(shapes, 3)}")
        raise BnprobeError(f"{path} does not fit {what} (wrong architecture?): {'; '.join(parts)}")
    model.load_state_dict(state, strict=False)  # strictness was checked above, num_batches_tracked aside


# ---- the file as tensors ----------------------------------------------------------------------------------------


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends: one line
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise BnprobeError(f"{path} is not a readable safetensors file ({text})")
    with handle as f:
        yield f


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (a bnprobe export names its format there)."""
    with _open_safetensors(path) as f:
        return f.metadata() or {}


def _is_export(metadata: dict[str, str]) -> bool:
    return metadata.get("format") in EXPORT_FORMATS


def read_weights(path: Path) -> Any:
    """A checkpoint's whole content for building a model: a safetensors file as a dict of tensors (a run bnprobe
    exported as the run's checkpoint), any other file through read_checkpoint (weights_only=True)."""
    if is_index(path) or is_gguf(path):
        what = "a GGUF file" if is_gguf(path) else "a sharded checkpoint"
        raise BnprobeError(f"{path}: {what} is probed from its files alone (no --model, no --dataset); bnprobe "
                           f"builds models from one torch or safetensors file")
    if not is_safetensors(path):
        return read_checkpoint(path)
    with _open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if _is_export(metadata):
            return read_export(path, f, metadata)
        return {name: f.get_tensor(name) for name in f.keys()}


def read_export(path: Path, f: Any, metadata: dict[str, str]) -> dict[str, Any]:
    """An exported run (open safetensors handle `f`) as the bnprobe checkpoint it came from: its config checked as
    `train` checks one (the model's size counted before it is built), its stored tensors against their hash
    (version 3), and the frozen tensors of a compact file regenerated from the seed and checked against theirs."""
    config_dict, epoch = export_fields(metadata, path)
    # The exporter's data folder is a path on another machine (a forged one could point a download anywhere):
    # the data comes from this user's --data-dir, $BNPROBE_DATA_DIR or ./data.
    config_dict = {**config_dict, "data_dir": ""}
    config = TrainConfig.from_dict(config_dict, f"{path}: config")
    check_model(config, f"{path}: config")
    version = metadata.get("version")
    if metadata["format"] == COMPACT_FORMAT and version not in EXPORT_VERSIONS:
        raise BnprobeError(f"{path}: a compact file of format version {printable(str(version), limit=40)}; this bnprobe reads versions "
                           f"{' and '.join(EXPORT_VERSIONS)}")
    tensors = {name: f.get_tensor(name) for name in f.keys()}
    if stored_verified(metadata) and stored_digest(tensors) != metadata.get("stored_sha256"):
        raise BnprobeError(f"{path}: its stored tensors do not match the file's hash of them (changed or damaged "
                           f"since it was exported); refusing to run with them")
    if metadata["format"] == COMPACT_FORMAT:
        initial, masks, stored = regenerate(config)
        if frozen_digest(initial, stored, masks) != metadata.get("frozen_sha256"):
            raise BnprobeError(
                f"{path}: the frozen tensors regenerated from seed {config.seed} do not match the file's hash "
                f"(exported with torch {metadata.get('torch', '?')}, this is torch {torch.__version__}: the random "
                f"stream changed); refusing to run with different weights")
        layout = packed_layout(initial, masks, stored)
        if layout_digest(layout) != metadata.get("layout_sha256"):
            raise BnprobeError(f"{path}: the tensors {config.model} stores are not the ones the file packed "
                               f"(exported by another bnprobe version?)")
        values = unpack(layout, tensors, path)
        state = {}
        for name, initial_tensor in initial.items():
            if name in masks:
                tensor = initial_tensor.clone()
                tensor[masks[name]] = values[name]
                state[name] = tensor
            else:
                state[name] = values.get(name, initial_tensor)
        tensors = state
    checkpoint: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                                  "config": config_dict, "model": tensors, "epoch": epoch,
                                  "history": []}  # an export keeps the weights, not the training history
    if "normalization" in metadata:  # its shapes and values are checked with the checkpoint (check_checkpoint)
        try:
            norm = json.loads(metadata["normalization"])
            checkpoint["normalization"] = {key: torch.tensor(norm[key], dtype=torch.float32) for key in ("mean", "std")}
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError, RecursionError) as exc:
            raise BnprobeError(f"{path}: damaged bnprobe export metadata (normalization: "
                               f"{first_line(exc, typed=True)})") from None
    return checkpoint


def check_run(run_dir: Path) -> TrainConfig:
    """The one check of a run directory that probe, ablate, export and inspect make: its config.json (settings
    and the model they build) and, once it has one, its checkpoint (structure, and agreeing with config.json)."""
    config = read_config(run_dir)
    check_model(config, str(config_path(run_dir)))
    path = checkpoint_path(run_dir)
    if os.path.lexists(path):
        check_checkpoint(load_checkpoint(path), path)
    return config
