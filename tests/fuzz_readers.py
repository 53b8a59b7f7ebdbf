"""A fuzz harness over every reader of files bnprobe reads (issue 30): each REGISTRY entry builds a valid sample
file, mutates it (hypothesis strategies of bytes), and calls the real reader on the mutated file in a forked child
process under a memory limit (RLIMIT_AS) and a time limit. A reader may succeed or refuse the file with a one-line
BnprobeError (or the refusal type its entry names); any other exception, a death by signal (a crash, the memory
or time limit) or a multi-line message is a finding.

Adding a reader is one entry: `Reader(kind, build, mutate, read)`:
- `build(folder, samples)` writes a valid file into `folder` and returns its path (`samples` gives shared valid
  inputs: a trained run, see tests/test_fuzz_readers.py);
- `mutate(data)` takes the file's bytes and returns a hypothesis strategy of mutated bytes (byte_mutations,
  json_mutations, toml_mutations, or a structural one such as checkpoint_mutations);
- `read(path)` calls the real reader, as the command does, in the child (import inside is fine: it runs forked).
Run by tests/test_fuzz_readers.py: a few examples per reader in the normal suite (derandomized, so the same on
every machine), `BNPROBE_FUZZ_EXAMPLES=N` (`make fuzz`) for a long run. Findings are kept as REGRESSIONS below.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import select
import signal
import struct
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hypothesis import strategies as st

from bnprobe.core.errors import BnprobeError

# Memory a reader may take above what the child holds when it starts (torch's own address space included), and
# seconds per call: a reader that needs more on a file of a few KB has no bound.
MEMORY_BUDGET = 1 << 30
TIME_LIMIT = 60
# A refusal longer than this printed a name from the file whole (the CLI would cut it; the message should not
# depend on that).
MAX_MESSAGE = 4000


@dataclass
class Reader:
    kind: str
    build: Callable[[Path, Any], Path]
    mutate: Callable[[bytes], st.SearchStrategy[bytes]]
    read: Callable[[Path], Any]
    refusals: tuple[type[BaseException], ...] = (BnprobeError,)  # what counts as a one-line refusal
    examples: int = 0  # the normal suite's examples for this reader (0: the default)
    extra: dict[str, Any] = field(default_factory=dict)


# ---- the child ---------------------------------------------------------------------------------------------------


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_in_child(reader: Reader, path: Path, time_limit: float = TIME_LIMIT) -> tuple[str, str]:
    """("ok", ""), ("refused", message), or a finding: ("exception" | "killed" | "timeout", what happened)."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: limits, the reader, one JSON line back, and out without running the parent's atexit
        outcome = ("exception", "the child wrote nothing")
        try:
            os.close(readable)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            limit = _address_space() + MEMORY_BUDGET
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(int(time_limit) + 1)
            try:
                reader.read(path)
                outcome = ("ok", "")
            except reader.refusals as exc:
                outcome = ("refused", str(exc)[:MAX_MESSAGE + 100])
            except BaseException:  # noqa: B036 (MemoryError, RecursionError, SystemExit: all findings)
                outcome = ("exception", traceback.format_exc(limit=-6)[-4000:])
        finally:
            try:
                os.write(writable, json.dumps(outcome).encode()[: 1 << 16])
            finally:
                os._exit(0)
    os.close(writable)
    chunks, deadline = [], time.monotonic() + time_limit + 5
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([readable], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", f"no answer in {time_limit} s"
            chunk = os.read(readable, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(readable)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return "timeout", f"still reading after {time_limit} s"
    if os.WIFSIGNALED(status):
        return "killed", f"signal {os.WTERMSIG(status)} (a crash, or the memory or time limit)"
    try:
        kind, text = json.loads(b"".join(chunks))
    except ValueError:
        return "exception", "unreadable answer from the child"
    return kind, text


def check_outcome(kind: str, text: str) -> None:
    """What every reader must do with any file: succeed, or refuse it in one line."""
    assert kind in ("ok", "refused"), f"{kind}: {text}"
    if kind == "refused":
        assert text.strip() and len(text.strip().splitlines()) == 1, f"not one line: {text[:2000]!r}"
        assert len(text) <= MAX_MESSAGE, f"a message of {len(text):,} characters: {text[:300]!r}..."
        assert "Traceback" not in text


# ---- mutation strategies -----------------------------------------------------------------------------------------

INTERESTING = [b"\xff" * 8, b"\x00" * 8, struct.pack("<q", -1), struct.pack("<Q", 2**63), struct.pack("<Q", 2**40),
               struct.pack("<I", 2**31), b"\x7f" * 4, b"NaN", b"{", b"]", b'"', b"\\", b"\n"]


@st.composite
def _byte_ops(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            chunk = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=8)))
            out[at:at + len(chunk)] = chunk
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = draw(st.one_of(st.sampled_from(INTERESTING), st.binary(min_size=1, max_size=16)))
        elif op == "delete":
            del out[at:at + draw(st.integers(1, 16))]
    return bytes(out)


def byte_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """A few flips, overwrites with interesting values, truncations, insertions, deletions anywhere."""
    return _byte_ops(data)


@st.composite
def _safetensors_header_ops(draw, data: bytes) -> bytes:
    size = struct.unpack("<Q", data[:8])[0]
    header = draw(_json_ops(data[8:8 + size]))
    return struct.pack("<Q", len(header)) + header + data[8 + size:]


def safetensors_header_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Structural: one value or key of a safetensors file's JSON header (dtypes, shapes, offsets, __metadata__:
    an export's config, digests, normalisation) made hostile, the length prefix kept right."""
    return _safetensors_header_ops(data)


def _header_first(data: bytes) -> st.SearchStrategy[bytes]:
    """Byte mutations within the first 512 bytes (a file's header, where its structure is declared)."""
    head, body = data[:512], data[512:]
    return _byte_ops(head).map(lambda mutated: mutated + body)


HOSTILE_JSON = ["null", "true", "-1", "0", "1e999", "-1e999", "NaN", "Infinity", "1" + "0" * 5000, "9" * 25,
                "4294967296", "9223372036854775808", '""', '"x"', '"' + "y" * 100000 + '"', '"\\u0000\\u001b[31m"',
                '"\\ud800"', "[]", "{}", "[1, 2]", '{"a": 1}', "[" * 5000 + "]" * 5000, "1.5", "[[[1]]]",
                '"../../etc/passwd"', '"/etc/passwd"']


def _json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _json_paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            paths += _json_paths(item, prefix + (index,))
    return paths


_MARK = "\u0000BNPROBE_FUZZ\u0000"


@st.composite
def _json_ops(draw, data: bytes) -> bytes:
    value = json.loads(data)
    path = draw(st.sampled_from(_json_paths(value)))
    replacement = draw(st.sampled_from(HOSTILE_JSON))
    if not path:
        return replacement.encode()
    container = value
    for key in path[:-1]:
        container = container[key]
    if isinstance(container, dict) and draw(st.booleans()):  # a key of another name instead of a value
        container[draw(st.sampled_from(["", "weight_map", "model", "x" * 300, "\u001b[2J", "__proto__"]))] = _MARK
    else:
        container[path[-1]] = _MARK
    return json.dumps(value).replace(json.dumps(_MARK), replacement).encode()


def json_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Structural: one value (or key) of the JSON replaced by a hostile one (huge, NaN, deep, long, escape
    sequences, lone surrogates, paths out); or bytes anywhere."""
    return st.one_of(_json_ops(data), byte_mutations(data))


HOSTILE_TOML = ["nan", "inf", "-inf", "1e999", "9" * 30, "-1", "0", '"x"', '""', "[]", "[[1]]", "true", "{}",
                "[" + ", ".join(str(i) for i in range(20000)) + "]", '"' + "z" * 100000 + '"', "1.5",
                "[" * 300 + "1" + "]" * 300, '"\\u001b[31m"', "2026-01-01"]


@st.composite
def _toml_ops(draw, data: bytes) -> bytes:
    lines = data.decode().splitlines()
    values = [i for i, line in enumerate(lines) if "=" in line]
    if not values:
        return data
    i = draw(st.sampled_from(values))
    key = lines[i].split("=", 1)[0].strip()
    if draw(st.booleans()):
        lines[i] = f"{key} = {draw(st.sampled_from(HOSTILE_TOML))}"
    else:  # another key, table or a duplicate
        lines.insert(i, draw(st.sampled_from([f"{key} = 1", "[weird]", "[[grid]]", "[ablate]", "x" * 300 + " = 1",
                                              "seeds = [1, 1]", "seed = 1", "[defaults]"])))
    return "\n".join(lines).encode()


def toml_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    return st.one_of(_toml_ops(data), byte_mutations(data))


HOSTILE_VALUES = [None, True, -1, 0, 2**63, 10**30, float("nan"), float("inf"), "x", "\u001b[31m", [], {}, [1, 2],
                  {"a": 1}]


def _hostile_tensors():
    import torch

    return [torch.zeros(0), torch.full((3,), float("nan")), torch.ones(2, 2, dtype=torch.int64), torch.ones(5),
            torch.zeros(1, 1, 1), torch.ones(16, dtype=torch.float16), torch.tensor(True)]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in list(value.items())[:40]:
            paths += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            paths += _paths(item, prefix + (index,))
    return paths


@st.composite
def _checkpoint_ops(draw, data: bytes) -> bytes:
    import torch

    state = torch.load(io.BytesIO(data), weights_only=True)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(state)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        container = state
        for key in path[:-1]:
            container = container[key]
        if isinstance(container, dict) and draw(st.integers(0, 4)) == 0:
            del container[path[-1]]
            continue
        container[path[-1]] = draw(st.sampled_from(HOSTILE_VALUES + _hostile_tensors()))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Structural: values of the saved dict (at any depth) replaced by hostile values or tensors, or deleted;
    saved again with torch.save, so the archive is whole and only its contents are hostile."""
    return _checkpoint_ops(data)


def pickle_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Bytes anywhere in a pickle, plus opcodes that would run code (GLOBAL os.system, REDUCE)."""
    evil = pickle.dumps(os.system, protocol=2)[2:-1] + b"(S'true'\ntR."
    return st.one_of(byte_mutations(data), st.just(data[:2] + evil))


@st.composite
def _h5_ops(draw, data: bytes) -> bytes:
    import tempfile

    import h5py
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.h5"
        path.write_bytes(data)
        with h5py.File(path, "r+") as f:
            names: list[str] = []
            f.visit(names.append)
            name = draw(st.sampled_from(names + ["/"]))
            target = f[name]
            op = draw(st.sampled_from(["attr", "delete", "replace", "attr-delete"]))
            if op == "attr" or (op == "attr-delete" and not target.attrs):
                attrs = list(target.attrs) or ["format"]
                key = draw(st.sampled_from(attrs + ["format", "version"]))
                target.attrs[key] = draw(st.sampled_from(
                    [np.int64(-1), np.float64("nan"), "x", np.uint64(2**63), np.zeros(3), "\u001b[31m", np.int64(10**9),
                     b"\xff\xfe"]))
            elif op == "attr-delete":
                del target.attrs[draw(st.sampled_from(list(target.attrs)))]
            elif op == "delete" and name != "/":
                del f[name]
            elif name != "/":
                del f[name]
                shape = draw(st.sampled_from([(), (0,), (3,), (2, 5), (10**6,), (1, 1, 1)]))
                dtype = draw(st.sampled_from(["f4", "f8", "i8", "u1", "S3", "bool"]))
                if shape == (10**6,):  # declared big, stored sparse: a chunked dataset never written
                    f.create_dataset(name, shape=(10**9,), dtype=dtype, chunks=(1024,))
                else:
                    f.create_dataset(name, data=np.zeros(shape, dtype=dtype))
        return path.read_bytes()


def h5_mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Structural (attributes changed or deleted, datasets deleted or replaced by others of any shape and type,
    one declared with 1e9 rows) or a few bytes anywhere (which HDF5 must refuse, not crash on)."""
    return st.one_of(_h5_ops(data), _header_first(data))


# ---- the readers -------------------------------------------------------------------------------------------------


def _static_probe(path: Path) -> None:
    from bnprobe.analysis.static import static_probe

    static_probe(path)


def _read_weights(path: Path) -> None:
    from bnprobe.files.checkpoints import read_weights

    read_weights(path)


def _probe_and_read(path: Path) -> None:
    _static_probe(path)
    _read_weights(path)


def _build_safetensors(folder: Path, samples: Any) -> Path:
    import torch
    from safetensors.torch import save_file

    path = folder / "model.safetensors"
    save_file({"bn.weight": torch.rand(8), "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8),
               "bn.running_var": torch.ones(8), "model.norm.weight": torch.ones(16), "fc.weight": torch.ones(4, 16)},
              path, metadata={"format": "pt"})
    return path


def _build_index(folder: Path, samples: Any) -> Path:
    _build_safetensors(folder, samples)
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {"total_size": 100}, "weight_map": {
        name: "model.safetensors" for name in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                               "model.norm.weight", "fc.weight")}}))
    return path


def _state_dict():
    import torch

    return {"conv.weight": torch.ones(8, 3, 3, 3), "bn.weight": torch.rand(8), "bn.bias": torch.zeros(8),
            "bn.running_mean": torch.zeros(8), "bn.running_var": torch.ones(8), "bn.num_batches_tracked": torch.tensor(3)}


def _build_torch_zip(folder: Path, samples: Any) -> Path:
    import torch

    path = folder / "model.pt"
    torch.save({"state_dict": _state_dict(), "epoch": 3}, path)
    return path


def _build_torch_pickle(folder: Path, samples: Any) -> Path:
    import torch

    path = folder / "model.pth"
    torch.save(_state_dict(), path, _use_new_zipfile_serialization=False)
    return path


def _build_gguf(folder: Path, samples: Any) -> Path:
    """A small llama-like GGUF file by llama.cpp's own writer: two blocks' F32 norms, an F16 weight, metadata."""
    import gguf
    import numpy as np

    path = folder / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(16)
    for block in range(2):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.linspace(0.5, 1.5, 16, dtype=np.float32))
        writer.add_tensor(f"blk.{block}.attn_q.weight", np.ones((16, 16), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _copy_from_run(name: str, target: str | None = None) -> Callable[[Path, Any], Path]:
    """A builder copying a trained run (samples.run) into the folder; the file `name` is the one mutated."""

    def build(folder: Path, samples: Any) -> Path:
        import shutil

        run = folder / "run"
        shutil.copytree(samples.run, run)
        for extra in samples.results:  # probe.h5, ablation.h5 beside it
            shutil.copy(extra, run / extra.name)
        return run / (target or name)

    return build


def _read_config(path: Path) -> None:
    from bnprobe.files.checkpoints import check_run

    check_run(path.parent)


def _read_checkpoint(path: Path) -> None:
    from bnprobe.files.checkpoints import check_checkpoint, load_checkpoint

    check_checkpoint(load_checkpoint(path), path, resume=True)


def _read_run_for_report(path: Path) -> None:
    from bnprobe.reporting.read import read_run

    read_run(path.parent, "run")


def _read_result(path: Path) -> None:
    from bnprobe.reporting.read import read_result_file

    read_result_file(path, path.name)


def _inspect(path: Path) -> None:
    from bnprobe.analysis.run_summary import summarize_run
    from bnprobe.analysis.run_summary_tables import run_tables

    run_tables(summarize_run(path.parent))


def _read_h5_for_report_and_inspect(path: Path) -> None:
    _read_run_for_report(path)
    _inspect(path)


def _build_plan(folder: Path, samples: Any) -> Path:
    path = folder / "plan.toml"
    path.write_text("[defaults]\nmodel = \"resnet8\"\ndataset = \"digits\"\nepochs = 2\nseeds = [0, 1]\n"
                    "milestones = \"1\"\n[[grid]]\nfreeze = [\"none\", \"non-bn\"]\nlr = 0.1\n"
                    "[[grid]]\nnorm = \"group\"\nnorm_groups = 4\n[ablate]\nclamp_gamma = \"0:0.2:3\"\ntest_subset = 10\n")
    return path


def _read_plan(path: Path) -> None:
    from bnprobe.sweep.plan import read_plan

    read_plan(path, path.parent / "runs")


def _build_export(compact: bool) -> Callable[[Path, Any], Path]:
    def build(folder: Path, samples: Any) -> Path:
        return samples.exports[compact]

    return build


def _read_export(path: Path) -> None:
    from bnprobe.analysis.run_summary import summarize_export
    from bnprobe.analysis.run_summary_tables import export_table
    from bnprobe.files.headers import read_export_header

    read_export_header(path)
    export_table(summarize_export(path))
    _read_weights(path)


def _run_skipped() -> tuple[type[BaseException], ...]:
    from bnprobe.reporting.read import RunSkipped

    return (BnprobeError, RunSkipped)


REPORT_REFUSALS = _run_skipped()

REGISTRY: list[Reader] = [
    Reader("safetensors header", _build_safetensors, _header_first, _probe_and_read),
    Reader("safetensors body", _build_safetensors, byte_mutations, _probe_and_read),
    Reader("index json", _build_index, json_mutations, _static_probe),
    Reader("torch zip", _build_torch_zip, byte_mutations, _probe_and_read),
    Reader("torch zip contents", _build_torch_zip, checkpoint_mutations, _probe_and_read),
    Reader("torch pickle", _build_torch_pickle, pickle_mutations, _probe_and_read),
    Reader("config.json", _copy_from_run("config.json"), json_mutations, _read_config),
    Reader("config.json (report)", _copy_from_run("config.json"), json_mutations, _read_run_for_report,
           refusals=REPORT_REFUSALS),
    Reader("metrics.json (report)", _copy_from_run("metrics.json"), json_mutations, _read_run_for_report,
           refusals=REPORT_REFUSALS),
    Reader("checkpoint dict", _copy_from_run("checkpoint.pt"), checkpoint_mutations, _read_checkpoint),
    Reader("telemetry.h5", _copy_from_run("telemetry.h5"), h5_mutations, _read_h5_for_report_and_inspect,
           refusals=REPORT_REFUSALS),
    Reader("probe.h5", _copy_from_run("probe.h5"), h5_mutations, _read_result, refusals=REPORT_REFUSALS),
    Reader("ablation.h5", _copy_from_run("ablation.h5"), h5_mutations, _read_result, refusals=REPORT_REFUSALS),
    Reader("sweep plan", _build_plan, toml_mutations, _read_plan),
    Reader("gguf", _build_gguf, byte_mutations, _static_probe),
    Reader("safetensors header json", _build_safetensors, safetensors_header_mutations, _probe_and_read),
    Reader("export (full)", _build_export(False), safetensors_header_mutations, _read_export),
    Reader("export (compact)", _build_export(True), safetensors_header_mutations, _read_export),
]
