"""A γ clamp sweep (20 thresholds by default) with bnprobe's path against the naive way, in one process.

Both paths compute the same numbers (test loss and accuracy with γ := 0 wherever |γ| < τ, β kept) for every
threshold of the same checkpoint, on the same device and the same images:

- bnprobe (`bnprobe.analysis.ablate`): load the checkpoint and the test set once (uint8 images resident on the
  device, `DeviceLoader` with large eval batches), fold every conv -> BN pair once (`ClampableModel`),
  then per threshold only rewrite the folded weights with that threshold's mask and evaluate
  (`bnprobe.analysis.ablate.sweep`). The timing includes the one-time load and fold.
- naive: per threshold, `torch.load` the checkpoint again, rebuild the model, zero the small γ on the BN
  modules, and evaluate through a torchvision-style Dataset of PIL images with
  `Compose([ToTensor(), Normalize(mean, std)])` and a fresh `torch.utils.data.DataLoader(batch_size=B,
  num_workers=W, pin_memory=<on CUDA>)`, in the usual `model.eval(); with torch.no_grad(): for x, y in
  loader: x, y = x.to(dev), y.to(dev); ...; loss += F.cross_entropy(...).item()` loop.

The checkpoint is a bnprobe checkpoint of --model with Frankle's init (γ ~ U[0, 1], so thresholds in
[0, 0.2] clamp 0-20% of the channels) and BN running statistics estimated on the data, unless --checkpoint
names a real one. Data: random uint8 CIFAR-shaped images by default (--images N), so it runs anywhere;
--data-dir DIR reads the CIFAR-10 test set from DIR instead (md5 check off, nothing downloaded).
The accuracies of the two paths are compared at the end (they differ only by float rounding).

Run from the repository root:

    .venv/bin/python bench/ablate_sweep.py                          # resnet20, CPU (or CUDA if present)
    .venv/bin/python bench/ablate_sweep.py --device cuda --images 10000
    .venv/bin/python bench/ablate_sweep.py --data-dir ../shared/data --json ablate.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from common import ArrayImageDataset, cpu_seconds, device_name, device_or_exit, print_result, sync, verdict  # noqa: E402

from bnprobe.analysis.ablate import default_batch_size, sweep  # noqa: E402
from bnprobe.analysis.loading import load_eval_data, load_model
from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.errors import BnprobeError  # noqa: E402
from bnprobe.core.options import (
    LoadOptions,  # noqa: E402
    parse_sweep,  # noqa: E402
)
from bnprobe.data.device import DeviceDataset, DeviceLoader, load_dataset, normalization_stats  # noqa: E402
from bnprobe.files import runs  # noqa: E402
from bnprobe.nets.fold import ClampableModel, check_fold  # noqa: E402
from bnprobe.nets.norms import bn_layers  # noqa: E402
from bnprobe.nets.registry import from_config

TARGET_SPEEDUP = 3.0  # naive seconds / bnprobe seconds for the whole sweep, from the issue


# ---- data and checkpoint -----------------------------------------------------------------------------


class PixelNormalize:
    """Normalize with (C, H, W) statistics in 0..1 units, for checkpoints trained with per-pixel ones."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean.float(), std.float()

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


def make_checkpoint(path: Path, model_name: str, train_x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                    seed: int) -> None:
    """A bnprobe checkpoint with Frankle's init and BN running statistics estimated on `train_x`."""
    config = TrainConfig(model=model_name, dataset="cifar10", seed=seed, device="cpu", normalize="per-channel").resolved()
    model = from_config(config)
    for _, bn in bn_layers(model, with_gamma=True):
        bn.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        x = ((train_x[:1024].float() - mean.cpu()) / std.cpu())
        for start in range(0, len(x), 256):
            model(x[start:start + 256])
    runs.save_checkpoint(path, {
        "config": config.to_dict(), "epoch": 0, "finished": False, "model": model.state_dict(),
        "normalization": {"mean": mean.cpu(), "std": std.cpu()}, "history": [],
    })


# ---- the two paths -------------------------------------------------------------------------------------


def bnprobe_sweep(checkpoint: Path, taus: list[float], device: torch.device, images: int, batch_size: int,
                  data_dir: Optional[Path], synthetic: Optional[DeviceDataset],
                  ) -> tuple[float, list[float], dict[str, float]]:
    """Everything `bnprobe ablate` does for the test set: load once, fold once, mask per threshold."""
    sync(device)
    started = time.perf_counter()
    options = LoadOptions(device=str(device), dataset="cifar10", data_dir=data_dir, download=False, verify=False)
    loaded = load_model(checkpoint, options, device)
    # Synthetic data goes in through load_eval_data's cache, under the key it will look up (its data_dir is
    # the checkpoint's, ./data, which holds no CIFAR-10 on a fresh clone).
    cache = {} if synthetic is None else {(loaded.dataset, str(loaded.data_dir), images, str(device)): synthetic}
    data = load_eval_data(loaded, device, test_subset=images, cache=cache)
    channels_last, memory_format = True, torch.channels_last  # as `bnprobe ablate`
    loader = DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size, channels_last=channels_last)
    clampable = ClampableModel(loaded.model, fold=True).to(device, memory_format=memory_format)
    first = next(iter(loader))[0]
    loaded.model.to(memory_format=memory_format)
    check_fold(loaded.model, clampable, first[:128])
    load_seconds = time.perf_counter() - started
    result = sweep(clampable, taus, {"test": loader})
    sync(device)
    seconds = time.perf_counter() - started
    return seconds, result.metrics["test_acc"].tolist(), {"load_and_fold": load_seconds, "sweep": result.seconds,
                                                          "evaluations": result.evaluations}


def naive_sweep(checkpoint: Path, taus: list[float], device: torch.device, images_np: np.ndarray,
                labels_np: np.ndarray, batch_size: int, workers: int) -> tuple[float, list[float]]:
    from torchvision import transforms

    sync(device)
    started = time.perf_counter()
    accuracies = []
    for tau in taus:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = from_config(TrainConfig.from_dict(state["config"]))
        model.load_state_dict(state["model"])
        model.to(device).eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.weight[module.weight.abs() < tau] = 0
        mean, std = state["normalization"]["mean"] / 255, state["normalization"]["std"] / 255
        if mean.shape[1:] == (1, 1):  # per channel: what torchvision users write
            normalize = transforms.Normalize(mean.flatten().tolist(), std.flatten().tolist())
        else:  # a per-pixel checkpoint (bnprobe's CIFAR default)
            normalize = PixelNormalize(mean, std)
        transform = transforms.Compose([transforms.ToTensor(), normalize])
        loader = torch.utils.data.DataLoader(
            ArrayImageDataset(images_np, labels_np, transform), batch_size=batch_size, shuffle=False,
            num_workers=workers, pin_memory=device.type == "cuda",
        )
        correct, loss, n = 0, 0.0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                n += len(y)
        accuracies.append(correct / n)
    sync(device)
    return time.perf_counter() - started, accuracies


# ---- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="model from bnprobe's registry [resnet20]")
    p.add_argument("--checkpoint", default=None, help="a bnprobe checkpoint (CIFAR-10 shaped) instead of a fresh one")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--thresholds", default="0:0.2:20", help="τ values, bnprobe's sweep syntax [0:0.2:20]")
    p.add_argument("--images", type=int, default=None, help="test images [1000 on CPU, 10000 on CUDA]")
    p.add_argument("--batch-size", type=int, default=None, help="bnprobe's eval batch [`bnprobe ablate`'s: 256 on CPU, 4000 on CUDA]")
    p.add_argument("--naive-batch-size", type=int, default=256, help="the naive DataLoader's batch [256]")
    p.add_argument("--workers", type=int, default=min(cores, 8),
                   help=f"DataLoader workers of the naive path [this machine's cores, max 8: {min(cores, 8)}]")
    p.add_argument("--data-dir", default=None, help="read the CIFAR-10 test set from here instead of synthetic data")
    p.add_argument("--rounds", type=int, default=1, help="rounds, alternating the order of the paths [1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here as JSON")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from rich.console import Console

    args = parse_args(argv)
    console = Console()
    device = device_or_exit(console, args.device)
    try:
        taus = parse_sweep(args.thresholds, "--thresholds")
    except BnprobeError as exc:
        console.print(f"[red]{exc}")
        raise SystemExit(2)
    cuda = device.type == "cuda"
    images = args.images or (10000 if cuda else 1000)
    batch_size = args.batch_size or default_batch_size(str(device))
    if cuda:
        torch.backends.cudnn.benchmark = True  # as `bnprobe ablate` does; the naive path gets it too
    header = f"torch {torch.__version__} | {device.type}: {device_name(device)} | threads {torch.get_num_threads()}"
    console.print(f"[bold]{header}")

    data_dir = Path(args.data_dir) if args.data_dir else None
    spec = get_dataset_spec("cifar10")
    synthetic = None
    if data_dir:
        data = load_dataset("cifar10", data_dir, device=device, normalize="per-channel", test_subset=images,
                            download=False, verify=False)
        data_desc = f"CIFAR-10 test set from {data_dir} ({len(data.test_y):,} images)"
    else:
        # Synthetic CIFAR-shaped data, handed to the bnprobe path through load_eval_data's cache.
        rng = np.random.default_rng(args.seed)
        train_np = rng.integers(0, 256, (2048, 3, 32, 32), dtype=np.uint8)
        test_np = rng.integers(0, 256, (images, 3, 32, 32), dtype=np.uint8)
        to = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        train_x = to(train_np)
        mean, std = (t.to(device) for t in normalization_stats(train_x, "per-channel"))
        data = synthetic = DeviceDataset(spec, train_x, to(rng.integers(0, 10, 2048)), to(test_np),
                                         to(rng.integers(0, 10, images)), mean, std)
        data_desc = f"synthetic uint8 CIFAR-shaped ({images:,} test images)"
    test_np, labels_np = data.test_x.cpu().numpy(), data.test_y.cpu().numpy()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(tmp) / "checkpoint.pt"
        if not args.checkpoint:
            make_checkpoint(checkpoint, args.model, data.train_x.cpu(), data.mean, data.std, args.seed)
        console.print(
            f"{args.model}, {len(taus)} thresholds {taus[0]:g}..{taus[-1]:g}, {data_desc}; bnprobe batch {batch_size}, "
            f"naive batch {args.naive_batch_size} with {args.workers} workers; {args.rounds} round(s)"
        )
        # Warm-up (untimed): kernels, cudnn autotuning and the page cache for both paths.
        bnprobe_sweep(checkpoint, taus[:1], device, images, batch_size, data_dir, synthetic)
        naive_sweep(checkpoint, taus[:1], device, test_np[:512], labels_np[:512], args.naive_batch_size, 0)

        timings: dict[str, list[float]] = {"bnprobe": [], "naive": []}
        accuracy: dict[str, list[float]] = {}
        detail: dict[str, Any] = {}
        started, cpu_before = time.perf_counter(), cpu_seconds()
        for r in range(args.rounds):
            for name in (("naive", "bnprobe") if r % 2 == 0 else ("bnprobe", "naive")):
                if name == "bnprobe":
                    seconds, accuracy[name], detail = bnprobe_sweep(checkpoint, taus, device, images, batch_size,
                                                                    data_dir, synthetic)
                else:
                    seconds, accuracy[name] = naive_sweep(checkpoint, taus, device, test_np, labels_np,
                                                          args.naive_batch_size, args.workers)
                timings[name].append(seconds)
                console.print(f"  round {r + 1} {name:<8} {seconds:8.2f} s  ({seconds / len(taus):.3f} s per threshold)")
        total_seconds = time.perf_counter() - started
        cpu_after = cpu_seconds()

    others = None
    if cpu_before and cpu_after:
        others = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / total_seconds
    best = {name: float(np.median(t)) for name, t in timings.items()}
    ratio = best["naive"] / best["bnprobe"]
    max_diff = float(np.max(np.abs(np.array(accuracy["naive"]) - np.array(accuracy["bnprobe"]))))
    result = {
        "torch": torch.__version__, "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(), "model": args.model, "thresholds": taus, "images": len(labels_np),
        "data": data_desc, "batch_size": batch_size, "naive_batch_size": args.naive_batch_size,
        "workers": args.workers, "rounds": args.rounds, "seconds": timings, "median_seconds": best,
        "naive_over_bnprobe": ratio, "bnprobe_detail": detail, "max_accuracy_difference": max_diff,
        "accuracy": accuracy, "other_processes_busy_cores": others, "cores": os.cpu_count(),
    }


    n = len(taus)
    rows = [
        ("device", str(device), device_name(device)),
        ("sweep", f"{n} τ", f"{args.model}, {data_desc}"),
        ("bnprobe", f"{best['bnprobe']:.2f} s", f"{best['bnprobe'] / n:.3f} s/τ; load + fold "
         f"{detail.get('load_and_fold', float('nan')):.2f} s, {detail.get('evaluations', '?')} evaluations"),
        ("naive", f"{best['naive']:.2f} s", f"{best['naive'] / n:.3f} s/τ; reload + DataLoader({args.workers} workers) per τ"),
        ("naive / bnprobe", f"{ratio:.2f}x", f"target >= {TARGET_SPEEDUP:g}x: {verdict(ratio >= TARGET_SPEEDUP)}"),
        ("max |Δ accuracy|", f"{max_diff:.4f}", "between the paths, over all τ (float rounding only)"),
    ]
    print_result(console, header, rows, others, result, args.json)
    return result


if __name__ == "__main__":
    main()
