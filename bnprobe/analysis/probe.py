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

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from rich.console import Console
from rich.markup import escape

from bnprobe.analysis.conventions import check_scale_offset
from bnprobe.analysis.measured import ProbeResult
from bnprobe.analysis.probe_file import write_probe_h5
from bnprobe.analysis.probe_tables import probe_tables, shown
from bnprobe.analysis.static import KIND_NOTE, NORMS, ORDER_NOTES, static_probe
from bnprobe.core.config import check_load_options
from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.formats import BATCHNORM, PROBE_FILE, PROBE_FORMAT, SCALE_ONLY
from bnprobe.core.options import LoadOptions, ProbeOptions
from bnprobe.files.gguf import facts_line
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
    """Probe every checkpoint in `paths`, write probe.h5 and print the tables; the CLI is a shell over this.

    With neither --model nor --dataset, a checkpoint bnprobe did not train is probed from its file alone
    (bnprobe.analysis.static): everything that needs no forward pass. A bnprobe run is probed with its data as always."""
    console = console or Console()
    settings = settings or ProbeOptions()
    taus, off_threshold, bins = settings.taus, settings.off_threshold, settings.bins
    images, batch_size = settings.images, settings.batch_size
    if off_threshold < 0 or any(t < 0 for t in taus):
        raise BnprobeError("thresholds τ must be >= 0")
    settings.check_counts()
    if settings.norms not in NORMS:
        raise BnprobeError(f"--norms must be one of {', '.join(NORMS)}; got {settings.norms!r}")
    if not (math.isfinite(settings.outlier_factor) and settings.outlier_factor > 0):
        raise BnprobeError(f"--outlier-factor must be a finite number > 0, got {settings.outlier_factor:g}")
    check_scale_offset(settings.scale_offset)
    device: Any = None  # a torch.device, resolved for the first forward pass (that import takes seconds)
    out = out if out is not None else default_output(paths, PROBE_FILE)
    check_replaceable(out, PROBE_FORMAT)
    check_load_options(options)
    static = options.model is None and options.dataset is None
    cache: dict = {}
    results = []
    for path in paths:
        result = static_probe(path, settings.norms, settings.scale_offset) if static else None
        if result is not None:
            results.append(result)
            continue
        # torch, imported here and only here: a checkpoint read from its file alone never gets this far.
        from bnprobe.analysis.forward_probe import device_for, probe_checkpoint

        device = device or device_for(options)
        result = probe_checkpoint(path, options, device, images, batch_size, cache)
        if settings.norms == "bn":
            result.bn = result.bn.of_kinds([BATCHNORM])
        if not result.bn.names:
            console.print(f"[yellow]{shown(result.label)}: no BatchNorm layer with a γ; only ReLU sparsity is "
                          f"reported")
        results.append(result)
    for result, label in zip(results, unique_labels([r.label for r in results])):
        result.label = label
    # --images applies to forward passes only: without one, the file does not claim a count.
    write_probe_h5(out, results, taus, off_threshold, bins,
                   {"device": str(device or "none"), **({"images": images} if device is not None else {}),
                    **provenance(load=options, probe=settings)}, settings.outlier_factor)

    for table in probe_tables(results, taus, off_threshold, brief, width=console.width,
                              outlier_factor=settings.outlier_factor):
        console.print(table)
    measured = [r for r in results if r.forward_pass]
    only_bn = all(r.bn.only_batchnorm for r in results)
    console.print(
        f"off: |γ| < {off_threshold:g}, so the {'BN' if only_bn else 'layer'} output is ≈ its constant β; off, β≤0: "
        f"a ReLU right after it outputs ≈ 0." + (f" Sparsity: zero outputs of each ReLU call on {measured[0].images} "
                                                 f"test images (eval mode); dead: channels zero on every image and "
                                                 f"position." if measured else "")
        + ("" if only_bn else f" Kinds: {KIND_NOTE}. Outliers: |γ| > {settings.outlier_factor:g}x the layer's "
                              f"median |γ|."),
        soft_wrap=True,
    )
    for r in results:
        if not r.forward_pass:
            prefixes = r.attrs["stripped_prefixes"]
            stripped = "" if prefixes == "none" else f", prefix {prefixes} stripped"
            shards = f", {r.attrs['shards_read']} of {r.attrs['shards']} shards opened" if "shards" in r.attrs else ""
            unordered = "a sharded checkpoint's index" if shards else "a safetensors file"
            console.print(escape(printable(
                f"{r.label}: read from the file alone ({r.attrs['file_format']}{shards}, state dict at "
                f"{r.attrs['state_dict_key']}{stripped}); no forward pass, so accuracy and ReLU sparsity are absent "
                f"(--dataset, plus --model for a checkpoint bnprobe did not train, measures them). Depth = "
                f"{ORDER_NOTES[r.attrs['layer_order']].format(unordered)}. Scale: {r.attrs['scale_convention']}.")),
                soft_wrap=True, highlight=False)
            if r.attrs["unnamed_scales"]:
                console.print(escape(printable(
                    f"{r.label}: {r.attrs['unnamed_scales']} unnamed scale(s), not counted as norms (a weight alone "
                    f"in a list or nn.Sequential: an RMSNorm, a PReLU or a per-channel scale store alike): "
                    f"{r.attrs['unnamed_scale_names']}")), soft_wrap=True, highlight=False)
            if r.attrs["file_format"] == "gguf":
                console.print(escape(printable(f"{r.label}: {facts_line(r.attrs)}")), soft_wrap=True, highlight=False)
            if r.attrs.get("stood_in"):
                console.print(shown(f"{r.label}: {r.attrs['stood_in']}"), soft_wrap=True, highlight=False)
        betas = [b for b, kind in zip(r.bn.beta, r.bn.kinds) if kind != SCALE_ONLY]  # (none: NaN, not counted)
        infinite = sum(int(np.count_nonzero(~np.isfinite(x))) for x in (*r.bn.gamma, *betas))
        if infinite:
            console.print(f"{shown(r.label)}: {infinite:,} non-finite γ or β value(s) (inf or nan), left out of the "
                          f"histograms", soft_wrap=True, highlight=False)
        if r.bn.stats_only:
            names = ", ".join(name for name, _ in r.bn.stats_only)
            console.print(shown(f"{r.label}: {len(r.bn.stats_only)} BN layer(s) without affine (running statistics "
                                 f"only, no γ/β, not in the tables): {names}"), soft_wrap=True, highlight=False)
    console.print(f"Wrote [bold]{out}[/]")
    return results, out


