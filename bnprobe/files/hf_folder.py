"""Whether a path is a Hugging Face transformers model folder: a directory whose config.json names a `model_type`
(a bnprobe run directory's config.json is a TrainConfig, beside its checkpoint.pt). Torch-free and
transformers-free, so the CLI can tell before it imports either."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from bnprobe.core.formats import CHECKPOINT_FILE, CONFIG_FILE
from bnprobe.files.schema import read_json


def hf_config(path: Path) -> Optional[dict[str, Any]]:
    """The folder's config.json (read bounded, as every JSON file), when `path` is a model folder; else None."""
    path = Path(path)
    if not path.is_dir() or (path / CHECKPOINT_FILE).exists() or not (path / CONFIG_FILE).is_file():
        return None
    config = read_json(path / CONFIG_FILE, "a model's config.json")
    if isinstance(config, dict) and isinstance(config.get("model_type"), str):
        return config
    return None
