"""What a static probe (`bnprobe probe FILE`, no model, no data) costs on large checkpoints, against reading
every tensor: time and peak memory (resource.getrusage's ru_maxrss), each in a fresh process.

Two synthetic checkpoints, in a temporary folder (`--cases`, both by default):

- bn: ~100M parameters (`--params`; a 400 MB float32 file): a stack of 3x3 convs of 512 channels, each followed
  by a BatchNorm, under `state_dict` with DataParallel's `module.` prefix, saved as a torch zip archive and as
  .safetensors; against a plain full `torch.load`.
- llm: a 7B model as Hugging Face publishes it: Llama-2-7B's layout (32 layers of 4096, MLP 11008, vocabulary
  32000; 6.7B bf16 numbers, 13.5 GB) in safetensors shards of at most 5 GB (save_pretrained's default) with
  model.safetensors.index.json. The files are sparse: only the RMSNorm weights (2 per layer, and model.norm)
  are written, the big tensors are holes, which read as zeros. Against reading every tensor into memory, one
  at a time (a full load would hold all 13.5 GB at once).

- gguf: the same 7B model as llama.cpp's Q4_0 conversion holds it (`llama-2-7b.Q4_0.gguf`: Q4_0 weights, a Q6_K
  output, F32 norms, a 32,000-token vocabulary in its metadata; 3.6 GiB), sparse too: the header and the norms
  written, the quantized weights holes. Against nothing: a quantized tensor is never read.

Each probe is measured cold (the files' pages first dropped from the page cache with posix_fadvise(DONTNEED):
read from the disk) and warm (read again, from the page cache: the CPU and memory cost alone).

- process (`--cases process`): as a user runs it, the whole `bnprobe probe FOLDER` process from its start to its
  exit (interpreter start, imports, probe, probe.h5, tables), time and peak memory of that process alone
  (os.wait4's rusage), on the 7B folder above and a 70B-shaped one (Llama-2-70B: 80 layers of 8192, MLP 28672,
  grouped keys and values of 1024; 69B bf16 numbers in 5 GB shards, sparse on disk like the 7B's). Median of
  `--repeat` runs, page cache warm.

    .venv/bin/python bench/static_probe.py                      # bn, llm and gguf
    .venv/bin/python bench/static_probe.py --cases llm          # the 7B shards alone
    .venv/bin/python bench/static_probe.py --cases gguf         # the 7B Q4_0 GGUF alone
    .venv/bin/python bench/static_probe.py --cases process      # whole processes, 7B and 70B folders
    .venv/bin/python bench/static_probe.py --params 20e6 --cases bn
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
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
from bnprobe.files.shards import model_folder_file, read_index
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
elif how == "every tensor":  # of a sharded checkpoint: each copied into memory (as a load into a model does), dropped
    numbers = 0
    for shard in read_index(model_folder_file(path)).shards:
        with safetensors.safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                numbers += f.get_tensor(name).clone().numel()  # get_tensor alone may map the bytes unread
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


# Llama-2-7B: layers, hidden size, MLP size, vocabulary; save_pretrained's default largest shard ("5GB").
LLAMA_7B = (32, 4096, 11008, 32000)
# Llama-2-70B: the same and the width of its keys and values (8 of 64 heads: grouped-query attention).
LLAMA_70B = (80, 8192, 28672, 32000, 1024)
SHARD_BYTES = 5 * 10**9
BF16 = 2  # bytes


def llm_tensors(layers: int, hidden: int, mlp: int, vocab: int, kv: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama model's tensors, (name, shape) in registration order; kv: the keys' and values' width (default:
    hidden, no grouped-query attention)."""
    kv = kv or hidden
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        block = f"model.layers.{i}"
        tensors += [(f"{block}.self_attn.{p}_proj.weight", (kv if p in "kv" else hidden, hidden)) for p in "qkvo"]
        tensors += [(f"{block}.mlp.gate_proj.weight", (mlp, hidden)), (f"{block}.mlp.up_proj.weight", (mlp, hidden)),
                    (f"{block}.mlp.down_proj.weight", (hidden, mlp)),
                    (f"{block}.input_layernorm.weight", (hidden,)), (f"{block}.post_attention_layernorm.weight", (hidden,))]
    return tensors + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def make_llm(folder: Path, layers: int, hidden: int, mlp: int, vocab: int, kv: int = 0) -> None:
    """Sparse safetensors shards and their index: shards filled in registration order up to SHARD_BYTES, the data
    of each in name order (as safetensors writes one dtype), and real bytes for the norms' weights alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for name, shape in llm_tensors(layers, hidden, mlp, vocab, kv):
        if shards[-1] and sum(math.prod(s) * BF16 for _, s in shards[-1]) + math.prod(shape) * BF16 > SHARD_BYTES:
            shards.append([])
        shards[-1].append((name, shape))
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in sorted(tensors):
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape) * BF16]}
            offset += math.prod(shape) * BF16
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
        with open(folder / file, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape in tensors:
                if len(shape) == 1:  # a norm's weight: synthetic, two dimensions far above the rest
                    gamma = rng.uniform(0.02, 0.6, shape).astype(np.float32)
                    gamma[[1415 % hidden, 2533 % hidden]] = rng.uniform(8, 30, 2)
                    f.seek(8 + len(text) + header[name]["data_offsets"][0])
                    f.write((gamma.view(np.uint32) >> 16).astype(np.uint16).tobytes())  # float32 to bf16
            f.truncate(8 + len(text) + offset)  # the rest: holes
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"{total // BF16 / 1e9:.2f}B bf16 numbers, {total / 2**30:.1f} GiB in {len(shards)} safetensors shards")


# ggml types as GGUF numbers them: (type, elements per block, bytes per block).
F32, Q4_0, Q6_K = (0, 1, 4), (2, 32, 18), (14, 256, 210)


def make_gguf(folder: Path, layers: int, hidden: int, mlp: int, vocab: int) -> None:
    """A sparse GGUF file (version 3, little-endian, alignment 32) written byte by byte, llama.cpp's names."""
    import struct

    import numpy as np

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value.encode())) + value.encode()

    def entry(key: str, kind: int, payload: bytes) -> bytes:
        return text(key) + struct.pack("<I", kind) + payload

    tensors = [("token_embd.weight", (vocab, hidden), Q4_0)]
    for i in range(layers):
        tensors += [(f"blk.{i}.attn_{p}.weight", (hidden, hidden), Q4_0) for p in ("q", "k", "v", "output")]
        tensors += [(f"blk.{i}.ffn_gate.weight", (mlp, hidden), Q4_0), (f"blk.{i}.ffn_up.weight", (mlp, hidden), Q4_0),
                    (f"blk.{i}.ffn_down.weight", (hidden, mlp), Q4_0), (f"blk.{i}.attn_norm.weight", (hidden,), F32),
                    (f"blk.{i}.ffn_norm.weight", (hidden,), F32)]
    tensors += [("output_norm.weight", (hidden,), F32), ("output.weight", (vocab, hidden), Q6_K)]
    metadata = [entry("general.architecture", 8, text("llama")), entry("general.name", 8, text("7B-shaped")),
                entry("llama.block_count", 4, struct.pack("<I", layers)),
                entry("llama.embedding_length", 4, struct.pack("<I", hidden)),
                entry("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, vocab) + b"".join(
                    text(f"<tok{i}>") for i in range(vocab)))]
    infos, offsets, offset = [], {}, 0
    for name, shape, (kind, block, block_bytes) in tensors:
        infos.append(text(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", n) for n in shape[::-1])
                     + struct.pack("<IQ", kind, offset))
        offsets[name] = offset
        offset += -(-math.prod(shape) // block * block_bytes // 32) * 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)) + b"".join(metadata) + b"".join(infos)
    start = -(-len(head) // 32) * 32
    rng = np.random.default_rng(0)
    with open(folder / "llama-2-7b.Q4_0.gguf", "wb") as f:
        f.write(head)
        for name, shape, kind in tensors:
            if kind == F32:  # as in make_llm: two dimensions far above the rest
                gamma = rng.uniform(0.02, 0.6, shape).astype(np.float32)
                gamma[[1415 % hidden, 2533 % hidden]] = rng.uniform(8, 30, 2)
                f.seek(start + offsets[name])
                f.write(gamma.tobytes())
        f.truncate(start + offset)
    print(f"{len(tensors)} tensors, {(start + offset) / 2**30:.1f} GiB in one GGUF file")


def measure(how: str, path: Path, cold: bool) -> dict:
    if cold:
        for file in sorted(path.iterdir()) if path.is_dir() else [path]:
            with open(file, "rb") as f:
                os.fsync(f.fileno())  # written pages must be on disk before they can be dropped
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    code = CHILD.format(repo=str(REPO), how=how, path=str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def whole_process(path: Path, out: Path) -> dict:
    """`bnprobe probe PATH` as a user runs it: a fresh interpreter from start to exit; its wall time and its own
    peak resident memory (os.wait4 reports the rusage of that one child, not the largest of all children)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bnprobe", "probe", str(path), "--out", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"bnprobe probe {path} failed: {child.stderr.read().decode()[-2000:]}")
    child.stderr.close()
    return {"seconds": seconds, "maxrss_kb": usage.ru_maxrss}


def processes(folder: Path, args: argparse.Namespace) -> None:
    """The whole `bnprobe probe FOLDER` process on the 7B- and 70B-shaped folders, against the issue's goals."""
    rows = []
    for name, sizes in (("7B", args.llm), ("70B", args.llm70)):
        (folder / name).mkdir()
        print(f"{name}: {write(folder / name, 'llm', args, sizes)}")
        runs = [whole_process(folder / name, folder / f"{name}.h5") for _ in range(args.repeat)]
        rows.append((name, {key: statistics.median(run[key] for run in runs) for key in runs[0]},
                     [run["seconds"] for run in runs]))
    print(f"\n{'whole process, warm page cache':38} {'seconds (median)':>16} {'peak RSS':>10}  every run's seconds")
    for name, row, every in rows:
        print(f"{'bnprobe probe ' + name + '-shaped folder':38} {row['seconds']:>16.2f} {row['maxrss_kb'] / 1024:>6.0f} MiB"
              f"  {', '.join(f'{s:.2f}' for s in every)}")
    met = all(row["seconds"] < 1 and row["maxrss_kb"] < 150 * 1024 for _, row, _ in rows)
    print(f"goals (each under 1 s and 150 MB peak, the whole process): {'met' if met else 'MISSED'}")


def write(folder: Path, case: str, args: argparse.Namespace, llm: tuple[int, ...] = ()) -> str:
    """The case's files, written by a child process (see main); what it says it wrote."""
    started = time.perf_counter()
    sizes = ["--params", str(args.params), "--llm", ",".join(map(str, llm or args.llm))]
    wrote = subprocess.run([sys.executable, __file__, "--write", str(folder), "--cases", case, *sizes],
                           capture_output=True, text=True, check=True).stdout.strip()
    disk = sum(os.stat(file).st_blocks * 512 for file in folder.iterdir())
    return f"{wrote}, {disk / 2**20:.1f} MiB on disk, written in {time.perf_counter() - started:.1f} s"


def show(rows: list[tuple[str, dict]]) -> None:
    print(f"\n{'':46} {'seconds':>8} {'maxrss':>10} {'peak growth':>12}")
    for name, row in rows:
        print(f"{name:46} {row['seconds']:>8.2f} {row['maxrss_kb'] / 1024:>6.0f} MiB {row['grew_kb'] / 1024:>8.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="bn,llm,gguf", help="bn, llm, gguf, process (comma-separated)")
    parser.add_argument("--params", type=float, default=100e6, help="parameters of the bn case's checkpoint")
    parser.add_argument("--llm", type=lambda text: tuple(int(x) for x in text.split(",")), default=LLAMA_7B,
                        help="the llm and gguf cases' LAYERS,HIDDEN,MLP,VOCAB[,KV] [default: Llama-2-7B's, 32,4096,11008,32000]")
    parser.add_argument("--llm70", type=lambda text: tuple(int(x) for x in text.split(",")), default=LLAMA_70B,
                        help="the process case's second folder [default: Llama-2-70B's, 80,8192,28672,32000,1024]")
    parser.add_argument("--repeat", type=int, default=3, help="whole processes timed per folder (--cases process)")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # internal: the child that writes the files
    args = parser.parse_args()
    cases = args.cases.split(",")
    if args.write:
        if cases == ["bn"]:
            make_checkpoint(args.write, args.params)
        elif cases == ["gguf"]:
            make_gguf(args.write, *args.llm)
        else:
            make_llm(args.write, *args.llm)
        return
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

    # Nothing large (not even torch) lives in this process: a child inherits its parent's peak RSS as its
    # own ru_maxrss (fork copies it, exec keeps it), which would hide what the measured child itself used.
    with tempfile.TemporaryDirectory() as folder:
        base = None
        if "bn" in cases:
            (Path(folder) / "bn").mkdir()
            print(f"bn: {write(Path(folder) / 'bn', 'bn', args)}")
            pt, st = Path(folder, "bn", "big.pt"), Path(folder, "bn", "big.safetensors")
            base = measure("imports only", pt, cold=False)
            show([("imports only (torch, bnprobe)", base)] + [
                (f"{name} ({state})", measure(how, path, cold=state == "cold"))
                for state in ("cold", "warm")
                for name, how, path in (("full torch.load, .pt", "full torch.load", pt),
                                        ("bnprobe probe FILE, .pt", "static", pt),
                                        ("bnprobe probe FILE, .safetensors", "static", st))])
        if "llm" in cases:
            llm = Path(folder) / "llm"
            llm.mkdir()
            print(f"\nllm: {write(llm, 'llm', args)}")
            base = base or measure("imports only", llm, cold=False)
            every = measure("every tensor", llm, cold=False)
            cold, warm = (measure("static", llm, cold=state == "cold") for state in ("cold", "warm"))
            show([("imports only (torch, bnprobe)", base), ("read every tensor, one at a time", every),
                  ("bnprobe probe FOLDER (cold)", cold), ("bnprobe probe FOLDER (warm)", warm)])
            met = warm["seconds"] < 2 and warm["grew_kb"] < 100 * 1024
            print(f"probe (warm) / reading every tensor: {warm['seconds'] / every['seconds']:.3g}x the time; the "
                  f"targets (under 2 s warm, under 100 MiB above the imports): {'met' if met else 'MISSED'}")
        if "gguf" in cases:
            folder_gguf = Path(folder) / "gguf"
            folder_gguf.mkdir()
            print(f"\ngguf: {write(folder_gguf, 'gguf', args)}")
            file = folder_gguf / "llama-2-7b.Q4_0.gguf"
            base = base or measure("imports only", file, cold=False)
            cold, warm = (measure("static", file, cold=state == "cold") for state in ("cold", "warm"))
            show([("imports only (torch, bnprobe)", base), ("bnprobe probe FILE.gguf (cold)", cold),
                  ("bnprobe probe FILE.gguf (warm)", warm)])
        if "process" in cases:
            (Path(folder) / "process").mkdir()
            processes(Path(folder) / "process", args)


if __name__ == "__main__":
    main()
