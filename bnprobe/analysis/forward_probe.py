"""The probe's forward pass (torch): a checkpoint rebuilt as its model, run on real images, its normalisation
modules' γ/β and its ReLUs' sparsity measured. bnprobe.analysis.probe imports it only for a checkpoint that needs
it (a bnprobe run, or --model/--dataset), so that a static probe never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.analysis.loading import check_forward, load_eval_data, load_model
from bnprobe.analysis.norm_finder import layer_kind
from bnprobe.analysis.probe_results import NormStats, ProbeResult
from bnprobe.analysis.relu import relu_sparsity
from bnprobe.core.options import LoadOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.nets.norms import has_affine, norm_channels, norm_layers
from bnprobe.training.evaluate import resolve_device


def module_kind(module: nn.Module) -> str:
    """A normalisation module's kind, by the rule that decides a file's tensors' (norm_finder.layer_kind)."""
    return layer_kind(isinstance(module, _BatchNorm), getattr(module, "bias", None) is not None)


def _numpy(tensor: Any) -> Any:
    return None if tensor is None else tensor.detach().cpu().double().numpy().reshape(-1)


def bn_statistics(model: nn.Module) -> NormStats:
    """Every normalisation layer bnprobe.nets.norms lists (BatchNorm, GroupNorm, LayerNorm), in module order: γ/β
    flat (one value per channel or, for a LayerNorm over (C, H, W), per element) and, where the module keeps them,
    its running statistics; BatchNorm layers without γ as statistics-only."""
    layers = norm_layers(model)
    affine = [(name, m) for name, m in layers if has_affine(m)]
    return NormStats.from_tensors(
        [(name, (_numpy(m.weight), _numpy(getattr(m, "bias", None)), _numpy(getattr(m, "running_mean", None)),
                 _numpy(getattr(m, "running_var", None)))) for name, m in affine],
        [(name, norm_channels(m)) for name, m in layers  # nothing to measure without γ or statistics
         if not has_affine(m) and getattr(m, "running_mean", None) is not None],
        [module_kind(m) for _, m in affine])


def probe_model(model: nn.Module, loader: DeviceLoader, label: str, path: str, attrs: dict[str, Any]) -> ProbeResult:
    sites, loss, accuracy, images = relu_sparsity(model, loader)
    return ProbeResult(label, path, attrs, bn_statistics(model), sites, loss, accuracy, images)


def device_for(options: LoadOptions) -> torch.device:
    return resolve_device(options.device)


def probe_checkpoint(path: Path, options: LoadOptions, device: torch.device, images: int, batch_size: int,
                     cache: dict) -> ProbeResult:
    """One checkpoint rebuilt as its model on `device` and probed on `images` test images (`cache`: the eval
    data, loaded once for every checkpoint of one data set)."""
    loaded = load_model(path, options, device)
    data = load_eval_data(loaded, device, test_subset=images, cache=cache)
    channels_last = device.type == "cuda"
    if channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size, channels_last=channels_last)
    check_forward(loaded.model, next(iter(loader))[0], loaded.label, loaded.dataset)
    attrs = {"source": loaded.source, "dataset": loaded.dataset, "normalization": loaded.norm_source,
             **{k: v for k, v in loaded.meta.items() if v is not None}}
    return probe_model(loaded.model, loader, loaded.label, str(loaded.path), attrs)
