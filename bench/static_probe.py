"""What a static probe (`bnprobe probe FILE`, no model, no data) costs on a large checkpoint, against a plain
full `torch.load`: time and peak memory (resource.getrusage's ru_maxrss), each in a fresh process.

The checkpoint is synthetic, ~100M parameters by default (a 400 MB float32 file): a stack of 3x3 convs of
512 channels, each followed by a BatchNorm, under `state_dict` with DataParallel's `module.` prefix, saved
as a torch zip archive and as .safetensors in a temporary folder. Each is measured cold (the file's pages
first dropped from the page cache with posix_fadvise(DONTNEED): read from the disk) and warm (read again,
from the page cache: the CPU and memory cost alone).

    .venv/bin/python bench/static_probe.py                      # ~100M parameters
    .venv/bin/python bench/static_probe.py --params 20e6         # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Each runs in its own interpreter and prints {"seconds", "maxrss_kb", "grew_kb"}; the imports are not timed.
# maxrss is the whole process's peak (resource.getrusage); grew is the peak during the operation above the
# memory in use before it (Linux: the peak is reset through /proc/self/clear_refs, then read as VmHWM).
CHILD = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import h5py, safetensors, torch
from rich.console import Console
from bnprobe.core.options import LoadOptions
from bnprobe.core.options import ProbeOptions
from bnprobe.analysis.probe import run_probe
import bnprobe.analysis.static

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

how, path = {how!r}, Path({path!r})
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
started = time.perf_counter()
if how == "full torch.load":
    obj = torch.load(path, map_location="cpu", weights_only=True)
elif how != "imports only":
    with tempfile.TemporaryDirectory() as out:
        run_probe([path], LoadOptions(), ProbeOptions(taus=[0.001, 0.01, 0.05, 0.1]), out=Path(out) / "probe.h5",
                  console=Console(quiet=True))
seconds = time.perf_counter() - started
print(json.dumps({{"seconds": seconds, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "grew_kb": status("VmHWM") - before}}))
"""


def make_checkpoint(folder: Path, params: float) -> None:
    import torch
    from safetensors.torch import save_file

    channels = 512
    layers = max(1, round(params / (channels * channels * 9)))
    generator = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"module.layers.{i}.conv.weight"] = torch.randn(channels, channels, 3, 3, generator=generator) * 0.02
        state[f"module.layers.{i}.bn.weight"] = torch.rand(channels, generator=generator) * 2 - 0.5
        state[f"module.layers.{i}.bn.bias"] = torch.randn(channels, generator=generator) * 0.3
        state[f"module.layers.{i}.bn.running_mean"] = torch.randn(channels, generator=generator)
        state[f"module.layers.{i}.bn.running_var"] = torch.rand(channels, generator=generator) + 0.5
        state[f"module.layers.{i}.bn.num_batches_tracked"] = torch.tensor(1000)
    total = sum(t.numel() for t in state.values())
    torch.save({"state_dict": state, "epoch": 90}, folder / "big.pt")
    save_file(state, str(folder / "big.safetensors"))
    print(f"{total / 1e6:.1f}M parameters; torch {torch.__version__}")


def measure(how: str, path: Path, cold: bool) -> dict:
    if cold:
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # written pages must be on disk before they can be dropped
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    code = CHILD.format(repo=str(REPO), how=how, path=str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6, help="parameters in the synthetic checkpoint")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # internal: the child that writes the files
    args = parser.parse_args()
    if args.write:
        make_checkpoint(args.write, args.params)
        return

    # Nothing large (not even torch) lives in this process: a child inherits its parent's peak RSS as its
    # own ru_maxrss (fork copies it, exec keeps it), which would hide what the measured child itself used.
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        wrote = subprocess.run([sys.executable, __file__, "--write", folder, "--params", str(args.params)],
                               capture_output=True, text=True, check=True).stdout.strip()
        pt, st = Path(folder, "big.pt"), Path(folder, "big.safetensors")
        print(f"{wrote}: {pt.stat().st_size / 2**20:.0f} MiB (.pt), {st.stat().st_size / 2**20:.0f} MiB "
              f"(.safetensors), written in {time.perf_counter() - started:.1f} s; "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
        base = measure("imports only", pt, cold=False)
        rows = [(f"{name} ({state})", measure(how, path, cold=state == "cold"))
                for state in ("cold", "warm")
                for name, how, path in (("full torch.load, .pt", "full torch.load", pt),
                                        ("bnprobe probe FILE, .pt", "static", pt),
                                        ("bnprobe probe FILE, .safetensors", "static", st))]
    print(f"\n{'':42} {'seconds':>8} {'maxrss':>10} {'peak growth':>12}")
    for name, row in [("imports only (torch, bnprobe)", base), *rows]:
        print(f"{name:42} {row['seconds']:>8.2f} {row['maxrss_kb'] / 1024:>6.0f} MiB {row['grew_kb'] / 1024:>8.0f} MiB")


if __name__ == "__main__":
    main()
