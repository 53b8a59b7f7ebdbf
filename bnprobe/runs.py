"""Run directories and checkpoints: every file is written to a temporary name and renamed into place.

Layout of `runs/<name>/`:
    config.json      the TrainConfig, enough to rebuild the model
    checkpoint.pt    latest state (model, optimizer, data RNG, history), rewritten each epoch
    metrics.json     per-epoch history, for humans and reports
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from bnprobe.config import TrainConfig
from bnprobe.errors import BnprobeError

CHECKPOINT_FORMAT = "bnprobe-checkpoint"
CHECKPOINT_VERSION = 1


def config_path(run_dir: Path) -> Path:
    return run_dir / "config.json"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.json"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, sort_keys=True), mode="w")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never code."""
    if not path.is_file():
        raise BnprobeError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise BnprobeError(f"{path} holds more than weights and was refused ({first})")
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise BnprobeError(f"{path} is not a readable checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    if not isinstance(state, dict):
        raise BnprobeError(f"{path} is not a bnprobe checkpoint")
    return state


def read_config(run_dir: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(json.loads(config_path(run_dir).read_text()))
    except FileNotFoundError:
        raise BnprobeError(f"{run_dir} is not a run directory (no config.json)")
    except json.JSONDecodeError as exc:
        raise BnprobeError(f"{config_path(run_dir)} is not valid JSON ({exc})")
