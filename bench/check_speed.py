"""What `bnprobe check` costs as a CI step runs it: a whole process, from its start to its exit (imports included),
on two cores (the process is pinned to the first two CPUs where the system allows it), with its peak memory
(the child's own ru_maxrss, through os.wait4). Issue 33's goals: a folder of 100 small checkpoints under 10 s,
the 7B-shaped sharded folder under 1 s (that one needs the static probe's torch-free path).

Two cases, in a temporary folder (`--cases`, both by default):

- small: `--files` checkpoints (100) in one folder, a third each of a conv net's BatchNorm layers as
  .safetensors, the same as a torch zip archive under `state_dict` with DataParallel's `module.` prefix, and a
  small llama's RMSNorm scales as .safetensors; some with findings, so every rule's path runs;
- llm: the sparse Llama-2-7B-shaped shards of bench/static_probe.py (only the norms' bytes are real).

    .venv/bin/python bench/check_speed.py
    .venv/bin/python bench/check_speed.py --cases small --files 20 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from static_probe import LLAMA_7B, make_llm  # noqa: E402  (the same sparse 7B folder as the probe's benchmark)

GOALS = {"small": 10.0, "llm": 1.0}  # seconds, whole process (issue 33)


def make_small(folder: Path, files: int) -> None:
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for k in range(files):
        if k % 3 == 2:  # a llama's RMSNorm scales, one dimension off in several layers now and then
            state = {f"model.layers.{b}.{n}.weight": rng.uniform(0.5, 1.5, 256).astype(np.float32)
                     for b in range(8) for n in ("input_layernorm", "post_attention_layernorm")}
            if k % 2:
                for b in range(4):
                    state[f"model.layers.{b}.input_layernorm.weight"][17] = 0.0
            state["model.layers.0.mlp.up_proj.weight"] = rng.normal(size=(512, 256)).astype(np.float32)
            save_file(state, str(folder / f"llama-{k:03d}.safetensors"))
            continue
        state = {}
        for b, width in enumerate((32, 32, 64, 64, 128, 128)):
            p = f"features.{b}"
            state[f"{p}.conv.weight"] = rng.normal(size=(width, width, 3, 3)).astype(np.float32)
            state[f"{p}.bn.weight"] = rng.uniform(0.5, 1.5, width).astype(np.float32)
            state[f"{p}.bn.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
            state[f"{p}.bn.running_mean"] = rng.normal(0, 0.5, width).astype(np.float32)
            state[f"{p}.bn.running_var"] = (np.zeros(width) if k % 7 == 0 and b == 0 else
                                            rng.uniform(0.5, 2, width)).astype(np.float32)
        if k % 3 == 0:
            save_file(state, str(folder / f"convnet-{k:03d}.safetensors"))
        else:
            torch.save({"state_dict": {f"module.{n}": torch.from_numpy(v) for n, v in state.items()}},
                       folder / f"convnet-{k:03d}.pt")


def pinned() -> None:
    """The child on the first two CPUs (where the system has them and allows it)."""
    cpus = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.sched_setaffinity(0, cpus)


def run_once(path: Path, out: Path) -> dict:
    """One whole `bnprobe check` process: wall seconds, peak memory, exit status, findings."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bnprobe", "check", str(path), "--format", "json", "--output",
                              str(out), "--fail-on", "never"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=pinned)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"bnprobe check {path} exited {child.returncode}: {stderr.strip()[-500:]}")
    document = json.loads(out.read_text())
    return {"seconds": seconds, "maxrss_mb": usage.ru_maxrss / 1024, "files": document["summary"]["files"],
            "findings": document["summary"]["findings"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="small,llm", help="small, llm or both (comma-separated)")
    parser.add_argument("--files", type=int, default=100, help="checkpoints of the small case")
    parser.add_argument("--rounds", type=int, default=3, help="processes timed per case (the median is shown)")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not cases or any(c not in GOALS for c in cases) or args.files < 1 or args.rounds < 1:
        parser.error("--cases takes small and/or llm; --files and --rounds must be >= 1")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (the check pinned to 2), "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bnprobe-check-bench-") as tmp:
        for case in cases:
            folder = Path(tmp) / case
            folder.mkdir()
            make_small(folder, args.files) if case == "small" else make_llm(folder, *LLAMA_7B)
            runs = [run_once(folder, Path(tmp) / f"{case}.json") for _ in range(args.rounds)]
            seconds = statistics.median(r["seconds"] for r in runs)
            peak = max(r["maxrss_mb"] for r in runs)
            verdict = "within" if seconds < GOALS[case] else "over"
            print(f"check {case}: {runs[0]['files']} checkpoint(s), {runs[0]['findings']} findings: "
                  f"{seconds:.2f} s median of {len(runs)} (range {min(r['seconds'] for r in runs):.2f}-"
                  f"{max(r['seconds'] for r in runs):.2f}), peak {peak:.0f} MB; {verdict} the goal of "
                  f"{GOALS[case]:g} s")


if __name__ == "__main__":
    main()
