"""The scale convention of a file's norm layers: the effective scale every measure uses is the stored `w` plus an
offset, 0 almost everywhere, 1 where the model computes `x * (1 + w)`.

The Gemma family's RMSNorm (Gemma 1/2/3, RecurrentGemma, VaultGemma, T5Gemma, PaliGemma's and ShieldGemma 2's
language models) computes `x * (1 + w)`, so a Hugging Face file stores `w` = effective - 1: a stored 0 is a
channel at full scale, not one turned off. The model type comes from the `config.json` beside the weights (or in
the folder probed); the family's vision towers (SigLIP) use plain LayerNorms with a bias, so the offset applies to
the RMSNorm-like layers (a scale alone) only. llama.cpp adds the 1 when it converts such a model to GGUF: a GGUF
file stores the effective scale. `--scale-offset` says it for a file with no config (applied to every norm layer
that is not BatchNorm: Megatron's LayerNorm1P is a LayerNorm with a bias and a 1 + w scale).

Torch-free: numpy and the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from bnprobe.core.errors import first_line, printable
from bnprobe.core.formats import SCALE_ONLY, SCALE_SHIFT
from bnprobe.core.options import check_scale_offset

CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 << 20  # a model's config.json is kilobytes; this bounds a hostile one
# Model types (config.json's model_type, or its text_config's) whose RMSNorm computes x * (1 + w) in Hugging Face
# transformers (their modeling files: `output * (1.0 + self.weight.float())`). Gemma 3n and Gemma 4 do not.
ONE_PLUS_W = frozenset({
    "gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma", "vaultgemma", "t5gemma", "t5_gemma_module",
    "t5gemma2", "t5gemma2_text", "t5gemma2_encoder", "t5gemma2_decoder", "paligemma", "shieldgemma2",
})


@dataclass(frozen=True)
class ScaleConvention:
    """Effective scale = stored + offset, for the layers of `kinds`; `why` says what decided it."""

    offset: float
    why: str
    kinds: tuple[str, ...] = (SCALE_ONLY,)

    @property
    def text(self) -> str:
        return "1 + w" if self.offset else "w as stored"


def read_model_type(config: Path) -> tuple[Optional[str], Optional[str]]:
    """(model_type, None) from a config.json (its text_config's when that one is of the 1 + w family, as
    PaliGemma's), (None, None) when it names none, (None, reason) when it cannot be read: bounded, never trusted."""
    try:
        if not config.is_file():
            return None, f"{CONFIG_FILE} is not a regular file"
        if config.stat().st_size > MAX_CONFIG_BYTES:
            return None, f"{CONFIG_FILE} is over {MAX_CONFIG_BYTES >> 20} MiB"
        data: Any = json.loads(config.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        return None, f"{CONFIG_FILE} unreadable ({first_line(exc, typed=True)})"
    if not isinstance(data, dict):
        return None, None
    types = [data.get("model_type")]
    text = data.get("text_config")
    if isinstance(text, dict):
        types.append(text.get("model_type"))
    types = [t for t in types if isinstance(t, str) and t]
    family = next((t for t in types if t in ONE_PLUS_W), None)
    return family or (types[0] if types else None), None


def config_beside(file: Path) -> Path:
    """The config.json of a checkpoint: beside the weights (a model folder's, for its index or a shard)."""
    return Path(os.path.abspath(file)).parent / CONFIG_FILE


def scale_convention(file: Path, file_format: str, given: Optional[float] = None) -> ScaleConvention:
    """The convention of `file` (as checkpoint_file gives it; `file_format` as FileTensors.kind says it): the user's
    --scale-offset where `given`, else the file's kind and its config.json's model type."""
    if given is not None:
        check_scale_offset(given)
        return ScaleConvention(float(given), f"--scale-offset {given:g}", (SCALE_ONLY, SCALE_SHIFT))
    if file_format.lower().startswith("gguf"):
        return ScaleConvention(0.0, "GGUF stores the effective scale (llama.cpp adds the 1 of Gemma's 1 + w when "
                                    "it converts)")
    config = config_beside(file)
    if not os.path.lexists(config):
        return ScaleConvention(0.0, f"no {CONFIG_FILE} beside the weights to name the model (--scale-offset 1 for "
                                    f"a Gemma-family file)")
    model_type, problem = read_model_type(config)
    if problem:
        return ScaleConvention(0.0, f"{problem}; --scale-offset 1 for a Gemma-family file")
    if model_type in ONE_PLUS_W:
        return ScaleConvention(1.0, f"{CONFIG_FILE}: model_type {printable(model_type)}, whose RMSNorm computes "
                                    f"x * (1 + w)")
    named = f"model_type {printable(model_type)}" if model_type else "no model_type"
    return ScaleConvention(0.0, f"{CONFIG_FILE}: {named}, not of the Gemma family")


def effective(gamma: Sequence[np.ndarray], kinds: Sequence[str], convention: ScaleConvention) -> tuple[list[np.ndarray], int]:
    """Each layer's effective scale (stored + offset for the convention's kinds), and how many layers moved."""
    if not convention.offset:
        return list(gamma), 0
    out = [g + convention.offset if kind in convention.kinds else g for g, kind in zip(gamma, kinds)]
    return out, sum(kind in convention.kinds for kind in kinds)
