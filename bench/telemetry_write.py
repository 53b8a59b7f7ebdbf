"""Cost of writing telemetry.h5 per epoch: bnprobe's in-place append (through a journal) against the path it
replaced (the whole file read into memory, appended to, and written back atomically every epoch).

Both paths run in this one process, epoch by epoch in turn, with bnprobe's TelemetryWriter on a ResNet-152 (155 BN layers, 75,712
channels: a snapshot of γ, β, running mean and variance is 1.2 MB per epoch), for --epochs synthetic epochs:
each epoch the BN tensors drift by random noise and --steps gradient rows (alternately one fewer, so the
steps datasets' chunks do not line up with the epochs) are recorded for all 465 parameter tensors. Timed:
`write_epoch` alone, in wall-clock and in CPU time of this process (user + system: what other processes
on a shared machine do not change; copying into the page cache is system time). Bytes written: this
process's `wchar` (/proc/self/io: every byte passed to write(2), pwrite(2), ...) over the writes. Targets from the issue: last-10/first-10 per-epoch time <= 1.3, bytes
written <= 2x the final file. The two final files are compared row for row at the end.

    .venv/bin/python bench/telemetry_write.py                  # 160 epochs, both paths (the old one is slow)
    .venv/bin/python bench/telemetry_write.py --epochs 40 --dir /dev/shm
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without installing the package

from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.files import store  # noqa: E402
from bnprobe.files.atomic import atomic_write  # noqa: E402
from bnprobe.files.schema import check_telemetry, open_h5  # noqa: E402
from bnprobe.nets.norms import bn_layers  # noqa: E402
from bnprobe.nets.registry import from_config  # noqa: E402
from bnprobe.training import telemetry


@contextmanager
def whole_file_copy(path: Path):
    """The replaced path: copy the whole file into memory, update it there, write it all back atomically."""
    buffer = io.BytesIO(Path(path).read_bytes())
    with h5py.File(buffer, "r+") as f:
        yield f
    atomic_write(path, lambda out: out.write(buffer.getbuffer()))


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


@contextmanager
def old_path():
    """TelemetryWriter as it was: every update a whole-file copy, the file in HDF5's default format."""
    saved = telemetry.appending_h5, telemetry.atomic_h5
    telemetry.appending_h5 = whole_file_copy
    telemetry.atomic_h5 = lambda path, **options: store.atomic_h5(path)
    try:
        yield
    finally:
        telemetry.appending_h5, telemetry.atomic_h5 = saved


class Writer:
    """One path's TelemetryWriter on its own ResNet-152 (the same tensors and rows in both paths)."""

    def __init__(self, name: str, run_dir: Path, epochs: int, steps: int, old: bool):
        config = TrainConfig(model="resnet152", epochs=epochs, subset=steps * 128, batch_size=128, telemetry_every=1)
        self.name, self.old, self.model = name, old, from_config(config)
        recorder = telemetry.GradientRecorder(self.model, 1, steps)
        rng = np.random.default_rng(0)

        def drain():  # synthetic gradient rows, alternately `steps` and `steps - 1` of them
            n = steps - (recorder.step % 2)
            rows = rng.random((n, len(recorder.names)), dtype=np.float32)
            out = np.arange(recorder.step, recorder.step + n), rows / 100, rows
            recorder.step += n
            return out

        recorder.drain = drain
        self.writer = telemetry.TelemetryWriter(run_dir, self.model, config, recorder)
        with old_path() if old else nullcontext():
            self.writer.start(0)
        self.generator = torch.Generator().manual_seed(0)
        self.seconds, self.cpu, self.written = [], [], 0

    def write(self, epoch: int) -> None:
        with torch.no_grad():
            for _, layer in bn_layers(self.model):
                for tensor in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
                    tensor.add_(torch.randn(tensor.shape, generator=self.generator) * 0.01)
        record = {field: float(epoch) for field in telemetry.EPOCH_FIELDS}
        with old_path() if self.old else nullcontext():
            before, start, start_cpu = written_bytes(), time.perf_counter(), time.process_time()
            self.writer.write_epoch(record)
            self.seconds.append(time.perf_counter() - start)
            self.cpu.append(time.process_time() - start_cpu)
            self.written += written_bytes() - before

    def result(self) -> dict:
        ends = {f"{kind}_{end}": statistics.median(values[:10] if end == "first" else values[-10:])
                for kind, values in (("wall", self.seconds), ("cpu", self.cpu)) for end in ("first", "last")}
        return dict(ends, written=self.written, size=self.writer.path.stat().st_size, path=self.writer.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20, help="gradient rows per epoch")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: the system's temp)")
    args = parser.parse_args()
    if args.epochs < 20:
        parser.error("--epochs must be at least 20 (first and last 10 are compared)")

    root = Path(tempfile.mkdtemp(prefix="telemetry-write-", dir=args.dir))
    try:
        writers = [Writer("in place (bnprobe)", root / "new", args.epochs, args.steps, old=False),
                   Writer("whole-file copy (old)", root / "old", args.epochs, args.steps, old=True)]
        for epoch in range(1, args.epochs + 1):  # interleaved, so a shared machine's load falls on both alike
            for w in writers if epoch % 2 else writers[::-1]:
                w.write(epoch)
            if epoch % 20 == 0:
                print(f"  epoch {epoch}: " + ", ".join(f"{w.name} {w.cpu[-1]:.3f} s CPU" for w in writers), flush=True)
        results = {w.name: w.result() for w in writers}

        print(f"\n{args.epochs} epochs, ResNet-152 BN set, {args.steps} gradient rows per epoch; per-epoch write "
              f"time: median of the first and of the last 10 epochs, CPU (wall)")
        print(f"{'path':22} {'first 10':>15} {'last 10':>15} {'last/first':>11} {'written':>8} {'final':>6} "
              f"{'written/final':>13}")
        for name, r in results.items():
            print(f"{name:22} {r['cpu_first']:6.3f}s ({r['wall_first']:5.2f}) {r['cpu_last']:6.3f}s "
                  f"({r['wall_last']:5.2f}) {r['cpu_last'] / r['cpu_first']:5.2f} ({r['wall_last'] / r['wall_first']:.2f}) "
                  f"{r['written'] / 1e6:6.0f}MB {r['size'] / 1e6:4.0f}MB {r['written'] / r['size']:13.2f}")
        new, old = (results[k]["path"] for k in results)
        with open_h5(new) as f, open_h5(old) as g:
            check_telemetry(f)
            same = all(np.array_equal(f[name][:], g[name][:]) for name in ("epochs/epoch", "steps/grad_l2",
                                                                           "bn/layer4.2.bn3/gamma"))
        print(f"same rows in both files: {same}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
