"""Cost of recording gradient telemetry: bnprobe's training step with and without the GradientRecorder.

Both variants run in this one process on the same model, data and device, alternating for --rounds
rounds; each variant's time per step is the median over rounds. The recorder does two fused
reductions (`torch._foreach_norm`, ord 1 and 2) over the trainable gradients per recorded step, into a
buffer on the device, and one host copy per epoch (included in the timing: `drain()` after each round).
Target from the issue: overhead <= 3% of step time.

    .venv/bin/python bench/telemetry_overhead.py                     # resnet20, CIFAR-shaped, CPU or CUDA
    .venv/bin/python bench/telemetry_overhead.py --freeze non-bn --every 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.data.device import DeviceLoader  # noqa: E402
from bnprobe.nets.freeze import apply_freeze  # noqa: E402
from bnprobe.nets.registry import from_config  # noqa: E402
from bnprobe.training.evaluate import resolve_device  # noqa: E402
from bnprobe.training.graphs import TrainStep  # noqa: E402
from bnprobe.training.telemetry import GradientRecorder  # noqa: E402
from bnprobe.training.train import train_one_epoch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--freeze", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--every", type=int, default=1, help="record every N steps")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    device = resolve_device(args.device)
    channels_last = device.type == "cuda"
    n = args.steps * args.batch_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=generator)
    labels = torch.randint(0, 10, (n,), device=device, generator=generator)
    mean, std = torch.full((3, 1, 1), 128.0, device=device), torch.full((3, 1, 1), 64.0, device=device)
    loader = DeviceLoader(images, labels, mean, std, args.batch_size, shuffle=True, flip=True, translate=4,
                          generator=generator, channels_last=channels_last)

    model = from_config(TrainConfig(model=args.model))
    apply_freeze(model, args.freeze)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    recorder = GradientRecorder(model, args.every, len(loader))
    steps = {False: TrainStep(model, optimizer, args.amp), True: TrainStep(model, optimizer, args.amp, recorder=recorder)}

    def timed(use_recorder: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(model, loader, optimizer, args.amp, step=steps[use_recorder])
        if use_recorder:
            recorder.drain()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(loader)

    timed(False), timed(True)  # warm-up
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for use in ((False, True) if r % 2 == 0 else (True, False)):
            times[use].append(timed(use))
    plain, recorded = statistics.median(times[False]), statistics.median(times[True])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} | {name} | {args.model} freeze={args.freeze} batch {args.batch_size} "
          f"amp={args.amp} every={args.every} | {args.rounds} rounds x {len(loader)} steps")
    print(f"step without telemetry: {plain * 1e3:8.2f} ms")
    print(f"step with telemetry:    {recorded * 1e3:8.2f} ms")
    overhead = recorded / plain - 1
    print(f"overhead: {overhead:+.2%} (target <= 3%: {'met' if overhead <= 0.03 else 'NOT met'})")


if __name__ == "__main__":
    main()
