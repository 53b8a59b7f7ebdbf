"""What a plan costs before it runs: FLOPs of each run counted on the meta device (forward, input gradients, and
the weight gradients its freezing computes), or its time measured here with a few real training steps of each
distinct model (`--calibrate`); and the plan's table, readable at 80 columns."""

from __future__ import annotations

import functools
import time
from typing import Any, Optional

import torch
import torch.nn as nn
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bnprobe.core.config import TrainConfig
from bnprobe.core.datasets import get_dataset_spec
from bnprobe.core.model_spec import ModelSpec
from bnprobe.data.device import DeviceLoader, normalization_stats
from bnprobe.nets.freeze import gradient_tensor_names
from bnprobe.nets.registry import build_model
from bnprobe.sweep.plan import PlannedRun
from bnprobe.training.evaluate import resolve_device
from bnprobe.training.graphs import WARMUP_STEPS, TrainStep, graph_backend
from bnprobe.training.regularize import after_backward_steps
from bnprobe.training.train import compile_model, train_one_epoch, trainable_model


def forward_flops(config: TrainConfig) -> float:
    """Multiply-adds x 2 of one forward pass of one image, counted on the meta device (no memory, no data)."""
    return sum(_layer_flops(config.model_spec(), config.dataset).values())


def _meta_model(spec: ModelSpec) -> nn.Module:
    """The run's model on the meta device: its tensors' names and shapes, no memory (from_config would also
    reseed torch's global generator)."""
    with torch.device("meta"):
        return build_model(spec)


@functools.lru_cache(maxsize=None)
def _layer_flops(spec: ModelSpec, dataset: str) -> dict[str, float]:
    """Forward flops of one image per conv and linear layer, by module name; counted once per model (a grid over
    seeds, learning rates or epochs has only a few) and data set (its image size)."""
    size = get_dataset_spec(dataset).size
    flops: dict[str, float] = {}

    def count(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            return
        flops[name] = flops.get(name, 0.0) + 2.0 * output.numel() * per_output

    model = _meta_model(spec)
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, _, output, name=name: count(name, m, output))
    with torch.device("meta"):
        model(torch.zeros(1, spec.in_channels, size, size))
    return flops


def gradient_tensors(config: TrainConfig) -> frozenset[str]:
    """The tensors whose gradient training `config` computes, as bnprobe.nets.freeze decides (on the meta device)."""
    return _gradient_tensors(config.model_spec(), config.freeze, config.random_features)


@functools.lru_cache(maxsize=None)
def _gradient_tensors(spec: ModelSpec, freeze: str, random_features: int) -> frozenset[str]:
    return frozenset(gradient_tensor_names(_meta_model(spec), freeze, random_features))


TRAIN_IMAGES = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "digits": 1_437}


def training_flops(config: TrainConfig) -> float:
    """Forward + backward over every epoch. Backward: ~1x forward for the input gradients, plus each conv or
    linear layer's forward again where its weight gradient is computed (a first-order estimate, not a
    measurement): ~2x forward when everything trains, ~1x when conv weights are frozen."""
    images = config.subset or TRAIN_IMAGES[config.dataset]
    layers, weights = _layer_flops(config.model_spec(), config.dataset), gradient_tensors(config)
    weight_gradients = sum(flops for name, flops in layers.items() if f"{name}.weight" in weights)
    return (2 * sum(layers.values()) + weight_gradients) * images * config.epochs


# What decides the time of one training step: two runs alike in these are one model to calibrate.
STEP_FIELDS = ("model", "dataset", "width", "shortcut", "bn", "bn_every", "norm", "norm_groups", "bn_affine_off",
               "freeze", "random_features", "gamma_l1", "batch_size", "flip", "translate", "amp", "channels_last",
               "compile", "graphs", "device")
CALIBRATION_STEPS = 3  # timed, after one warm-up step (first-call allocations, oneDNN/cuDNN choices, compiling)
# and, where the step is graphed, after its eager warm-up steps and its capture


def step_seconds(config: TrainConfig, device: Optional[str] = None) -> float:
    """Seconds of one real training step of `config`'s model on `device` (default: the run's), measured."""
    settings = {name: getattr(config, name) for name in STEP_FIELDS}
    return _step_seconds(tuple({**settings, **({"device": device} if device else {})}.items()))


@functools.lru_cache(maxsize=None)
def _step_seconds(settings: tuple[tuple[str, Any], ...]) -> float:
    """Timed once per distinct model: the step of `bnprobe train` (the same model, freezing, optimizer and
    loop) on random images of the data set's shape, one batch per call, so the data set need not be here."""
    config = TrainConfig(**dict(settings))
    device = resolve_device(config.device)
    spec = get_dataset_spec(config.dataset)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (config.batch_size, spec.channels, spec.size, spec.size), dtype=torch.uint8,
                           generator=generator, device=device)
    labels = torch.randint(0, spec.num_classes, (config.batch_size,), generator=generator, device=device)
    model, optimizer, masks, _, _ = trainable_model(config, device)
    step_model = compile_model(model, device) if config.compile else model
    loader = DeviceLoader(images, labels, *normalization_stats(images, "per-channel"), config.batch_size,
                          shuffle=True, flip=config.flip, translate=config.translate, generator=generator,
                          channels_last=config.channels_last)
    graphs = graph_backend(config, device)
    step = TrainStep(step_model, optimizer, config.amp, after_backward_steps(model, config, masks),
                     graphs=graphs)
    for _ in range(1 + (WARMUP_STEPS if graphs is not None else 0)):  # warm-up (and capture)
        train_one_epoch(step_model, loader, optimizer, config.amp, step=step)
    start = time.perf_counter()
    for _ in range(CALIBRATION_STEPS):  # each call ends on a host sync (.item()), so the time is the device's
        train_one_epoch(step_model, loader, optimizer, config.amp, step=step)
    return (time.perf_counter() - start) / CALIBRATION_STEPS


def training_seconds(config: TrainConfig, device: Optional[str] = None) -> float:
    """Measured step time x steps of every epoch (evaluation not counted)."""
    steps = -(-(config.subset or TRAIN_IMAGES[config.dataset]) // config.batch_size)
    return step_seconds(config, device) * steps * config.epochs


def estimated_seconds(config: TrainConfig, tflops: float, calibrate: bool = False, device: Optional[str] = None) -> float:
    """The plan table's time of a run: measured steps (`calibrate`, on `device`), else its FLOPs at `tflops`."""
    return training_seconds(config, device) if calibrate else training_flops(config) / (tflops * 1e12)


SHOWN = ("model", "dataset", "freeze", "bn", "bn_every", "seed", "epochs")


def other_settings(config: TrainConfig) -> str:
    """Identity settings that differ from the defaults, beyond the columns shown."""
    default = TrainConfig(model=config.model, dataset=config.dataset).resolved().identity()  # model check: cached
    return " ".join(f"{k}={v}" for k, v in config.identity().items() if k not in SHOWN and v != default[k])


def si_number(value: float) -> str:
    """3 significant digits with an SI prefix: 178P, 62.3P, 2.97E, 0 (never wider than 5 characters)."""
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(value) < 999.5 or prefix == "Z":
            return f"{value:.3g}{prefix}"
        value /= 1000
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """Compact and never rounded to nothing: <1s, 45s, 21m, 1.3h, 16.6h, 1,663h."""
    if seconds < 1:
        return "<1s"
    if seconds < 59.5:
        return f"{seconds:.0f}s"
    if seconds < 59.5 * 60:
        return f"{seconds / 60:.0f}m"
    hours = seconds / 3600
    return f"{hours:.1f}h" if hours < 99.95 else f"{hours:,.0f}h"


def plan_table(planned: list[PlannedRun], tflops: float, calibrate: bool = False, device: Optional[str] = None) -> Table:
    """The plan, readable at 80 columns (rich's width when piped): numbers never wrap nor are cut,
    text folds; data set, seed and epochs shared by every run go in the title instead of a column each.
    The time column assumes `tflops`, or with `calibrate` is measured on `device` (default: each run's)."""
    shared = {}  # the settings of these columns that every run has alike
    for field in ("dataset", "epochs", "seed"):
        values = {getattr(run.config, field) for run in planned}
        if len(values) == 1:
            shared[field] = values.pop()
    labels = {"dataset": "{}", "epochs": "{} epochs", "seed": "seed {}"}
    said = [labels[field].format(value) for field, value in shared.items()]
    runs_text = f"{len(planned)} runs" + (f" ({', '.join(said)})" if said else "")
    cost = (f"time from {CALIBRATION_STEPS} timed training steps of each model on this machine (evaluation not "
            f"counted)" if calibrate else f"cost at an assumed {tflops:g} TFLOP/s sustained")
    table = Table(
        title=escape(f"{runs_text}; {cost}"),
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
    )
    columns = [("#", None), ("model", "model"), ("data", "dataset"), ("freeze", "freeze"), ("bn", "bn"),
               ("other", None), ("seed", "seed"), ("epochs", "epochs"), ("FLOP", None), ("time", None),
               ("status", None)]
    columns = [(header, field) for header, field in columns if field not in shared]
    numeric = {"#", "seed", "epochs", "FLOP", "time"}
    for header, _ in columns:
        if header in numeric:
            table.add_column(header, justify="right", no_wrap=True)
        else:
            table.add_column(header, justify="left", overflow="fold")
    total, total_seconds = 0.0, 0.0
    for i, run in enumerate(planned, 1):
        c = run.config
        flops = training_flops(c)
        seconds = estimated_seconds(c, tflops, calibrate, device)
        total, total_seconds = total + flops, total_seconds + seconds
        cells = {
            "#": str(i), "model": c.model, "data": c.dataset, "freeze": c.freeze,
            "bn": c.bn if c.bn != "every-k" else f"every {c.bn_every}", "other": other_settings(c).replace(" ", "\n"),
            "seed": str(c.seed), "epochs": str(c.epochs), "FLOP": si_number(flops),
            "time": duration(seconds), "status": run.progress(),
        }
        table.add_row(*(Text(cells[header]) for header, _ in columns))
    table.add_section()
    totals = {"model": "total", "FLOP": si_number(total), "time": duration(total_seconds)}
    table.add_row(*(Text(totals.get(header, "")) for header, _ in columns))
    return table


