"""Clamp-to-zero ablations of the norm layers' γ (BatchNorm, GroupNorm, LayerNorm): set small |γ| to 0 and
re-measure accuracy and loss.

A sweep loads the checkpoint and its data once (images resident on the device, large eval batches), folds
every conv -> BN pair once (bnprobe.nets.fold) and then, per threshold, only rewrites the folded weights with
that threshold's mask; GroupNorm and LayerNorm normalise by each sample's own statistics, which no conv can
absorb, so their γ is masked on the layer. Two thresholds that clamp the same channels are evaluated once.

Modes:
    threshold  clamp |γ| < τ                       (--per-layer: |γ| < τ * max |γ| of the layer)
    fraction   clamp the p * N smallest |γ| overall (--per-layer: the p * C_l smallest of each layer)
    dims       clamp named dimensions in every layer of their width (--clamp-dims, bnprobe.core.clamp_dims)
A clamped channel's norm output becomes the constant β_c; --zero-beta makes it 0.

With --eval the user's function measures the model (bnprobe.analysis.user_eval), which then keeps its own modules:
γ is clamped in place (bnprobe.nets.clamp_inplace), nothing folded. Hugging Face models come through
bnprobe.analysis.hf_models into the same `ablate`.
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

from bnprobe.analysis.ablate_output import present_ablation, sweep_progress
from bnprobe.analysis.loading import LoadedModel, check_forward, load_eval_data, load_model
from bnprobe.analysis.probe_results import NormStats
from bnprobe.analysis.user_eval import check_same_names, load_eval, run_eval
from bnprobe.core.clamp_dims import dims_rows as spec_rows
from bnprobe.core.clamp_dims import parse_clamp_dims
from bnprobe.core.errors import BnprobeError, listing
from bnprobe.core.formats import ABLATION_FILES, ABLATION_FORMAT, ABLATION_VERSION
from bnprobe.core.options import AblateOptions, LoadOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.files.runs import default_output
from bnprobe.files.store import atomic_h5, check_replaceable, provenance, set_attrs, write_array
from bnprobe.nets.clamp_inplace import InPlaceNorms, scale_norms
from bnprobe.nets.fold import ClampableModel, check_fold
from bnprobe.nets.norms import norm_layers
from bnprobe.training.evaluate import evaluate, resolve_device

MODES = ("threshold", "fraction")  # of a sweep of values; "dims" rows come from dims_rows

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
class ClampRow:
    """One row of an ablation: what it clamps (one mask per layer), its value (τ, p, or the row's number for
    --clamp-dims) and its label."""

    value: float
    label: str
    masks: list[torch.Tensor]


def value_rows(gammas: Sequence[torch.Tensor], values: Sequence[float], mode: str, per_layer: bool) -> list[ClampRow]:
    if mode not in MODES:
        raise BnprobeError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return [ClampRow(float(v), f"{'τ' if mode == 'threshold' else 'p'}={v:g}", clamp_masks(gammas, v, mode, per_layer))
            for v in values]


def recurring_dims(gammas: Sequence[torch.Tensor], outlier_factor: float) -> dict[int, np.ndarray]:
    """width -> the dimensions that are outliers (|γ| > factor x the layer's median) in >= 2 layers of that width:
    the static probe's recurring outliers (bnprobe.analysis.probe_results), of the scales the ablation clamps."""
    stats = NormStats.from_tensors([(str(i), (g, None, None, None)) for i, g in enumerate(gammas)])
    found = stats.recurring(stats.outliers(outlier_factor))
    dims: dict[int, list[int]] = {}
    for width, dim in zip(found.width.tolist(), found.dim.tolist()):
        dims.setdefault(width, []).append(dim)
    return {width: np.array(sorted(d), dtype=np.int64) for width, d in dims.items()}


def dims_rows(gammas: Sequence[torch.Tensor], specs: Sequence[str], *, seed: int = 0, repeats: int = 1,
              outlier_factor: float = 10.0) -> list[ClampRow]:
    """--clamp-dims rows (bnprobe.core.clamp_dims): each clamps its dimensions in every layer of their width."""
    widths = [int(g.numel()) for g in gammas]
    wants_recurring = any(parse_clamp_dims(s).kind == "recurring" for s in specs)
    recurring = recurring_dims(gammas, outlier_factor) if wants_recurring else None
    rows = []
    for number, row in enumerate(spec_rows(specs, widths, recurring, seed, repeats)):
        masks = []
        for g in gammas:
            mask = torch.zeros(g.numel(), dtype=torch.bool, device=g.device)
            if g.numel() in row.dims:
                mask[torch.as_tensor(row.dims[g.numel()], device=g.device)] = True
            masks.append(mask)
        rows.append(ClampRow(float(number), row.label, masks))
    return rows


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
    metrics: dict[str, np.ndarray]  # "test_loss", "test_acc", "train_loss", "train_acc" (or --eval's) -> (T,)
    baseline: dict[str, float]  # the same metrics with nothing clamped
    evaluations: int  # distinct clamp sets evaluated (identical masks are evaluated once)
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # what each row clamps
    evaluation: str = "images"  # "images" (bnprobe's accuracy and loss) or "eval" (--eval, --text: named metrics)

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
    if not clampable.gammas:
        raise BnprobeError("the model has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")
    return sweep_rows(clampable, value_rows(clampable.gammas, values, mode, per_layer), image_measure(clampable, loaders),
                      mode=mode, per_layer=per_layer, zero_beta=zero_beta, on_row=on_value)


def image_measure(clampable: ClampableModel, loaders: dict[str, DeviceLoader]) -> Callable[[], dict[str, float]]:
    def measure() -> dict[str, float]:
        out = {}
        for split, loader in loaders.items():
            out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(clampable, loader)
        return out
    return measure


def sweep_rows(
    clampable: Any,
    rows: Sequence[ClampRow],
    measure: Callable[[], dict[str, float]],
    *,
    mode: str,
    per_layer: bool = False,
    zero_beta: bool = False,
    evaluation: str = "images",
    on_row: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> SweepResult:
    """`measure()` with nothing clamped, then with each row's masks applied to `clampable` (a ClampableModel or an
    InPlaceNorms); rows that clamp the same channels are measured once, and a row that clamps nothing is the
    baseline."""
    started = time.perf_counter()
    gammas = clampable.gammas
    if not gammas:
        raise BnprobeError("the model has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")
    clampable.clamp(None)
    baseline = measure()
    seen: dict[bytes, dict[str, float]] = {}
    empty_key = _mask_key(torch.zeros(sum(g.numel() for g in gammas), dtype=torch.bool))
    seen[empty_key] = baseline  # τ = 0 clamps nothing: the baseline, not a second evaluation
    measured, masks_out, per_layer_counts = [], [], []
    try:
        for i, row in enumerate(rows):
            flat = torch.cat([m.reshape(-1) for m in row.masks])
            key = _mask_key(flat)
            if key not in seen:
                clampable.clamp(row.masks, zero_beta)
                seen[key] = measure()
            measured.append(seen[key])
            masks_out.append(flat.cpu().numpy())
            per_layer_counts.append([int(m.sum()) for m in row.masks])
            if on_row is not None:
                on_row(i, seen[key])
    finally:
        clampable.clamp(None)  # an in-place model is the user's again, whatever happened
    metrics = {name: np.array([row[name] for row in measured], dtype=np.float64) for name in baseline}
    counts = np.array(per_layer_counts, dtype=np.int64).reshape(len(rows), len(gammas))
    return SweepResult(
        mode=mode, per_layer=per_layer, zero_beta=zero_beta, values=[row.value for row in rows],
        layer_names=[layer.name for layer in clampable.layers],
        layer_channels=[layer.channels for layer in clampable.layers],
        layer_folded=[layer.folded for layer in clampable.layers],
        clamped=counts.sum(axis=1), clamped_per_layer=counts,
        masks=np.stack(masks_out) if masks_out else np.zeros((0, 0), dtype=bool),
        metrics=metrics, baseline=baseline, evaluations=len(seen), seconds=time.perf_counter() - started,
        labels=[row.label for row in rows], evaluation=evaluation,
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
            "evaluations": result.evaluations, "seconds": result.seconds, "evaluation": result.evaluation, **attrs,
        })
        write_array(f, "values", np.asarray(result.values, dtype=np.float64),
                    description="τ (threshold mode) or p (fraction mode), ascending; the row's number (dims mode)")
        write_array(f, "labels", strings(result.labels), description="what each row clamps")
        write_array(f, "clamped", result.clamped, description="channels whose γ was clamped to 0")
        write_array(f, "clamped_fraction", result.clamped / max(1, result.total_channels))
        write_array(f, "clamped_per_layer", result.clamped_per_layer, description="(values, layers)")
        write_array(f, "masks", result.masks, description="(values, channels): True = clamped; layers concatenated")
        if result.evaluation == "images":
            set_attrs(f, {f"baseline_{k}": v for k, v in result.baseline.items()})
            for name, column in result.metrics.items():
                write_array(f, name, column)
                write_array(f, f"delta_{name}", column - result.baseline[name])
        else:  # the user's metric names, whatever they are, cannot collide with the file's own datasets
            group = f.create_group("eval")
            for name, column in result.metrics.items():
                write_array(group, name, column)
                group[name].attrs["baseline"] = result.baseline[name]
        layers = f.create_group("layers")
        write_array(layers, "names", strings(result.layer_names))
        write_array(layers, "channels", np.asarray(result.layer_channels, dtype=np.int64))
        write_array(layers, "offsets", np.concatenate([[0], np.cumsum(result.layer_channels)]).astype(np.int64))
        write_array(layers, "folded", np.asarray(result.layer_folded, dtype=bool))


# ---- the command: load once, fold once, sweep, write, show -----------------------------------------

def clamp_rows(gammas: Sequence[torch.Tensor], settings: AblateOptions) -> list[ClampRow]:
    """The rows the settings ask for: a --clamp-gamma/--clamp-fraction sweep or the --clamp-dims sets."""
    if settings.mode == "dims":
        return dims_rows(gammas, settings.dims, seed=settings.seed, repeats=settings.repeats,
                         outlier_factor=settings.outlier_factor)
    return value_rows(gammas, settings.values, settings.mode, settings.per_layer)


def eval_measure(evaluate: Callable, model: torch.nn.Module, spec: str) -> Callable[[], dict[str, float]]:
    """--eval as a sweep's measurement: the same metric names every call."""
    names: list[dict[str, float]] = []

    def measure() -> dict[str, float]:
        metrics = run_eval(evaluate, model, spec)
        if names:
            check_same_names(metrics, names[0], spec)
        else:
            names.append(metrics)
        return metrics
    return measure


def run_ablation(
    path: Path,
    options: LoadOptions,
    settings: AblateOptions,
    *,
    out: Optional[Path] = None,
    console: Optional[Any] = None,
) -> tuple[SweepResult, Path]:
    """Clamp on one checkpoint (a sweep of values or --clamp-dims sets), write ablation.h5 and print the table."""
    console = console or Console()
    settings.check()
    batch_size = settings.batch_size
    if batch_size is None:
        batch_size = default_batch_size(options.device)
    if settings.text is not None:
        raise BnprobeError("--text evaluates a Hugging Face language model (a folder with config.json); "
                           "for this model pass --eval file.py:evaluate")
    device = resolve_device(options.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = out if out is not None else default_output([path], ABLATION_FILES[settings.mode])
    check_replaceable(out, ABLATION_FORMAT)
    if settings.eval and (options.dataset or options.mean):
        raise BnprobeError("--eval measures the model with your function instead of images; drop --dataset, "
                           "--mean and --std")
    evaluate_fn = load_eval(settings.eval) if settings.eval else None
    loaded = load_model(path, options, device, need_data=evaluate_fn is None)
    # --eval: the model's RMSNorm and own *Norm classes too, each with the convention measured on it
    scaled = scale_norms(loaded.model) if evaluate_fn is not None else []
    norms = [(name, m) for name, m, _ in scaled] if evaluate_fn is not None else norm_layers(loaded.model, True)
    if not norms:
        raise BnprobeError(f"{loaded.path} has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")
    # |NaN| < τ is never true, and a NaN channel makes every later output NaN: no clamp can be measured.
    broken = [name for name, norm in norms if not torch.isfinite(norm.weight).all()]
    if broken:
        raise BnprobeError(f"{loaded.path} holds NaN or infinite γ in {len(broken)} norm layer(s) "
                           f"({listing(broken)}); "
                           f"its outputs are not numbers whatever is clamped, so there is nothing to ablate")
    if evaluate_fn is not None:
        # The user's code sees the model it built, its own modules, with γ clamped in place (nothing folded).
        clampable = InPlaceNorms(loaded.model, scaled)
        measure = eval_measure(evaluate_fn, loaded.model, settings.eval)
        attrs = {"eval": settings.eval, "dataset": "", "test_images": 0, "train_images": 0}
        note = f"{len(norms)} norm layers clamped in place on the model's own modules (nothing folded); " \
               f"metrics from --eval {settings.eval}."
    else:
        clampable, measure, attrs, note = _image_setup(loaded, settings, device, batch_size)
    result = ablate(clampable, measure, settings, out, console, evaluation="eval" if evaluate_fn else "images", attrs={
        "checkpoint": str(loaded.path), "label": loaded.label, "normalization": loaded.norm_source,
        "device": str(device), **attrs, **{k: v for k, v in loaded.meta.items() if v is not None},
        **provenance(load=options, ablate=settings)}, label=loaded.label, note=note)
    return result, out


def _image_setup(loaded: LoadedModel, settings: AblateOptions, device: torch.device, batch_size: int) -> tuple:
    """bnprobe's own evaluation: images resident on the device, BNs folded into their convs once."""
    data = load_eval_data(loaded, device, test_subset=settings.test_subset, train_subset=settings.train_subset)
    # channels_last: cuDNN's and oneDNN's fast layout (on a 2-core CPU it also beat NCHW for resnet20 by ~1.2x)
    memory_format = torch.channels_last
    loaders = {"test": DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size, channels_last=True)}
    if settings.measure_train:
        loaders["train"] = DeviceLoader(data.train_x, data.train_y, data.mean, data.std, batch_size,
                                        channels_last=True)
    first = next(iter(loaders["test"]))[0]
    check_forward(loaded.model.to(memory_format=memory_format), first, loaded.label, loaded.dataset)
    clampable = ClampableModel(loaded.model, fold=settings.fold).to(device, memory_format=memory_format)
    fold_error = check_fold(loaded.model, clampable, first[:256])
    folded = sum(layer.folded for layer in clampable.layers)
    del loaded.model  # the clampable copy is all the sweep needs
    layers = len(clampable.layers)
    train_images = len(data.train_y) if settings.measure_train else 0
    attrs = {"dataset": loaded.dataset, "test_images": len(data.test_y), "train_images": train_images,
             "folded_layers": folded, "pairing": clampable.pairing, "fold_relative_error": fold_error}
    folding = (f"{folded} of {layers} norm layers folded into their convs (BNs after a conv: pairs found by "
               f"{clampable.pairing}; max relative logit difference {fold_error:.1e}), {layers - folded} masked on "
               f"the layer" if settings.fold else f"No layer folded (--no-fold): all {layers} norm layers masked on "
                                                   f"the layer")
    note = (f"{folding}; {len(data.test_y):,} test" + (f" / {train_images:,} train" if train_images else "") +
            " images, eval mode.")
    return clampable, image_measure(clampable, loaders), attrs, note


def ablate(clampable: Any, measure: Callable[[], dict[str, float]], settings: AblateOptions, out: Path,
           console: Any, *, evaluation: str, attrs: dict[str, Any], label: str, note: str) -> SweepResult:
    """The part every kind of model shares: the rows, the sweep (compute, under a progress bar), ablation.h5 (write),
    the table and its notes (present)."""
    rows = clamp_rows(clampable.gammas, settings)
    with sweep_progress([row.label for row in rows], console) as on_row:
        result = sweep_clamps(clampable, rows, measure, settings, evaluation=evaluation, attrs=attrs, on_row=on_row)
    write_ablation_h5(out, result, attrs)
    present_ablation(result, label, note, out, console)
    return result


def sweep_clamps(clampable: Any, rows: Sequence[ClampRow], measure: Callable[[], dict[str, float]],
                 settings: AblateOptions, *, evaluation: str, attrs: dict[str, Any],
                 on_row: Optional[Callable[[int, dict[str, float]], None]] = None) -> SweepResult:
    """The ablation's numbers: `rows` measured with the settings' β handling, and the fold's facts from `attrs`;
    prints nothing, writes nothing."""
    result = sweep_rows(clampable, rows, measure, mode=settings.mode, per_layer=settings.per_layer,
                        zero_beta=settings.zero_beta, evaluation=evaluation, on_row=on_row)
    result.extra = {k: attrs[k] for k in ("fold_relative_error", "folded_layers", "pairing") if k in attrs}
    return result
