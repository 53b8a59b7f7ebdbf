"""Measuring a model, shared by training and analysis: the device, the fixed training images, the eval loop.

Training measures its eval-mode train accuracy here, and probe and ablate re-measure a checkpoint here, so
the numbers they print are the same numbers: same images (`bnprobe.data.device.fixed_subset`), same loop (`evaluate`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from bnprobe.core.config import check_device
from bnprobe.core.errors import BnprobeError
from bnprobe.data.device import DeviceLoader


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` to a device this machine has; anything else is one line."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BnprobeError(f"--device {name} was given but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BnprobeError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    """bf16 autocast when `enabled`; `cache=False` inside a CUDA graph capture (PyTorch asks it: a cached cast
    would be a tensor of the capture's memory, reused across steps)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache) if enabled else nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader, amp: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over `loader`, in eval mode (BN uses running statistics); (0, 0) when
    the loader is empty. Forward hooks on `model` (probe's ReLU recorder) see every batch."""
    was_training = model.training
    model.eval()
    device = loader.labels.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        with autocast(device, amp):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = max(1, len(loader.labels))
    return loss_sum.item() / n, correct.item() / n
