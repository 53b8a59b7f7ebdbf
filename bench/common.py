"""Helpers the benchmarks share: the reference's PIL data set, device sync and naming, and a measure
of how much of the machine other processes took while timing (a disturbed run says so)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

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


def device_or_exit(console: Console, name: str) -> torch.device:
    """The --device to measure on, or its one-line error and exit 2 (as the bnprobe command answers)."""
    from bnprobe.core.errors import BnprobeError
    from bnprobe.training.evaluate import resolve_device

    try:
        return resolve_device(name)
    except BnprobeError as exc:
        console.print(f"[red]{exc}")
        raise SystemExit(2)


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


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large matrix product on this device: the best dense throughput the model's
    convolutions (GEMMs underneath) could reach here, measured rather than taken from a data sheet."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - started))
    return statistics.median(rates)


def training_step_flops(model: torch.nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward + backward pass per image, as autograd runs it (frozen weights get no
    weight-gradient convolution), counted by torch's FlopCounterMode (convolutions and matmuls)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    labels = torch.zeros(example.shape[0], dtype=torch.long, device=example.device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(example), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / example.shape[0]


def verdict(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]not met[/]"


def print_result(
    console: Console, header: str, rows: list[tuple[str, str, str]], others: Optional[float],
    result: dict[str, Any], json_path: Optional[str],
) -> None:
    """The closing table every benchmark prints (name, number, how it was measured), the disturbance
    line, and the numbers as JSON when asked."""
    from rich.table import Table

    table = Table(title=header, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    for row in rows:
        table.add_row(*row)
    console.print(table)
    report_disturbance(console, others)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")
