"""`bnprobe probe`: the normalisation picture of one or several checkpoints (γ/β per layer, small-γ fractions,
channels turned off, outlier dimensions) and, with a forward pass on real images, the sparsity of every ReLU's
output.

γ/β come straight from the normalisation modules (affine ones, in module order = depth), or, for a checkpoint
probed alone (no --model, no --dataset: a file, a Hugging Face model folder or its index), from its tensors
(bnprobe.analysis.static), with no forward pass. This module needs no torch: a forward pass imports
bnprobe.analysis.forward_probe (and torch with it) when a checkpoint needs one, so that `bnprobe probe FILE` of a
checkpoint read from its file alone never waits for torch's import.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from rich.console import Console

from bnprobe.analysis.probe_results import ProbeResult, ProbeRun
from bnprobe.analysis.probe_h5 import write_probe_h5
from bnprobe.analysis.probe_output import present_probe
from bnprobe.analysis.static import static_probe
from bnprobe.core.config import check_load_options
from bnprobe.core.formats import BATCHNORM, PROBE_FILE, PROBE_FORMAT
from bnprobe.core.options import LoadOptions, ProbeOptions
from bnprobe.files.runs import default_output
from bnprobe.files.store import check_replaceable, provenance


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = defaultdict(int)
    for label in labels:
        seen[label] += 1
    counter: dict[str, int] = defaultdict(int)
    out = []
    for label in labels:
        counter[label] += 1
        out.append(f"{label} ({counter[label]})" if seen[label] > 1 else label)
    return out


def run_probe(
    paths: Sequence[Path],
    options: LoadOptions,
    settings: Optional[ProbeOptions] = None,
    *,
    out: Optional[Path] = None,
    brief: bool = False,
    console: Optional[Any] = None,
) -> tuple[list[ProbeResult], Path]:
    """Probe every checkpoint in `paths`, write probe.h5 and print the tables; the CLI is a shell over this:
    options checked, then measure_checkpoints (compute), write_probe (probe.h5), present_probe (the terminal)."""
    console = console or Console()
    settings = settings or ProbeOptions()
    settings.check()
    out = out if out is not None else default_output(paths, PROBE_FILE)
    check_replaceable(out, PROBE_FORMAT)
    check_load_options(options)
    run = measure_checkpoints(paths, options, settings)
    write_probe(out, run, options, settings)
    present_probe(run, settings, out, brief, console)
    return run.results, out


def measure_checkpoints(paths: Sequence[Path], options: LoadOptions, settings: ProbeOptions) -> ProbeRun:
    """Probe every checkpoint in `paths` (options already checked); prints nothing, writes nothing.

    With neither --model nor --dataset, a checkpoint bnprobe did not train is probed from its file alone
    (bnprobe.analysis.static): everything that needs no forward pass. A bnprobe run is probed with its data as always."""
    device: Any = None  # a torch.device, resolved for the first forward pass (that import takes seconds)
    static = options.model is None and options.dataset is None
    cache: dict = {}
    results, notes = [], []
    for path in paths:
        result = static_probe(path, settings.norms, settings.scale_offset) if static else None
        if result is not None:
            results.append(result)
            continue
        # torch, imported here and only here: a checkpoint read from its file alone never gets this far.
        from bnprobe.analysis.forward_probe import device_for, probe_checkpoint

        device = device or device_for(options)
        result = probe_checkpoint(path, options, device, settings.images, settings.batch_size, cache)
        if settings.norms == "bn":
            result.bn = result.bn.of_kinds([BATCHNORM])
        if not result.bn.names:
            notes.append((result.label, "no BatchNorm layer with a γ; only ReLU sparsity is reported"))
        results.append(result)
    for result, label in zip(results, unique_labels([r.label for r in results])):
        result.label = label
    return ProbeRun(results, None if device is None else str(device), settings.images, notes)


def write_probe(out: Path, run: ProbeRun, options: LoadOptions, settings: ProbeOptions) -> None:
    """probe.h5 of what `run` measured, with the options that measured it."""
    # --images applies to forward passes only: without one, the file does not claim a count.
    write_probe_h5(out, run.results, settings.taus, settings.off_threshold, settings.bins,
                   {"device": run.device or "none", **({"images": run.images} if run.device is not None else {}),
                    **provenance(load=options, probe=settings)}, settings.outlier_factor)
