"""The fuzz harness (tests/fuzz_readers.py) over every reader: a few derandomized examples per reader here,
`make fuzz` (BNPROBE_FUZZ_EXAMPLES) for a long run. What it found is kept in test_fuzz_findings below."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fuzz_readers import REGISTRY, Reader, check_outcome, run_in_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from probe_helpers import trained_runs

EXAMPLES = int(os.environ.get("BNPROBE_FUZZ_EXAMPLES", "12"))


@dataclass
class Samples:
    run: Path  # a trained run: config.json, checkpoint.pt, metrics.json, telemetry.h5
    results: list[Path]  # a probe.h5 and an ablation.h5 of it
    exports: dict[bool, Path]  # compact -> an export of it


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Samples:
    from rich.console import Console

    from bnprobe.analysis.ablate import run_ablation
    from bnprobe.analysis.export import export_run
    from bnprobe.analysis.probe import run_probe
    from bnprobe.core.options import AblateOptions, LoadOptions, ProbeOptions

    run = trained_runs(tmp_path_factory)["full"]
    folder = tmp_path_factory.mktemp("fuzz-samples")
    quiet = Console(quiet=True)
    torch.save({"bn.weight": torch.rand(8), "bn.bias": torch.zeros(8), "bn.running_mean": torch.zeros(8),
                "bn.running_var": torch.ones(8)}, folder / "bn.pt")
    run_probe([folder / "bn.pt"], LoadOptions(), ProbeOptions(), out=folder / "probe.h5", console=quiet)
    run_ablation(run, LoadOptions(device="cpu"), AblateOptions(values=[0.0, 0.1], test_subset=20, measure_train=False),
                 out=folder / "ablation.h5", console=quiet)
    exports = {}
    for compact in (False, True):
        exports[compact] = folder / f"export-{'compact' if compact else 'full'}.safetensors"
        export_run(run, exports[compact], compact)
    return Samples(run, [folder / "probe.h5", folder / "ablation.h5"], exports)


@pytest.fixture(autouse=True)
def one_thread():
    """Forked children of a process whose OpenMP pool ran can hang; one thread keeps the pool unused."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("reader", REGISTRY, ids=lambda reader: reader.kind)
def test_fuzz_reader(reader: Reader, samples, tmp_path):
    path = reader.build(tmp_path, samples)
    original = path.read_bytes()
    check_outcome(*run_in_child(reader, path))  # the valid sample reads

    @settings(max_examples=reader.examples or EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        mutated = data.draw(reader.mutate(original), label="file")
        if path.is_symlink() or not path.exists():
            path.unlink(missing_ok=True)
        path.write_bytes(mutated)
        try:
            check_outcome(*run_in_child(reader, path))
        finally:
            path.write_bytes(original)

    fuzz()


def _allocate(path):
    bytearray(3 << 30)


def _hang(path):
    import time

    time.sleep(30)


def _raise(path):
    raise ValueError("not a one-line refusal")


def _two_lines(path):
    from bnprobe.core.errors import BnprobeError

    raise BnprobeError("first\nsecond")


@pytest.mark.parametrize("read, kind", [(_allocate, "exception"), (_hang, "timeout"), (_raise, "exception"),
                                        (_two_lines, "refused")])
def test_the_harness_catches_what_it_must(tmp_path, read, kind):
    # Each limit and check bites: memory past the budget (MemoryError in the child), time, another exception, a
    # message of two lines.
    reader = Reader("test", lambda folder, samples: folder, lambda data: st.just(data), read)
    outcome = run_in_child(reader, tmp_path, time_limit=2)
    assert outcome[0] == kind, outcome
    with pytest.raises(AssertionError):
        check_outcome(*outcome)


HUGE_INT = b"1" + b"0" * 5000  # past the 4,300 digits Python converts: json and tomllib raised a bare ValueError


def _safetensors_with_huge_int(data: bytes) -> bytes:
    import json
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).replace('"pt"', HUGE_INT.decode()).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


# What the fuzzer found (issue 30), kept: (reader kind, the mutation of its valid sample that broke it).
FINDINGS = [
    ("config.json", lambda data: b'{"seed": ' + HUGE_INT + b"}"),
    ("config.json (report)", lambda data: data.replace(b'"seed": 0', b'"seed": ' + HUGE_INT)),
    ("metrics.json (report)", lambda data: b'[{"epoch": ' + HUGE_INT + b"}]"),
    ("index json", lambda data: b'{"weight_map": {"model.norm.weight": ' + HUGE_INT + b"}}"),
    ("safetensors header json", _safetensors_with_huge_int),
    ("export (full)", _safetensors_with_huge_int),
    ("sweep plan", lambda data: data.replace(b"epochs = 2", b"epochs = " + HUGE_INT)),
    # a model name of 100,000 characters was printed whole in the message
    ("sweep plan", lambda data: data.replace(b'model = "resnet8"', b'model = "' + b"z" * 100_000 + b'"')),
    ("sweep plan", lambda data: data.replace(b'dataset = "digits"', b'dataset = "' + b"z" * 100_000 + b'"')),
    ("config.json", lambda data: data.replace(b'"norm": "batch"', b'"norm": "' + b"z" * 100_000 + b'"')),
    ("sweep plan", lambda data: data.replace(b'milestones = "1"', b'milestones = "' + b"z" * 100_000 + b'"')),
    ("export (compact)", lambda data: _with_metadata(data, "version", "z" * 100_000)),
    # seeds = [[1]] was a TypeError traceback (unhashable list)
    ("sweep plan", lambda data: data.replace(b"seeds = [0, 1]", b"seeds = [[1]]")),
    # an infinite epoch in metrics.json was an OverflowError traceback in the report
    ("metrics.json (report)", lambda data: data.replace(b'"epoch": 1', b'"epoch": Infinity', 1)),
]


def _with_metadata(data: bytes, key: str, value: str) -> bytes:
    import json
    import struct

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + size:]


@pytest.mark.parametrize("kind, mutate", FINDINGS, ids=[f"{kind}-{i}" for i, (kind, _) in enumerate(FINDINGS)])
def test_fuzz_findings(kind, mutate, samples, tmp_path):
    reader = next(r for r in REGISTRY if r.kind == kind)
    path = reader.build(tmp_path, samples)
    mutated = mutate(path.read_bytes())
    assert mutated != path.read_bytes()
    if path.is_symlink():
        path.unlink()
    path.write_bytes(mutated)
    outcome = run_in_child(reader, path)
    check_outcome(*outcome)
    assert outcome[0] == "refused", outcome  # it was a ValueError traceback
