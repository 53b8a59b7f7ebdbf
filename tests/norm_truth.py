"""Ground truth for the norm finder (tests/test_norm_recall.py): real architectures of timm and Hugging Face
transformers built on the meta device (no weights, nothing downloaded), and the normalisation layers their module
types say they hold."""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

# Small enough to build quickly, large enough to keep every kind of layer: a model's stack of blocks is cut to 2.
SHRINK = {"num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "encoder_layers": 2, "decoder_layers": 2,
          "num_decoder_layers": 2}
# Transformers families in the suite (every model type it lists under BNPROBE_RECALL=all, `make recall`):
# decoders, encoders, encoder-decoders, speech, vision, state-space and recurrent models, multimodal.
TRANSFORMERS_SUITE = (
    "bert", "roberta", "albert", "electra", "deberta-v2", "ibert", "gpt2", "gpt_neox", "gptj", "bloom", "opt",
    "falcon", "mpt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_next", "gemma", "gemma2", "gemma3_text",
    "recurrent_gemma", "phi", "phi3", "cohere", "stablelm", "olmo2", "granite", "t5", "bart", "whisper", "wav2vec2",
    "hubert", "clip", "siglip", "vit", "beit", "swinv2", "convnext", "convnextv2", "resnet", "mobilenet_v2",
    "efficientnet", "dinov2", "detr", "segformer", "mamba", "mamba2", "rwkv", "bit", "levit", "mobilevit",
    "encodec", "paligemma",
)


def is_norm_class(module: nn.Module) -> bool:
    """A normalisation layer by its type: PyTorch's (BatchNorm*, InstanceNorm*, LayerNorm, GroupNorm, RMSNorm) or a
    class named like one (LlamaRMSNorm, LayerNorm2d, GlobalResponseNorm, ConvNextV2GRN, FrozenBatchNorm2d). Not
    timm's NormFreeBlock (an NFNet's residual block) nor a NormedEmbedding (an embedding; its norm is a child)."""
    name = type(module).__name__
    return (isinstance(module, (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
            or ("Norm" in name and "NormFree" not in name and "Normed" not in name) or "GRN" in name)


def truth(model: nn.Module) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """(module name -> class name of every norm that holds tensors of its own in the state dict, the state dict's
    names -> shapes in its order)."""
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    norms = {}
    for name, module in model.named_modules():
        own = [leaf for leaf, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
        if is_norm_class(module) and any((f"{name}.{leaf}" if name else leaf) in shapes for leaf in own):
            norms[name or "(top level)"] = type(module).__name__
    return norms, shapes


# Size words in timm's model names, smallest first: a family is built in its smallest variant (quick on meta).
SIZES = ("atto", "femto", "pico", "nano", "tiny", "mini", "xxs", "xs", "small", "lite", "light")


def _size_rank(name: str) -> tuple[int, int, str]:
    rank = next((i for i, word in enumerate(SIZES) if word in name), len(SIZES))
    return rank, len(name), name


def timm_families() -> dict[str, str]:
    """One model per family (module of timm.models) timm lists: its smallest by name."""
    import timm
    from timm.models import _registry

    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(_registry._model_to_module[name], []).append(name)
    return {family: min(names, key=_size_rank) for family, names in families.items()}


def build_timm(name: str) -> nn.Module:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def transformers_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return [t for t in CONFIG_MAPPING_NAMES if t in MODEL_MAPPING_NAMES]


def build_transformers(model_type: str) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModel

    transformers.logging.set_verbosity_error()
    config = AutoConfig.for_model(model_type)
    for key, value in SHRINK.items():
        if isinstance(getattr(config, key, None), int) and getattr(config, key) > value:
            setattr(config, key, value)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return AutoModel.from_config(config)


def architectures(everything: bool = False) -> Iterator[tuple[str, str]]:
    """(library, name) of the architectures measured: every timm family, and the transformers suite (every model
    type transformers lists with `everything`)."""
    for name in timm_families().values():
        yield "timm", name
    for model_type in (transformers_types() if everything else TRANSFORMERS_SUITE):
        yield "transformers", model_type


def run_everything() -> bool:
    return os.environ.get("BNPROBE_RECALL") == "all"


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_sparse_safetensors(path, tensors: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """A safetensors file of `tensors` (meta tensors: names, shapes, dtypes) where only `values` hold bytes: every
    other tensor is a hole of the file (sparse on disk, zeros when read), so a model of millions of parameters
    costs the few kilobytes of its norms."""
    import json
    import struct

    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        base = f.tell()
        for name, value in values.items():
            f.seek(base + header[name]["data_offsets"][0])
            f.write(value.detach().to(tensors[name].dtype).contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(base + offset)
