"""Training throughput of bnprobe's step against a plain PyTorch loop, and BN-only against full training.

Two ratios, both measured in this one process on the same device:

1. images/s of bnprobe's training path / images/s of the standard recipe, same model (a fresh copy from
   the same seed for each path), same batch size and the same SGD (lr 0.1, momentum 0.9, weight decay 1e-4):
   - bnprobe: `bnprobe.data.device.DeviceLoader` over uint8 tensors already on the device (shuffle, flip,
     translate 4, random numbers from a torch.Generator on the device), driven by
     `bnprobe.training.train.train_one_epoch` (running loss/accuracy kept on the device);
   - reference: a torchvision-style Dataset of PIL images with
     `Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])`,
     a `torch.utils.data.DataLoader(shuffle=True, num_workers=W, pin_memory=<on CUDA>)`, and the plain
     loop `x, y = x.to(dev), y.to(dev); loss = F.cross_entropy(model(x), y); opt.zero_grad();
     loss.backward(); opt.step(); running += loss.item()`.
2. step time with only BatchNorm's gamma/beta trainable (`apply_freeze(model, "non-bn")`) / step time of
   full training (`apply_freeze(model, "none")`), both on bnprobe's path.

3. the compute ceiling: FLOPs of one training step per image (torch's FlopCounterMode) against the
   FLOP/s of a large matrix product measured on the same device. images/s at that ceiling is what a
   path with a free data path and convolutions at GEMM peak would reach, so ceiling / reference bounds
   the ratio any implementation of the same computation can show here.

With --compile, a fourth path times bnprobe's step under `torch.compile` (as `bnprobe train --compile`);
compilation happens in its first warm-up and is not timed (about a minute on a 2-core CPU).

Each path is warmed up (a few untimed steps; for the reference that includes starting its workers) and
then a fixed number of steps is timed; this is repeated for --rounds rounds, alternating the order of the
paths, and each path's images/s is the median over rounds, so that a slow patch of a shared machine
does not land on one path only (the CPU time other processes took meanwhile is printed too). Worker
processes of the reference are shut down between its rounds so they never run while another path is
timed. On CUDA the timers stop after torch.cuda.synchronize(). The data-only rows time each loader alone (batches produced
and moved to the device, no model), to show whether the data path can be the bottleneck.

Data: random uint8 images by default (--images N, default 5,000), so it runs anywhere; --data-dir DIR
reads CIFAR-10 from DIR instead (md5 check off, nothing downloaded; --images then keeps a subset).

Run from the repository root:

    .venv/bin/python bench/train_throughput.py                       # resnet20, CPU or CUDA, fp32
    .venv/bin/python bench/train_throughput.py --device cuda --amp    # bf16 autocast on both paths
    .venv/bin/python bench/train_throughput.py --data-dir ../shared/data --json bench.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from common import (  # noqa: E402
    ArrayImageDataset,
    cpu_seconds,
    device_name,
    device_or_exit,
    matmul_peak_flops,
    print_result,
    sync,
    training_step_flops,
    verdict,
)

from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.errors import BnprobeError  # noqa: E402
from bnprobe.data.device import DeviceLoader, load_dataset, normalization_stats  # noqa: E402
from bnprobe.nets.freeze import apply_freeze  # noqa: E402
from bnprobe.nets.registry import from_config  # noqa: E402
from bnprobe.training.train import compile_model, train_one_epoch  # noqa: E402

TARGET_SPEEDUP = 3.0  # bnprobe / reference images/s, from the issue
TARGET_BN_ONLY = 0.76  # BN-only / full step time, from the issue


# ---- data ------------------------------------------------------------------------------------------


def synthetic_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


class StepLoader(DeviceLoader):
    """bnprobe's DeviceLoader, cut to exactly `steps` batches (starting new epochs when one runs out)."""

    steps: int = 0
    images_seen: int = 0

    def __iter__(self):
        done = 0
        while True:
            for x, y in super().__iter__():
                if done == self.steps:
                    return
                done += 1
                self.images_seen += y.shape[0]
                yield x, y


# ---- timing ----------------------------------------------------------------------------------------


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """bnprobe's optimizer (train.py): only the tensors that train, lr 0.1, momentum 0.9, wd 1e-4."""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)


class BnprobePath:
    def __init__(self, name: str, model: nn.Module, loader: StepLoader, amp: bool, device: torch.device):
        self.name, self.model, self.loader, self.amp, self.device = name, model, loader, amp, device
        self.optimizer = sgd(model)
        self.rounds: list[tuple[int, float]] = []  # (images, seconds)

    def run_round(self, warmup: int, steps: int) -> None:
        self.loader.steps = warmup
        train_one_epoch(self.model, self.loader, self.optimizer, self.amp)
        sync(self.device)
        self.loader.steps, self.loader.images_seen = steps, 0
        started = time.perf_counter()
        train_one_epoch(self.model, self.loader, self.optimizer, self.amp)  # ends in .item(): a host sync
        sync(self.device)
        self.rounds.append((self.loader.images_seen, time.perf_counter() - started))


class ReferencePath:
    """The plain loop every tutorial has, over a torch DataLoader of PIL images."""

    def __init__(self, model: nn.Module, loader: torch.utils.data.DataLoader, amp: bool, device: torch.device):
        self.name, self.model, self.loader, self.amp, self.device = "reference", model, loader, amp, device
        self.optimizer = sgd(model)
        self.rounds: list[tuple[int, float]] = []
        self.running = 0.0

    def run_round(self, warmup: int, steps: int) -> None:
        model, optimizer, device = self.model, self.optimizer, self.device
        model.train()
        iterator = iter(self.loader)  # a new epoch: starts the workers (inside the warm-up, untimed)

        def step() -> int:
            nonlocal iterator
            try:
                x, y = next(iterator)
            except StopIteration:  # the next epoch, as `for epoch ...: for x, y in loader:` would start it
                iterator = iter(self.loader)
                x, y = next(iterator)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.running += loss.item()
            return len(y)

        for _ in range(warmup):
            step()
        sync(device)
        started = time.perf_counter()
        images = sum(step() for _ in range(steps))
        sync(device)
        self.rounds.append((images, time.perf_counter() - started))
        del iterator  # shuts the workers down, so they do not compete with the next path's timing


def prime_shape(model: nn.Module, batch: int, memory_format: torch.memory_format, amp: bool, device: torch.device):
    """One forward and backward pass on a batch of this size (gradients discarded, no optimizer step)."""
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    model.train()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)


def images_per_s(rounds: list[tuple[int, float]]) -> float:
    """The median over rounds: robust to a round that another process on the machine slowed down."""
    return float(np.median([n / s for n, s in rounds]))


def time_loader_only(batches: Callable[[], Any], device: torch.device, skip: int, steps: int) -> float:
    """images/s of a loader alone: `skip` batches untimed (worker start-up), then `steps` batches."""
    iterator = batches()
    for _ in range(skip):
        next(iterator)
    sync(device)
    started, images = time.perf_counter(), 0
    for _ in range(steps):
        x, y = next(iterator)
        images += y.shape[0]
    sync(device)
    seconds = time.perf_counter() - started
    del iterator
    return images / seconds


def cycle(make: Callable[[], Any]):
    while True:
        yield from make()


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="model from bnprobe's registry [resnet20]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast on both paths")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per path per round [5 on CPU, 100 on CUDA]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path per round [2 on CPU, 10 on CUDA]")
    p.add_argument("--rounds", type=int, default=4, help="rounds, alternating the order of the paths [4]")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic images [5000]; with --data-dir, a subset of the training set [all]")
    p.add_argument("--workers", type=int, default=min(cores, 8),
                   help=f"DataLoader workers of the reference [this machine's cores, max 8: {min(cores, 8)}]")
    p.add_argument("--data-dir", default=None, help="read CIFAR-10 from here instead of synthetic data")
    p.add_argument("--channels-last", default="auto", choices=("auto", "on", "off"),
                   help="memory format of both paths [auto: as `bnprobe train` (on)]")
    p.add_argument("--compile", action="store_true", help="also time bnprobe's step under torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here as JSON")
    args = p.parse_args(argv)
    for name in ("batch_size", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.steps is not None and args.steps < 1) or (args.warmup is not None and args.warmup < 0):
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from rich.console import Console
    from torchvision import transforms

    args = parse_args(argv)
    console = Console()
    device = device_or_exit(console, args.device)
    cuda = device.type == "cuda"
    steps = args.steps if args.steps is not None else (100 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    # auto: what `bnprobe train` does by default (TrainConfig.channels_last)
    channels_last = TrainConfig.channels_last if args.channels_last == "auto" else args.channels_last == "on"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = True  # as bnprobe's trainer does

    header = f"torch {torch.__version__} | {device.type}: {device_name(device)} | threads {torch.get_num_threads()}"
    console.print(f"[bold]{header}")

    # ---- the same uint8 images for both paths
    spec = get_dataset_spec("cifar10")
    if args.data_dir:
        try:
            data = load_dataset(
                "cifar10", Path(args.data_dir), device=device, subset=args.images or 0, download=False, verify=False
            )
        except BnprobeError as exc:
            console.print(f"[red]{exc}")
            raise SystemExit(2)
        train_x, train_y, mean, std = data.train_x, data.train_y, data.mean, data.std
        images_np, labels_np = train_x.cpu().numpy(), train_y.cpu().numpy()
        data_desc = f"CIFAR-10 from {args.data_dir} ({len(labels_np):,} train images)"
    else:
        images_np, labels_np = synthetic_arrays(args.images or 5000, args.seed)
        train_x, train_y = torch.from_numpy(images_np).to(device), torch.from_numpy(labels_np).to(device)
        mean, std = (t.to(device) for t in normalization_stats(train_x, spec.normalize))
        data_desc = f"synthetic uint8 ({len(labels_np):,} images)"

    config = TrainConfig(model=args.model, dataset="cifar10", batch_size=args.batch_size, seed=args.seed)
    try:
        config = config.resolved()
    except BnprobeError as exc:
        console.print(f"[red]{exc}")
        raise SystemExit(2)

    def fresh_model(freeze: str) -> nn.Module:
        model = from_config(config)  # seeds itself: the same tensors each time
        apply_freeze(model, freeze)
        return model.to(device, memory_format=memory_format)

    def bnprobe_loader(seed: int) -> StepLoader:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return StepLoader(
            train_x, train_y, mean, std, args.batch_size, shuffle=True, flip=config.flip,
            translate=config.translate, generator=generator, channels_last=channels_last,
        )

    # The standard recipe normalises per channel, in [0, 1] units.
    channel_mean = (images_np.mean(axis=(0, 2, 3)) / 255).tolist()
    channel_std = (images_np.std(axis=(0, 2, 3)) / 255).tolist()
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(channel_mean, channel_std),
    ])
    torch.manual_seed(args.seed)  # the DataLoader's shuffle
    reference_loader = torch.utils.data.DataLoader(
        ArrayImageDataset(images_np, labels_np, transform), batch_size=args.batch_size, shuffle=True,
        num_workers=args.workers, pin_memory=cuda,
    )

    full = BnprobePath("bnprobe", fresh_model("none"), bnprobe_loader(args.seed), args.amp, device)
    reference = ReferencePath(fresh_model("none"), reference_loader, args.amp, device)
    bn_only = BnprobePath("bnprobe BN-only", fresh_model("non-bn"), bnprobe_loader(args.seed), args.amp, device)
    paths = [full, reference, bn_only]
    if args.compile:
        compiled = BnprobePath(
            "bnprobe --compile", compile_model(fresh_model("none"), device), bnprobe_loader(args.seed), args.amp, device
        )
        paths.append(compiled)
    tail = len(labels_np) % args.batch_size
    if tail:
        # cudnn.benchmark tunes, and torch.compile compiles, each new input shape once: let them see the
        # short last batch of an epoch here, not inside whichever timed round first reaches an epoch's end.
        for path in paths:
            if cuda or path.name == "bnprobe --compile":
                prime_shape(path.model, tail, memory_format, args.amp, device)

    console.print(
        f"{args.model}, batch {args.batch_size}, {data_desc}, {'bf16 autocast' if args.amp else 'fp32'}, "
        f"channels_last={'on' if channels_last else 'off'}, reference workers={args.workers}; "
        f"{args.rounds} round(s) x {steps} timed steps (+{warmup} warm-up) per path"
    )
    started, cpu_before = time.perf_counter(), cpu_seconds()
    for r in range(args.rounds):
        for path in paths if r % 2 == 0 else paths[::-1]:
            path.run_round(warmup, steps)
            n, s = path.rounds[-1]
            console.print(f"  round {r + 1} {path.name:<16} {n / s:9,.1f} img/s  ({n} images in {s:.2f} s)")

    # The data paths alone: can either one keep up with the model?
    bn_data = bnprobe_loader(args.seed + 1)
    bn_data.steps = steps + warmup
    data_bnprobe = time_loader_only(lambda: iter(bn_data), device, warmup, steps)
    data_reference = time_loader_only(
        lambda: ((x.to(device), y.to(device)) for x, y in cycle(lambda: reference_loader)), device, warmup, steps
    )
    total_seconds = time.perf_counter() - started
    cpu_after = cpu_seconds()

    # The compute ceiling (not part of the disturbance window: it is short and uses every core).
    example = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp):
        flops_full = training_step_flops(fresh_model("none"), example)
        flops_bn_only = training_step_flops(fresh_model("non-bn"), example)
    peak = matmul_peak_flops(device, torch.bfloat16 if args.amp else torch.float32)
    # CPU time that other processes took while this ran: on a small machine it slows every path down
    # (more so with several threads per step), so it is reported next to the numbers.
    others_cores = None
    if cpu_before and cpu_after:
        others_cores = max(0.0, (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])) / total_seconds

    result: dict[str, Any] = {
        "torch": torch.__version__, "device": str(device), "device_name": device_name(device),
        "threads": torch.get_num_threads(), "model": args.model, "batch_size": args.batch_size, "amp": args.amp,
        "channels_last": channels_last, "workers": args.workers, "data": data_desc, "steps": steps,
        "warmup": warmup, "rounds": args.rounds,
        "images_per_s": {p.name: images_per_s(p.rounds) for p in paths},
        "rounds_detail": {p.name: [{"images": n, "seconds": s} for n, s in p.rounds] for p in paths},
        "data_only_images_per_s": {"bnprobe": data_bnprobe, "reference": data_reference},
        "seconds_total": total_seconds,
        "other_processes_busy_cores": others_cores,
        "cores": os.cpu_count(),
    }
    ceiling_full = peak / flops_full
    result["compute"] = {
        "matmul_peak_flops": peak, "train_step_flops_per_image": flops_full,
        "bn_only_step_flops_per_image": flops_bn_only, "ceiling_images_per_s": ceiling_full,
        "ceiling_over_reference": ceiling_full / result["images_per_s"]["reference"],
        "bnprobe_fraction_of_ceiling": result["images_per_s"]["bnprobe"] / ceiling_full,
    }
    speedup = result["images_per_s"]["bnprobe"] / result["images_per_s"]["reference"]
    bn_ratio = result["images_per_s"]["bnprobe"] / result["images_per_s"]["bnprobe BN-only"]  # = time ratio
    result["bnprobe_over_reference"] = speedup
    result["bn_only_over_full_step_time"] = bn_ratio

    def spread(path: Any) -> str:
        rates = [n / s for n, s in path.rounds]
        return f"median of {len(rates)} rounds ({min(rates):,.1f} - {max(rates):,.1f})"


    rows = [
        ("device", str(device), device_name(device)),
        ("model", args.model, f"{'bf16 autocast' if args.amp else 'fp32'}, channels_last {'on' if channels_last else 'off'}"),
        ("batch", str(args.batch_size), data_desc),
        ("bnprobe images/s", f"{result['images_per_s']['bnprobe']:,.1f}", f"DeviceLoader + train_one_epoch; {spread(full)}"),
        ("reference images/s", f"{result['images_per_s']['reference']:,.1f}",
         f"DataLoader(PIL, {args.workers} workers) + plain loop; {spread(reference)}"),
        ("bnprobe / reference", f"{speedup:.2f}x", f"target >= {TARGET_SPEEDUP:g}x: {verdict(speedup >= TARGET_SPEEDUP)}"),
        ("BN-only images/s", f"{result['images_per_s']['bnprobe BN-only']:,.1f}",
         f"apply_freeze(model, 'non-bn'); {spread(bn_only)}"),
        ("BN-only / full step time", f"{bn_ratio:.2f}x",
         f"target <= {TARGET_BN_ONLY:g}x: {verdict(bn_ratio <= TARGET_BN_ONLY)}"),
        ("compute ceiling images/s", f"{ceiling_full:,.0f}",
         f"{peak / 1e9:,.0f} GFLOP/s matmul peak / {flops_full / 1e6:,.0f} MFLOP per image "
         f"(BN-only: {flops_bn_only / 1e6:,.0f}); bnprobe runs at {result['compute']['bnprobe_fraction_of_ceiling']:.0%} of it"),
        ("ceiling / reference", f"{result['compute']['ceiling_over_reference']:.2f}x",
         "the most any data path + kernels could show here for this computation"),
        ("data only: bnprobe", f"{data_bnprobe:,.0f}", "images/s of DeviceLoader alone"),
        ("data only: reference", f"{data_reference:,.0f}", "images/s of DataLoader + .to(device) alone"),
    ]
    if args.compile:
        rate = result["images_per_s"]["bnprobe --compile"]
        result["compiled_over_reference"] = rate / result["images_per_s"]["reference"]
        rows.insert(6, ("bnprobe --compile images/s", f"{rate:,.1f}",
                        f"{result['compiled_over_reference']:.2f}x the reference; {spread(compiled)}"))
    console.print(f"({total_seconds:.0f} s of timing and warm-up)")
    print_result(console, header, rows, others_cores, result, args.json)
    return result


if __name__ == "__main__":
    main()
