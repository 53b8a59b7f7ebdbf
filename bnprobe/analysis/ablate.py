"""Clamp-to-zero ablations of the norm layers' γ (BatchNorm, GroupNorm, LayerNorm): set small |γ| to 0 and
re-measure accuracy and loss.

A sweep loads the checkpoint and its data once (images resident on the device, large eval batches), folds
every conv -> BN pair once (bnprobe.nets.fold) and then, per threshold, only rewrites the folded weights with
that threshold's mask; GroupNorm and LayerNorm normalise by each sample's own statistics, which no conv can
absorb, so their γ is masked on the layer. Two thresholds that clamp the same channels are evaluated once.

Modes:
    threshold  clamp |γ| < τ                       (--per-layer: |γ| < τ * max |γ| of the layer)
    fraction   clamp the p * N smallest |γ| overall (--per-layer: the p * C_l smallest of each layer)
A clamped channel's norm output becomes the constant β_c; --zero-beta makes it 0.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bnprobe.analysis.loading import check_forward, load_eval_data, load_model
from bnprobe.core.errors import BnprobeError, listing, printable
from bnprobe.core.formats import ABLATION_FILES, ABLATION_FORMAT, ABLATION_VERSION
from bnprobe.core.options import AblateOptions, LoadOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.files.runs import default_output
from bnprobe.files.store import atomic_h5, check_replaceable, provenance, set_attrs, write_array
from bnprobe.nets.fold import ClampableModel, check_fold
from bnprobe.nets.norms import norm_layers
from bnprobe.training.evaluate import evaluate, resolve_device

MODES = ("threshold", "fraction")

def clamp_masks(gammas: Sequence[torch.Tensor], value: float, mode: str, per_layer: bool) -> list[torch.Tensor]:
    """One bool mask per layer, True where γ is clamped to 0."""
    if mode == "threshold":
        if per_layer:
            return [g.abs() < value * g.abs().max() if g.numel() else g.bool() for g in gammas]
        return [g.abs() < value for g in gammas]
    if mode != "fraction":
        raise ValueError(f"unknown mode {mode!r}")
    if per_layer:
        return [_smallest(g.abs(), _count(value, g.numel())) for g in gammas]
    flat = torch.cat([g.abs().flatten() for g in gammas])
    return list(torch.split(_smallest(flat, _count(value, flat.numel())), [g.numel() for g in gammas]))


def _count(fraction: float, n: int) -> int:
    return min(n, int(math.floor(fraction * n + 0.5)))  # round half up, not Python's half to even


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest values; ties go to the earlier channel, so the result is deterministic."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k:
        mask[torch.argsort(values, stable=True)[:k]] = True
    return mask


@dataclass
class SweepResult:
    mode: str
    per_layer: bool
    zero_beta: bool
    values: list[float]
    layer_names: list[str]
    layer_channels: list[int]
    layer_folded: list[bool]
    clamped: np.ndarray  # (T,) channels clamped
    clamped_per_layer: np.ndarray  # (T, L)
    masks: np.ndarray  # (T, N) bool, layers concatenated in module order
    metrics: dict[str, np.ndarray]  # "test_loss", "test_acc", "train_loss", "train_acc" -> (T,)
    baseline: dict[str, float]  # the same metrics with nothing clamped
    evaluations: int  # distinct clamp sets evaluated (identical masks are evaluated once)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_channels(self) -> int:
        return int(sum(self.layer_channels))

    def delta(self, metric: str) -> np.ndarray:
        return self.metrics[metric] - self.baseline[metric]


def default_batch_size(device: str) -> int:
    """Large batches keep a GPU busy; on a CPU, batches that fit the caches are faster."""
    return 4000 if resolve_device(device).type == "cuda" else 256


def sweep(
    clampable: ClampableModel,
    values: Sequence[float],
    loaders: dict[str, DeviceLoader],
    *,
    mode: str = "threshold",
    per_layer: bool = False,
    zero_beta: bool = False,
    on_value: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> SweepResult:
    """Evaluate `clampable` on every loader ("test", "train") with nothing clamped and at every value."""
    if mode not in MODES:
        raise BnprobeError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    started = time.perf_counter()
    gammas = clampable.gammas
    if not gammas:
        raise BnprobeError("the model has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")

    def measure() -> dict[str, float]:
        out = {}
        for split, loader in loaders.items():
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(clampable, loader)
        return out

    clampable.clamp(None)
    baseline = measure()
    seen: dict[bytes, dict[str, float]] = {}
    empty_key = _mask_key(torch.zeros(sum(g.numel() for g in gammas), dtype=torch.bool))
    seen[empty_key] = baseline  # τ = 0 clamps nothing: the baseline, not a second evaluation
    rows, masks_out, per_layer_counts = [], [], []
    for i, value in enumerate(values):
        masks = clamp_masks(gammas, value, mode, per_layer)
        flat = torch.cat(masks)
        key = _mask_key(flat)
        if key not in seen:
            clampable.clamp(masks, zero_beta)
            seen[key] = measure()
        rows.append(seen[key])
        masks_out.append(flat.cpu().numpy())
        per_layer_counts.append([int(m.sum()) for m in masks])
        if on_value is not None:
            on_value(i, seen[key])
    clampable.clamp(None)
    metrics = {name: np.array([row[name] for row in rows], dtype=np.float64) for name in baseline}
    counts = np.array(per_layer_counts, dtype=np.int64).reshape(len(values), len(gammas))
    return SweepResult(
        mode=mode, per_layer=per_layer, zero_beta=zero_beta, values=list(values),
        layer_names=[layer.name for layer in clampable.layers],
        layer_channels=[layer.channels for layer in clampable.layers],
        layer_folded=[layer.folded for layer in clampable.layers],
        clamped=counts.sum(axis=1), clamped_per_layer=counts,
        masks=np.stack(masks_out) if masks_out else np.zeros((0, 0), dtype=bool),
        metrics=metrics, baseline=baseline, evaluations=len(seen), seconds=time.perf_counter() - started,
    )


def _mask_key(flat: torch.Tensor) -> bytes:
    return hashlib.sha1(np.packbits(flat.cpu().numpy()).tobytes()).digest()


def write_ablation_h5(path: Path, result: SweepResult, attrs: dict[str, Any]) -> None:
    """ablation.h5, written to a temporary file and renamed (schema: docs/probe-schema.md)."""
    import h5py

    strings = lambda items: np.array(list(items), dtype=h5py.string_dtype())  # noqa: E731
    with atomic_h5(path) as f:
        set_attrs(f, {
            "format": ABLATION_FORMAT, "version": ABLATION_VERSION, "mode": result.mode, "per_layer": result.per_layer,
            "zero_beta": result.zero_beta, "total_channels": result.total_channels,
            "evaluations": result.evaluations, "seconds": result.seconds, **attrs,
        })
        set_attrs(f, {f"baseline_{k}": v for k, v in result.baseline.items()})
        write_array(f, "values", np.asarray(result.values, dtype=np.float64),
                    description="τ (threshold mode) or p (fraction mode), ascending")
        write_array(f, "clamped", result.clamped, description="channels whose γ was clamped to 0")
        write_array(f, "clamped_fraction", result.clamped / max(1, result.total_channels))
        write_array(f, "clamped_per_layer", result.clamped_per_layer, description="(values, layers)")
        write_array(f, "masks", result.masks, description="(values, channels): True = clamped; layers concatenated")
        for name, column in result.metrics.items():
            write_array(f, name, column)
            write_array(f, f"delta_{name}", column - result.baseline[name])
        layers = f.create_group("layers")
        write_array(layers, "names", strings(result.layer_names))
        write_array(layers, "channels", np.asarray(result.layer_channels, dtype=np.int64))
        write_array(layers, "offsets", np.concatenate([[0], np.cumsum(result.layer_channels)]).astype(np.int64))
        write_array(layers, "folded", np.asarray(result.layer_folded, dtype=bool))


# ---- the command: load once, fold once, sweep, write, show -----------------------------------------

def run_ablation(
    path: Path,
    options: LoadOptions,
    settings: AblateOptions,
    *,
    out: Optional[Path] = None,
    console: Optional[Any] = None,
) -> tuple[SweepResult, Path]:
    """Sweep clamp values on one checkpoint, write ablation.h5 and print the table."""
    console = console or Console()
    mode, values, per_layer, zero_beta = settings.mode, settings.values, settings.per_layer, settings.zero_beta
    test_subset, train_subset, measure_train = settings.test_subset, settings.train_subset, settings.measure_train
    batch_size, fold = settings.batch_size, settings.fold
    if any(v < 0 for v in values):
        raise BnprobeError("clamp values must be >= 0")
    settings.check_counts()
    if batch_size is None:
        batch_size = default_batch_size(options.device)
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = out if out is not None else default_output([path], ABLATION_FILES[mode])
    check_replaceable(out, ABLATION_FORMAT)
    loaded = load_model(path, options, device)
    norms = norm_layers(loaded.model, with_gamma=True)
    if not norms:
        raise BnprobeError(f"{loaded.path} has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")
    # |NaN| < τ is never true, and a NaN channel makes every later output NaN: no clamp can be measured.
    broken = [name for name, norm in norms if not torch.isfinite(norm.weight).all()]
    if broken:
        raise BnprobeError(f"{loaded.path} holds NaN or infinite γ in {len(broken)} norm layer(s) "
                           f"({listing(broken)}); "
                           f"its outputs are not numbers whatever is clamped, so there is nothing to ablate")
    data = load_eval_data(loaded, device, test_subset=test_subset, train_subset=train_subset)
    # channels_last: cuDNN's and oneDNN's fast layout (on a 2-core CPU it also beat NCHW for resnet20 by ~1.2x)
    channels_last = True
    memory_format = torch.channels_last
    loaders = {"test": DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size, channels_last=channels_last)}
    if measure_train:
        loaders["train"] = DeviceLoader(data.train_x, data.train_y, data.mean, data.std, batch_size,
                                        channels_last=channels_last)
    first = next(iter(loaders["test"]))[0]
    check_forward(loaded.model.to(memory_format=memory_format), first, loaded.label, loaded.dataset)
    clampable = ClampableModel(loaded.model, fold=fold).to(device, memory_format=memory_format)
    fold_error = check_fold(loaded.model, clampable, first[:256])
    folded = sum(layer.folded for layer in clampable.layers)
    del loaded.model  # the clampable copy is all the sweep needs

    progress = Progress(
        TextColumn("[bold blue]clamp sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, transient=True,
        disable=len(values) < 2,
    )
    with progress:
        task = progress.add_task("sweep", total=len(values), status="")
        result = sweep(
            clampable, values, loaders, mode=mode, per_layer=per_layer, zero_beta=zero_beta,
            on_value=lambda i, row: progress.update(
                task, advance=1, status=f"{values[i]:.4g}: test acc {row['test_acc']:.2%}"),
        )
    result.extra = {"fold_relative_error": fold_error, "folded_layers": folded, "pairing": clampable.pairing}
    write_ablation_h5(out, result, {
        "checkpoint": str(loaded.path), "label": loaded.label, "dataset": loaded.dataset,
        "normalization": loaded.norm_source, "test_images": len(data.test_y),
        "train_images": len(data.train_y) if measure_train else 0, "device": str(device),
        "folded_layers": folded, "pairing": clampable.pairing, "fold_relative_error": fold_error,
        **{k: v for k, v in loaded.meta.items() if v is not None}, **provenance(load=options, ablate=settings),
    })
    console.print(ablation_table(result, loaded.label, len(data.test_y), len(data.train_y) if measure_train else 0))
    layers = len(clampable.layers)
    beta = ("zeroed too (--zero-beta): each clamped channel outputs 0" if zero_beta
            else "kept: each clamped channel outputs its constant β (pass --zero-beta to zero it)")
    console.print(
        f"β of clamped channels {beta}. "
        + (f"{folded} of {layers} norm layers folded into their convs (BNs after a conv: pairs found by "
           f"{clampable.pairing}; max relative logit difference {fold_error:.1e}), {layers - folded} masked on the "
           f"layer. " if fold else f"No layer folded (--no-fold): all {layers} norm layers masked on the layer. ")
        + f"{len(values)} value(s): {result.evaluations} evaluation(s) with the baseline, in {result.seconds:.1f} s "
        f"(identical clamp sets are evaluated once).",
        soft_wrap=True,
    )
    console.print(f"Wrote [bold]{out}[/]")
    return result, out


def ablation_table(result: SweepResult, label: str, test_images: int, train_images: int) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    if result.mode == "threshold":
        what = "|γ| < τ·max|γ| per layer" if result.per_layer else "|γ| < τ"
        head = "τ·max" if result.per_layer else "τ"
    else:
        what = "the smallest p of |γ| in each layer" if result.per_layer else "the globally smallest p of |γ|"
        head = "p"
    table = Table(title=f"Clamp-to-zero ablation — {escape(printable(label))}: γ := 0 where {what}",
                  box=box.SIMPLE_HEAD)
    table.add_column(head, justify="right", no_wrap=True)
    table.add_column("clamped", justify="right", no_wrap=True)
    splits = [s for s in ("test", "train") if f"{s}_acc" in result.metrics]
    for split in splits:
        table.add_column(f"{split} acc (Δ)", justify="right", no_wrap=True)
        table.add_column("loss", justify="right", no_wrap=True)

    def cells(metrics: dict[str, float], baseline: bool) -> list[str]:
        row = []
        for split in splits:
            acc, loss = metrics[f"{split}_acc"], metrics[f"{split}_loss"]
            delta = acc - result.baseline[f"{split}_acc"]
            text = f"{100 * delta:+6.2f}"
            if abs(delta) >= 5e-4:
                text = f"[{'red' if delta < 0 else 'green'}]{text}[/]"
            row += [f"{acc:7.2%}" + ("        " if baseline else f" ({text})"), f"{loss:.4f}"]
        return row

    table.add_row("none", "0 (0.0%)", *cells(result.baseline, True), style="dim")
    n = max(1, result.total_channels)
    for i, value in enumerate(result.values):
        metrics = {k: float(v[i]) for k, v in result.metrics.items()}
        table.add_row(f"{value:.4g}", f"{int(result.clamped[i]):,} ({result.clamped[i] / n:.1%})", *cells(metrics, False))
    sizes = f"{test_images:,} test" + (f" / {train_images:,} train" if "train_acc" in result.metrics else "")
    table.caption = (f"clamped: channels (and share) of the {result.total_channels:,} norm channels in "
                     f"{len(result.layer_names)} layers; Δ: accuracy change in percentage points vs. no clamping; "
                     f"{sizes} images, eval mode")
    return table
