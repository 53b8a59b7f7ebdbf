"""Hugging Face transformers models in `bnprobe ablate`: a model folder (config.json and its weights) built by
transformers from its config (never a model's own code: trust_remote_code stays off), its weights read by
bnprobe's reader and loaded strictly, and its LayerNorm/RMSNorm scales clamped in place with the model's own
convention; measured by the user's --eval and/or the built-in --text evaluation (bnprobe.analysis.hf_text).

transformers is an optional extra (`pip install 'bnprobe[hf]'`): this module is imported only when the CLI meets a
model folder, and says in one line what to install when transformers is absent.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from rich.console import Console

from bnprobe.analysis.ablate import ablate, eval_measure
from bnprobe.analysis.conventions import ONE_PLUS_W
from bnprobe.analysis.hf_text import text_measure
from bnprobe.analysis.user_eval import load_eval
from bnprobe.core.errors import BnprobeError, first_line, listing, printable
from bnprobe.core.formats import ABLATION_FILES, ABLATION_FORMAT
from bnprobe.core.options import AblateOptions, LoadOptions
from bnprobe.files.checkpoints import extract_state_dict, read_weights
from bnprobe.files.file_tensors import checkpoint_file
from bnprobe.files.hf_folder import hf_config
from bnprobe.files.runs import default_output
from bnprobe.files.shards import is_index, read_index
from bnprobe.files.store import check_replaceable, provenance
from bnprobe.nets.clamp_inplace import InPlaceNorms, scale_norms
from bnprobe.training.evaluate import resolve_device

try:
    import transformers
except ImportError:  # the optional extra is not installed: said in one line when a model folder is given
    transformers = None

INSTALL = "pip install 'bnprobe[hf]'"


def expected_offset(model_type: str) -> float:
    """What a model type's RMSNorm adds to its weight: 1 for Gemma-style `(1 + w)` (the static probe's list,
    bnprobe.analysis.conventions.ONE_PLUS_W), else 0. Clamping the effective scale to 0 then writes w = -1. The
    convention measured on each module (bnprobe.nets.clamp_inplace.norm_offset) decides; this only names a
    mismatch (Qwen3-Next's gated norms, say, store alike but differ)."""
    return 1.0 if model_type in ONE_PLUS_W else 0.0


def require_transformers() -> Any:
    if transformers is None:
        raise BnprobeError(f"this is a Hugging Face transformers model folder; to build it, {INSTALL}")
    return transformers


# ---- the model --------------------------------------------------------------------------------------------

def build_model(folder: Path, config_json: dict[str, Any], meta: bool = False) -> tuple[nn.Module, str]:
    """The folder's model, built from its config.json with random weights (load_weights fills them), in eval
    mode; and its kind: "causal", "masked" (language models --text can measure) or "other". `meta`: on the meta
    device, no memory allocated (a config.json can ask for any size: it is checked against the weights first)."""
    tf = require_transformers()
    model_type = config_json["model_type"]
    if "auto_map" in config_json:
        raise BnprobeError(f"{folder}/config.json asks for the model's own code (auto_map); bnprobe never runs it "
                           f"(trust_remote_code), so it cannot build this model")
    if model_type not in tf.CONFIG_MAPPING:
        raise BnprobeError(f"transformers {tf.__version__} does not know model_type {printable(model_type)!r} of "
                           f"{folder}/config.json; a model that needs its own code is not built (trust_remote_code)")
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
        cls = _model_class(tf, config_json, config)
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    except BnprobeError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own failure on this config: one line
        raise BnprobeError(f"transformers cannot build the model of {folder}/config.json: {first_line(exc, typed=True)}")
    name = type(model).__name__
    kind = ("causal" if name in _mapping_names(tf, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
            else "masked" if name in _mapping_names(tf, "MODEL_FOR_MASKED_LM_MAPPING_NAMES") else "other")
    return model.float().eval().requires_grad_(False), kind


def _mapping_names(tf: Any, mapping: str) -> set[str]:
    names = getattr(tf.models.auto.modeling_auto, mapping, {})
    return {n for value in names.values() for n in ((value,) if isinstance(value, str) else value)}


def _model_class(tf: Any, config_json: dict[str, Any], config: Any) -> Any:
    """The class config.json's `architectures` names, when transformers has it; else the causal LM, masked LM or
    bare model registered for its model type."""
    architectures = config_json.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        cls = getattr(tf, architectures[0], None)
        if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
            return cls
    for auto in (tf.AutoModelForCausalLM, tf.AutoModelForMaskedLM, tf.AutoModel):
        if type(config) in auto._model_mapping:
            return auto
    raise BnprobeError(f"transformers has no model class for model_type {printable(config_json['model_type'])!r}")


def read_folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights, read by bnprobe's reader (safetensors, or torch files with
    weights_only=True), from one file or every shard of its index."""
    file = checkpoint_file(folder)
    files = read_index(file).shards if is_index(file) else [file]
    state: dict[str, torch.Tensor] = {}
    for shard in files:
        part, _ = extract_state_dict(read_weights(shard), shard)
        state.update(part)
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], folder: Path, check_only: bool = False) -> None:
    """Load strictly: every tensor of the model from the file (tied copies and the keys the model class itself
    declares optional aside), every tensor of the file into the model, every shape equal; one line naming the
    first differences otherwise. Old files' LayerNorm gamma/beta are read as weight/bias, as transformers reads
    them. `check_only`: the checks alone (on a model on the meta device)."""
    expected = model.state_dict(keep_vars=True)  # a tied tensor is one object under two names
    renamed = {}
    for key, value in state.items():
        for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
            if key.endswith(old) and key not in expected and key[: -len(old)] + new in expected:
                key = key[: -len(old)] + new
        renamed[key] = value
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and renamed and not any(k in expected for k in renamed):  # a bare model's file in a model with a head
        renamed = {f"{prefix}.{k}": v for k, v in renamed.items()}
    ignored = lambda key, attr: any(re.search(p, key) for p in (getattr(model, attr, None) or ()))  # noqa: E731
    unexpected = [k for k in renamed if k not in expected and not ignored(k, "_keys_to_ignore_on_load_unexpected")]
    shapes = [f"{k} {tuple(renamed[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in renamed and tuple(renamed[k].shape) != tuple(expected[k].shape)]
    loaded = {id(expected[k]) for k in expected if k in renamed}
    missing = [k for k in expected if k not in renamed and id(expected[k]) not in loaded
               and not ignored(k, "_keys_to_ignore_on_load_missing")]
    if missing or unexpected or shapes:
        parts = [f"{what} {listing([printable(k) for k in keys], 3)}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if keys]
        raise BnprobeError(f"{folder}: the weights do not match the model config.json builds: {'; '.join(parts)}")
    if check_only:
        return
    model.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False)


# ---- the command -----------------------------------------------------------------------------------------

def run_hf_ablation(path: Path, options: LoadOptions, settings: AblateOptions, *, out: Optional[Path] = None,
                    console: Optional[Any] = None) -> tuple[Any, Path]:
    """`bnprobe ablate MODEL_FOLDER (--eval F | --text FILE) --clamp-...`."""
    console = console or Console()
    settings.check()
    config_json = hf_config(path)
    if config_json is None:
        raise BnprobeError(f"{path} is not a Hugging Face model folder (a config.json with a model_type)")
    wrong = [flag for flag, value in (("--dataset", options.dataset), ("--mean", options.mean),
                                      ("--model-arg", options.model_arg)) if value]
    if wrong:
        raise BnprobeError(f"{wrong[0]} is for image models; a Hugging Face model is measured by --eval or --text")
    if settings.eval is None and settings.text is None:
        raise BnprobeError("say how to measure a Hugging Face model: --text FILE (language models: token loss and "
                           "perplexity) and/or --eval file.py:evaluate")
    require_transformers()
    device = resolve_device(options.device)
    out = out if out is not None else default_output([path], ABLATION_FILES[settings.mode])
    check_replaceable(out, ABLATION_FORMAT)
    evaluate_fn = load_eval(settings.eval) if settings.eval else None
    folder = Path(path).resolve()
    state = read_folder_state(folder)
    # The config checked against the weights on the meta device first: a config.json that asks for a model far
    # larger than its file is one line, not an allocation that takes the machine's memory.
    load_weights(build_model(folder, config_json, meta=True)[0], state, folder, check_only=True)
    model, kind = build_model(folder, config_json)
    load_weights(model, state, folder)
    del state
    model.to(device).eval()
    model_type = config_json["model_type"]
    norms = scale_norms(model)
    if not norms:
        raise BnprobeError(f"{folder}: its model has no LayerNorm or RMSNorm with a scale to clamp")
    broken = [name for name, m, _ in norms if not torch.isfinite(m.weight).all()]
    if broken:
        raise BnprobeError(f"{folder} holds NaN or infinite norm scales in {listing(broken)}; nothing to ablate")
    from_type = expected_offset(model_type)
    offsets = sorted({offset for _, _, offset in norms})
    measures: list[Callable[[], dict[str, float]]] = []
    attrs: dict[str, Any] = {"model_type": model_type, "architecture": type(model).__name__,
                             "scale_offsets": ",".join(f"{o:g}" for o in offsets), "dataset": "",
                             "test_images": 0, "train_images": 0}
    if settings.text is not None:
        measure, text_attrs = text_measure(model, kind, folder, settings, device)
        measures.append(measure)
        attrs.update(text_attrs)
    if evaluate_fn is not None:
        measures.append(eval_measure(evaluate_fn, model, settings.eval))
        attrs["eval"] = settings.eval

    def measure() -> dict[str, float]:
        metrics: dict[str, float] = {}
        for part in measures:
            row = part()
            clash = set(row) & set(metrics)
            if clash:
                raise BnprobeError(f"--eval returned {sorted(clash)[0]!r}, a name --text's metrics use; rename it")
            metrics.update(row)
        return metrics

    clampable = InPlaceNorms(model, norms)
    convention = ("effective scale 1 + w (Gemma style): clamped by w := -1" if offsets == [1.0]
                  else "scale w: clamped by w := 0" if offsets == [0.0] else "scales w and 1 + w, each by its own rule")
    mismatch = "" if from_type in offsets else f" (measured on the modules; model_type {model_type} suggested otherwise)"
    note = (f"{type(model).__name__} ({model_type}, {kind} model), {len(norms)} norm layers clamped in place; "
            f"{convention}{mismatch}.")
    result = ablate(clampable, measure, settings, out, console, evaluation="eval", attrs={
        "checkpoint": str(folder), "label": folder.name, "normalization": "", "device": str(device), **attrs,
        **provenance(load=options, ablate=settings)}, label=folder.name, note=note)
    return result, out
