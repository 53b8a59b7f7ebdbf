"""`bnprobe probe`'s terminal output, from what it measured (a bnprobe.analysis.probe_results.ProbeRun): the notes the
measuring found, the tables (bnprobe.analysis.probe_tables), the legend below them and each checkpoint's notes.
Computes nothing and writes no file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rich.markup import escape

from bnprobe.analysis.probe_results import ProbeResult, ProbeRun
from bnprobe.analysis.probe_tables import probe_tables, shown
from bnprobe.analysis.static import KIND_NOTE, ORDER_NOTES
from bnprobe.core.errors import printable
from bnprobe.core.options import ProbeOptions
from bnprobe.files.gguf import facts_line


def present_probe(run: ProbeRun, settings: ProbeOptions, out: Path, brief: bool, console: Any) -> None:
    """Everything `bnprobe probe` prints, in its order: notes, tables, legend, each checkpoint's notes, the file."""
    for label, message in run.notes:
        console.print(f"[yellow]{shown(label)}: {message}")
    for table in probe_tables(run.results, settings.taus, settings.off_threshold, brief, width=console.width,
                              outlier_factor=settings.outlier_factor):
        console.print(table)
    console.print(legend(run.results, settings), soft_wrap=True)
    for r in run.results:
        if not r.forward_pass:
            file_notes(r, console)
        value_notes(r, console)
    console.print(f"Wrote [bold]{out}[/]")


def legend(results: Sequence[ProbeResult], settings: ProbeOptions) -> str:
    """What "off", sparsity, kinds and outliers mean in the tables above (rich markup)."""
    measured = [r for r in results if r.forward_pass]
    only_bn = all(r.bn.only_batchnorm for r in results)
    off_threshold = settings.off_threshold
    return (
        f"off: |γ| < {off_threshold:g}, so the {'BN' if only_bn else 'layer'} output is ≈ its constant β; off, β≤0: "
        f"a ReLU right after it outputs ≈ 0." + (f" Sparsity: zero outputs of each ReLU call on {measured[0].images} "
                                                 f"test images (eval mode); dead: channels zero on every image and "
                                                 f"position." if measured else "")
        + ("" if only_bn else f" Kinds: {KIND_NOTE}. Outliers: |γ| > {settings.outlier_factor:g}x the layer's "
                              f"median |γ|.")
    )


def file_notes(r: ProbeResult, console: Any) -> None:
    """A checkpoint read from its file alone: how it was read, and what it holds that is not a norm."""
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


def value_notes(r: ProbeResult, console: Any) -> None:
    """What the tables leave out of a checkpoint: non-finite γ/β, BN layers without affine."""
    infinite = r.bn.non_finite()
    if infinite:
        console.print(f"{shown(r.label)}: {infinite:,} non-finite γ or β value(s) (inf or nan), left out of the "
                      f"histograms", soft_wrap=True, highlight=False)
    if r.bn.stats_only:
        names = ", ".join(name for name, _ in r.bn.stats_only)
        console.print(shown(f"{r.label}: {len(r.bn.stats_only)} BN layer(s) without affine (running statistics "
                             f"only, no γ/β, not in the tables): {names}"), soft_wrap=True, highlight=False)
