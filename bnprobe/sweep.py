"""`bnprobe sweep PLAN.toml`: a grid of training runs, resumable, finished runs skipped.

A plan is TOML. `[defaults]` holds TrainConfig fields shared by every run; each `[[grid]]` table maps
fields to a value or a list of values, and adds every combination of its lists (merged over the
defaults). `seeds = [0, 1, 2]` (in [defaults] or a [[grid]]) repeats each run once per seed, each its own
run. Runs are named by `TrainConfig.run_name()`, so a rerun of the same plan finds its runs:
finished ones are skipped, interrupted ones resume from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from bnprobe import runs
from bnprobe.config import TrainConfig
from bnprobe.errors import BnprobeError, first_line, printable

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class PlannedRun:
    config: TrainConfig
    run_dir: Path

    def status(self) -> str:
        """new, done, or `partial (k/N)` from what is on disk."""
        path = runs.checkpoint_path(self.run_dir)
        if not path.exists():
            return "new"
        try:
            epoch = runs.load_checkpoint(path).get("epoch")
        except BnprobeError:
            return "unreadable"
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return "unreadable"
        return "done" if epoch >= self.config.epochs else f"partial ({epoch}/{self.config.epochs})"


# A grid is a product: two lists of 1,000 make a million runs, which takes hours to even plan. Beyond this
# many, --max-runs must say that it is meant.
MAX_RUNS = 10_000


def read_plan(path: Path, runs_dir: Path, max_runs: int = MAX_RUNS) -> list[PlannedRun]:
    try:
        plan = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BnprobeError(f"no plan file at {path}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BnprobeError(f"{path} is not valid TOML ({exc})")
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})")
    unknown_tables = sorted(set(plan) - {"defaults", "grid"})
    if unknown_tables:
        raise BnprobeError(f"{path}: unknown tables {', '.join(unknown_tables)} (a plan has [defaults] and [[grid]])")
    defaults = plan.get("defaults", {})
    grids = plan.get("grid", [])
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(defaults, dict) or not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise BnprobeError(f"{path}: [defaults] and each [[grid]] must be tables of settings (name = value)")
    if not grids:
        raise BnprobeError(f"{path} has no [[grid]] table, so no runs")
    defaults = dict(defaults)
    default_seeds = _seeds(defaults, path, "[defaults]")
    grids = [dict(grid) for grid in grids]
    for i, grid in enumerate(grids, 1):
        seeds = _seeds(grid, path, f"grid {i}")
        if seeds is not None or (default_seeds is not None and "seed" not in grid):
            grid["seed"] = seeds if seeds is not None else default_seeds  # an axis: each seed its own run
        for table, name in ((defaults, "[defaults]"), (grid, f"grid {i}")):
            bad = sorted(set(table) - FIELDS)
            if bad:
                raise BnprobeError(f"{path} {name}: unknown settings {', '.join(bad)}; see `bnprobe train --help`")
    axes = [{k: v if isinstance(v, list) else [v] for k, v in grid.items()} for grid in grids]
    for i, grid in enumerate(axes, 1):
        # Each value first, beside the first value of every other setting (a run the grid has): a bad one is
        # found at once, not after expanding the millions of runs --max-runs allows.
        if all(grid.values()):
            first = {k: values[0] for k, values in grid.items()}
            for name, values in grid.items():
                for value in values:
                    TrainConfig.from_dict({**defaults, **first, name: value}, f"{path} grid {i}").resolved()
    combinations = sum(math.prod(len(values) for values in grid.values()) for grid in axes)
    if combinations > max_runs:
        raise BnprobeError(f"{path} plans {combinations:,} runs, more than the limit of {max_runs:,}; "
                           f"pass --max-runs {combinations} if that many is meant")
    planned: dict[Path, PlannedRun] = {}
    for i, grid in enumerate(axes, 1):
        for values in itertools.product(*grid.values()):
            config = TrainConfig.from_dict({**defaults, **dict(zip(grid, values))}, f"{path} grid {i}").resolved()
            run = PlannedRun(config, runs_dir / config.run_name())
            planned.setdefault(run.run_dir, run)  # grids may overlap: each run once
    if not planned:
        raise BnprobeError(f"{path} plans no runs (is a list in [[grid]] empty?)")
    return list(planned.values())


def _seeds(table: dict[str, Any], path: Path, name: str) -> Optional[list[int]]:
    """`seeds = [0, 1, 2]`, taken out of `table`: the seeds to repeat each run of the table with (None: not set)."""
    if "seeds" not in table:
        return None
    seeds = table.pop("seeds")
    if "seed" in table:
        raise BnprobeError(f"{path} {name}: seed and seeds both set; keep one")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise BnprobeError(f"{path} {name}: seeds must be a list of distinct integers, e.g. seeds = [0, 1, 2]")
    return seeds


def forward_flops(config: TrainConfig) -> float:
    """Multiply-adds x 2 of one forward pass of one image, counted on the meta device (no memory, no data)."""
    return sum(_layer_flops(*_shape(config)).values())


def _shape(config: TrainConfig) -> tuple[Any, ...]:
    """The settings that make a model's tensors: a grid over seeds, learning rates or epochs has only a few."""
    return config.model, config.dataset, config.width, config.shortcut, config.bn, config.bn_every, config.bn_affine_off


def _meta_model(model_name: str, dataset: str, width: int, shortcut: str, bn: str, bn_every: int,
                bn_affine_off: str) -> nn.Module:
    """The run's model on the meta device: its tensors' names and shapes, no memory (from_config would also
    reseed torch's global generator)."""
    from bnprobe.data import get_dataset_spec
    from bnprobe.models import create_model, remove_bn_affine

    spec = get_dataset_spec(dataset)
    with torch.device("meta"):
        model = create_model(model_name, in_channels=spec.channels, num_classes=spec.num_classes,
                             width=width, shortcut=shortcut, bn=bn, bn_every=bn_every)
    remove_bn_affine(model, bn_affine_off)
    return model


@functools.lru_cache(maxsize=None)
def _layer_flops(*shape: Any) -> dict[str, float]:
    """Forward flops of one image per conv and linear layer, by module name; counted once per model shape."""
    from bnprobe.data import get_dataset_spec

    spec = get_dataset_spec(shape[1])
    flops: dict[str, float] = {}

    def count(name: str, module: nn.Module, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            return
        flops[name] = flops.get(name, 0.0) + 2.0 * output.numel() * per_output

    model = _meta_model(*shape)
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, _, output, name=name: count(name, m, output))
    with torch.device("meta"):
        model(torch.zeros(1, spec.channels, spec.size, spec.size))
    return flops


def gradient_tensors(config: TrainConfig) -> frozenset[str]:
    """The tensors whose gradient training `config` computes, as bnprobe.freeze decides (on the meta device)."""
    return _gradient_tensors(_shape(config), config.freeze, config.random_features)


@functools.lru_cache(maxsize=None)
def _gradient_tensors(shape: tuple[Any, ...], freeze: str, random_features: int) -> frozenset[str]:
    from bnprobe.freeze import gradient_tensor_names

    return frozenset(gradient_tensor_names(_meta_model(*shape), freeze, random_features))


TRAIN_IMAGES = {"mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000, "digits": 1_437}


def training_flops(config: TrainConfig) -> float:
    """Forward + backward over every epoch. Backward: ~1x forward for the input gradients, plus each conv or
    linear layer's forward again where its weight gradient is computed (a first-order estimate, not a
    measurement): ~2x forward when everything trains, ~1x when conv weights are frozen."""
    images = config.subset or TRAIN_IMAGES[config.dataset]
    layers, weights = _layer_flops(*_shape(config)), gradient_tensors(config)
    weight_gradients = sum(flops for name, flops in layers.items() if f"{name}.weight" in weights)
    return (2 * sum(layers.values()) + weight_gradients) * images * config.epochs


# What decides the time of one training step: two runs alike in these are one model to calibrate.
STEP_FIELDS = ("model", "dataset", "width", "shortcut", "bn", "bn_every", "bn_affine_off", "freeze", "random_features",
               "gamma_l1", "batch_size", "flip", "translate", "amp", "channels_last", "compile", "graphs", "device")
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
    from bnprobe.data import DeviceLoader, get_dataset_spec, normalization_stats
    from bnprobe.regularize import after_backward_steps
    from bnprobe.evaluate import resolve_device
    from bnprobe.graphs import WARMUP_STEPS, TrainStep, graph_backend
    from bnprobe.train import compile_model, train_one_epoch, trainable_model

    config = TrainConfig(**dict(settings))
    device = resolve_device(config.device)
    spec = get_dataset_spec(config.dataset)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (config.batch_size, spec.channels, spec.size, spec.size), dtype=torch.uint8,
                           generator=generator, device=device)
    labels = torch.randint(0, spec.num_classes, (config.batch_size,), generator=generator, device=device)
    model, optimizer, masks, _, _ = trainable_model(config, spec.channels, spec.num_classes, device)
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
        seconds = training_seconds(c, device) if calibrate else flops / (tflops * 1e12)
        total, total_seconds = total + flops, total_seconds + seconds
        cells = {
            "#": str(i), "model": c.model, "data": c.dataset, "freeze": c.freeze,
            "bn": c.bn if c.bn != "every-k" else f"every {c.bn_every}", "other": other_settings(c).replace(" ", "\n"),
            "seed": str(c.seed), "epochs": str(c.epochs), "FLOP": si_number(flops),
            "time": duration(seconds), "status": run.status(),
        }
        table.add_row(*(Text(cells[header]) for header, _ in columns))
    table.add_section()
    totals = {"model": "total", "FLOP": si_number(total), "time": duration(total_seconds)}
    table.add_row(*(Text(totals.get(header, "")) for header, _ in columns))
    return table


MAX_PER_DEVICE = 64  # processes per device: beyond this, memory and context switches, not the GPU, decide


def check_per_device(per_device: int) -> None:
    if not 1 <= per_device <= MAX_PER_DEVICE:
        raise BnprobeError(f"--per-device must be between 1 and {MAX_PER_DEVICE}, got {per_device}")


def run_sweep(
    planned: list[PlannedRun], console: Console, devices: Optional[list[str]] = None, per_device: int = 1
) -> dict[str, str]:
    """Train every run that is not done: one at a time in this process, or in worker processes, `per_device`
    at once on each device (default: each run's own), a new one starting as soon as one finishes."""
    from bnprobe.train import train

    check_per_device(per_device)
    todo = [run for run in planned if run.status() != "done"]
    console.print(f"{len(planned) - len(todo)} of {len(planned)} runs already done; {len(todo)} to train.")
    outcome = {run.run_dir.name: "done" for run in planned if run not in todo}
    # A slot is one worker process at a time; None: the run's own device.
    slots: list[Optional[str]] = [device for device in (devices or [None]) for _ in range(per_device)]
    if len(slots) == 1:
        for i, run in enumerate(todo, 1):
            config = dataclasses.replace(run.config, device=devices[0]) if devices else run.config
            console.rule(f"run {i}/{len(todo)}: {run.run_dir.name}")
            try:
                train(config, run.run_dir, resume=True, console=console)
                outcome[run.run_dir.name] = "done"
            except BnprobeError as exc:  # one failed run does not stop the sweep
                console.print(f"[red]{escape(run.run_dir.name)} failed: {escape(printable(str(exc)))}", soft_wrap=True)
                outcome[run.run_dir.name] = f"failed: {exc}"
        return outcome
    # Worker processes, each pinned with CUDA_VISIBLE_DEVICES to its slot's GPU, pulling runs as slots free up.
    queue, active = list(todo), {}
    while queue or active:
        for slot, device in enumerate(slots):
            if slot not in active and queue:
                run = queue.pop(0)
                env, config = dict(os.environ), run.config
                if device is not None:
                    if device.startswith("cuda:"):
                        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
                    config = dataclasses.replace(config, device="cuda" if device.startswith("cuda") else device)
                run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(run.run_dir.parent / f"{run.run_dir.name}.log", "w")
                command = [sys.executable, "-m", "bnprobe.sweep", json.dumps(config.to_dict()), str(run.run_dir)]
                active[slot] = (run, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
                console.print(f"started {escape(run.run_dir.name)} on {device or config.device}", soft_wrap=True)
        for slot, (run, process, log) in list(active.items()):
            if process.poll() is not None:
                log.close()
                outcome[run.run_dir.name] = "done" if process.returncode == 0 else f"failed (exit {process.returncode})"
                where = slots[slot] or run.config.device
                console.print(f"{escape(run.run_dir.name)} on {where}: {escape(str(outcome[run.run_dir.name]))}",
                              soft_wrap=True)
                del active[slot]
        if active:
            time.sleep(0.5)
    return outcome


def train_job(config_dict: dict[str, Any], run_dir: str) -> str:
    """One run as a job of a cluster array (pickled by submitit): resumes what a previous job left."""
    from bnprobe.train import train

    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    train(TrainConfig.from_dict(config_dict, "the run's settings"), Path(run_dir), resume=True)
    return run_dir


def submit_sweep(
    planned: list[PlannedRun], folder: Path, cluster: Optional[str] = None, **parameters: Any
) -> list[Any]:
    """Submit every run that is not done as one job array through submitit (Slurm, or `cluster="local"`)."""
    try:
        import submitit
    except ImportError:
        raise BnprobeError("--launcher slurm needs submitit: pip install 'bnprobe[slurm]'")
    todo = [run for run in planned if run.status() != "done"]
    if not todo:
        return []
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        return executor.map_array(train_job, [r.config.to_dict() for r in todo], [str(r.run_dir) for r in todo])
    except Exception as exc:  # sbatch missing or refusing: say it in one line
        raise BnprobeError(f"submitting {len(todo)} jobs failed: {first_line(exc)}")


def _worker(config_json: str, run_dir: str) -> None:
    """Entry point of one parallel local worker (`python -m bnprobe.sweep CONFIG_JSON RUN_DIR`)."""
    try:
        train_job(json.loads(config_json), run_dir)
    except BnprobeError as exc:
        print(f"bnprobe: error: {printable(str(exc))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
