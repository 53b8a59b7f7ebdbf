"""Helpers the benchmarks share: the reference's PIL data set, device sync and naming, and a measure
of how much of the machine other processes took while timing (a disturbed run says so)."""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from rich.console import Console


class ArrayImageDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: HWC uint8 arrays in memory, a PIL image per item."""

    def __init__(self, images_nchw: np.ndarray, labels: np.ndarray, transform: Callable):
        self.data = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process and its reaped children)."""
    try:
        import resource

        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        own = sum(
            getattr(resource.getrusage(who), attr)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for attr in ("ru_utime", "ru_stime")
        )
        return busy, own
    except (OSError, ImportError, ValueError, IndexError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report_disturbance(console: Console, others: Optional[float]) -> None:
    """Say how many cores other processes kept busy during the timing; warn when the numbers are disturbed."""
    if others is None:
        return
    line = f"other processes kept {others:.2f} of {os.cpu_count()} cores busy meanwhile"
    if others > 0.25:
        line = f"[yellow]warning: {line}; these numbers are disturbed, rerun on a quiet machine"
    console.print(line)
