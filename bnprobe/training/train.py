"""Training: SGD with momentum and step decay on a device-resident data set, checkpointed each epoch.

Per-step statistics stay on the device (running sums), so the only host syncs are once per epoch.
`_setup` builds a `Training` in steps (data, model, generators, run files, resume, loaders), `run_epochs` trains
it, and what an epoch leaves behind (telemetry.h5, checkpoint.pt, metrics.json, the console) are epoch
callbacks, as in open_lth's training/train.py and standard_callbacks.py.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.norm_names import norm_suffix
from bnprobe.data.device import DeviceDataset, DeviceLoader, fixed_subset, load_dataset
from bnprobe.files import runs
from bnprobe.files.checkpoints import check_checkpoint, load_checkpoint, load_state_strict
from bnprobe.files.lock import locked
from bnprobe.nets.check import check_model
from bnprobe.nets.freeze import apply_freeze, apply_random_features, random_feature_masks
from bnprobe.nets.registry import from_config
from bnprobe.training.distributed import Process, augmentation_seed, sum_over_processes
from bnprobe.training.evaluate import evaluate, resolve_device
from bnprobe.training.graphs import TrainStep, graph_backend
from bnprobe.training.regularize import after_backward_steps, make_optimizer
from bnprobe.training.telemetry import GradientRecorder, TelemetryWriter


def trainable_model(
    config: TrainConfig, device: torch.device
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor], int, int]:
    """The model on `device`, frozen as `config` says, and its optimizer; also the random-feature masks and
    the trainable and total parameter counts. Shared by training and `sweep --calibrate`."""
    model = from_config(config)
    if config.sync_bn:  # BN statistics over the global batch; the parameters stay the same objects
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trainable, total = apply_freeze(model, config.freeze)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    masks = {}
    if config.random_features:
        masks = random_feature_masks(model, config.random_features, torch.Generator().manual_seed(config.seed + 1))
        trainable += apply_random_features(model, masks)
    if not trainable:
        raise BnprobeError(f"nothing to train: --freeze {config.freeze} with --bn {config.bn} leaves no trainable tensor")
    return model, make_optimizer(model, config, frozenset(masks)), masks, trainable, total


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile; on CUDA with CUDA graphs, since small CIFAR models are bound by kernel launches."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def train_one_epoch(
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    amp: bool = False,
    on_step: Optional[Callable[[], None]] = None,
    step: Optional[TrainStep] = None,
) -> tuple[float, float]:
    """One pass over `loader`; returns the running (train-mode, augmented) loss and accuracy.

    Each batch is one `step` (bnprobe.training.graphs: kept across epochs, with its hooks, graphs and telemetry); by
    default a plain eager step of `model`, `optimizer` and `amp`."""
    step = step or TrainStep(model, optimizer, amp)
    model.train()
    step.start_epoch()
    for x, y in loader:
        step(x, y)
        if on_step is not None:
            on_step()
    loss_sum, correct = step.loss_sum, step.correct
    # Under DDP each rank saw its own shard: the epoch's numbers are over all of them.
    sum_over_processes(loss_sum)
    sum_over_processes(correct)
    n = loader.examples * loader.world
    return loss_sum.item() / n, correct.item() / n


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _check_resumable(run_dir: Path, config: TrainConfig, resume: bool, overwrite: bool) -> Optional[dict[str, Any]]:
    """Decide from what is on disk whether to start, resume or refuse; return the checkpoint to resume."""
    if run_dir.exists() and not run_dir.is_dir():  # never replaced, not even with --overwrite: not ours
        raise BnprobeError(f"{run_dir} is a file, not a run directory; choose another --name or --runs-dir")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and overwrite:
        if not runs.is_run(run_dir):
            raise BnprobeError(f"will not overwrite {run_dir}: it is not a bnprobe run (no config.json bnprobe wrote)")
        foreign = runs.foreign_files(run_dir)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BnprobeError(f"will not overwrite {run_dir}: it holds files bnprobe did not write ({shown}); "
                               f"move them elsewhere first")
    if not exists or overwrite:
        return None
    if not resume:
        raise BnprobeError(f"run {run_dir} already exists; pass --resume to continue it or --overwrite to replace it")
    if not runs.checkpoint_path(run_dir).exists():
        return None  # it died before its first checkpoint: start again
    state = load_checkpoint(runs.checkpoint_path(run_dir))
    stored = check_checkpoint(state, runs.checkpoint_path(run_dir), resume=True)
    differing = [k for k, v in config.identity().items() if stored.identity()[k] != v
                 and (k != "norm_groups" or config.norm == stored.norm == "group")]  # groups: GroupNorm's alone
    if differing:
        diffs = ", ".join(f"{k}: stored {stored.identity()[k]!r} vs given {config.identity()[k]!r}" for k in differing)
        raise BnprobeError(f"cannot resume {run_dir}: settings differ ({diffs})")
    return state


def _restore(state: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             generator: torch.Generator, device: torch.device) -> None:
    """Load a checkpoint that check_checkpoint passed into this run's model, optimizer and RNGs: every
    tensor's shape is compared with what it goes into first, so a state that does not fit is one line."""
    load_state_strict(model, state["model"], path, "this run's model")
    misfit = BnprobeError(f"{path}: its optimizer state does not fit this run's trainable tensors")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state["optimizer"]["param_groups"]
    if [len(g["params"]) for g in optimizer.param_groups] != [len(g.get("params", ())) if isinstance(g, dict) else -1
                                                              for g in saved_groups]:
        raise misfit
    for index, entry in state["optimizer"]["state"].items():  # SGD's momentum buffer of parameter `index`
        buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else ()
        fits = isinstance(index, int) and 0 <= index < len(params) and (
            buffer is None or getattr(buffer, "shape", None) == params[index].shape)
        if not fits:
            raise misfit
    rng = state["rng"]
    try:
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(rng["data"].cpu() if device.type == "cpu" else rng["data"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:  # torch's own checks of these states
        raise BnprobeError(f"{path}: its optimizer or RNG state cannot be restored ({first_line(exc)})")


def _other_process_count(run_dir: Path, stored: int, given: int) -> str:
    """Each rank's batch (so its BN statistics) and shard depend on the process count: no exact resume across it."""
    how = f"under torchrun --nproc_per_node {stored} with --ddp" if stored > 1 else "in a single process"
    return (f"cannot resume {run_dir}: it was trained by {stored} process{'es' if stored > 1 else ''}, not {given}; "
            f"resume it {how}, or pass --overwrite to start again")


def prepare_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise BnprobeError(f"cannot write run directory {run_dir} ({exc.strerror or exc})")


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Optional[Console] = None,
    dataset: Optional[DeviceDataset] = None,
) -> list[dict[str, Any]]:
    """Train `config` into `run_dir`; return the per-epoch history. The CLI is a thin shell over this."""
    config = config.resolved()
    check_model(config)
    device = resolve_device(config.device)
    process = Process.start(device) if config.ddp else Process()
    device = process.device(device)
    console = (console or Console()) if process.main else Console(quiet=True)  # rank 0 speaks and writes
    replacement = runs.Replacement(run_dir)
    try:
        # Rank 0 holds the run's lock from before it looks at the folder until it is done writing it.
        with locked(run_dir, f"run directory {run_dir}") if process.main else nullcontext():
            try:
                if process.main and (recovered := replacement.recover()):
                    console.print(f"[yellow]note:[/] {escape(recovered)}", soft_wrap=True)
                return _train(config, run_dir, process, device, console, resume, overwrite, dataset, replacement)
            except BaseException:
                replacement.undo()  # an --overwrite that failed before its first checkpoint gives the old run back
                raise
    finally:
        process.stop()


@dataclass
class Training:
    """What setup builds for the epoch loop and its callbacks: one run, ready to train from `start_epoch`."""

    config: TrainConfig
    run_dir: Path
    process: Process
    device: torch.device
    console: Console
    replacement: runs.Replacement
    dataset: DeviceDataset
    model: nn.Module  # whose plain state_dict is saved
    step_model: nn.Module  # what trains: `model`, or a DDP / compiled wrapper sharing its parameters
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    augment_generator: torch.Generator
    masks: dict[str, torch.Tensor]
    trainable: int
    total: int
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    train_eval_loader: DeviceLoader
    recorder: GradientRecorder  # telemetry's gradient statistics, taken in each step on rank 0
    step: TrainStep  # one training step, eager or replayed from CUDA graphs, kept across epochs
    history: list[dict[str, Any]]
    start_epoch: int


# Run after every epoch, in order, with the epoch's record (already appended to the history): telemetry,
# checkpoint and metrics on rank 0, then the console (open_lth's standard callbacks).
EpochCallback = Callable[[Training, dict[str, Any]], None]


def _train(
    config: TrainConfig,
    run_dir: Path,
    process: Process,
    device: torch.device,
    console: Console,
    resume: bool,
    overwrite: bool,
    dataset: Optional[DeviceDataset],
    replacement: runs.Replacement,
) -> list[dict[str, Any]]:
    """Setup, then the epoch loop with its callbacks: the run's files on rank 0, then the console."""
    state = _check_run(config, run_dir, process, device, resume, overwrite)
    if state is not None and state["epoch"] >= config.epochs:
        console.print(f"[green]{escape(str(run_dir))} already finished {config.epochs} epochs; nothing to do.", soft_wrap=True)
        return state["history"]
    t = _setup(config, run_dir, process, device, console, state, overwrite, dataset, replacement)
    callbacks = _run_file_callbacks(t) if process.main else []  # rank 0 writes
    with ConsoleOutput(t) as output:
        run_epochs(t, [*callbacks, output.epoch_done], on_step=output.step)
    console.print(summary_table(config, run_dir, t.history, t.trainable, t.total))
    return t.history


def _check_run(config: TrainConfig, run_dir: Path, process: Process, device: torch.device, resume: bool,
               overwrite: bool) -> Optional[dict[str, Any]]:
    """Everything refused before the data loads; the checkpoint to resume, if any."""
    if config.batch_size % process.world:
        raise BnprobeError(f"--batch-size {config.batch_size} does not split over {process.world} processes")
    if config.sync_bn and device.type != "cuda":
        raise BnprobeError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm runs on GPUs only)")
    state = _check_resumable(run_dir, config, resume, overwrite)
    if state is not None and state["epoch"] < config.epochs:  # a finished run is only reported
        trained_by = int(state.get("processes", 1))
        if trained_by != process.world:
            raise BnprobeError(_other_process_count(run_dir, trained_by, process.world))
    return state


def _setup(
    config: TrainConfig,
    run_dir: Path,
    process: Process,
    device: torch.device,
    console: Console,
    state: Optional[dict[str, Any]],
    overwrite: bool,
    dataset: Optional[DeviceDataset],
    replacement: runs.Replacement,
) -> Training:
    """Data, model, optimizer and loaders, restored from `state` when resuming; the run directory prepared."""
    dataset = _data(config, device, console, dataset)
    model, optimizer, masks, trainable, total = trainable_model(config, device)
    step_model = _step_model(model, config, process, device)
    generator, augment_generator = _generators(config, process, device)
    if process.main:
        _prepare_files(run_dir, overwrite and state is None, replacement)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if state is not None:
        history, start_epoch = _resume(state, run_dir, model, optimizer, generator, device, console)
    if process.main:
        runs.write_json(runs.config_path(run_dir), config.to_dict())
    train_loader, test_loader, train_eval_loader = _loaders(config, dataset, process, generator, augment_generator)
    recorder = GradientRecorder(model, config.telemetry_every, len(train_loader), masks)
    recorder.step = start_epoch * len(train_loader)
    step = TrainStep(step_model, optimizer, config.amp, after_backward_steps(model, config, masks),
                     recorder if process.main else None, graph_backend(config, device, process.world), console)
    return Training(
        config, run_dir, process, device, console, replacement, dataset, model, step_model, optimizer, generator,
        augment_generator, masks, trainable, total, train_loader, test_loader, train_eval_loader, recorder,
        step, history, start_epoch,
    )


def _data(config: TrainConfig, device: torch.device, console: Console,
          dataset: Optional[DeviceDataset]) -> DeviceDataset:
    """The device settings the run wants, then its data set on the device (`dataset` when the caller has it)."""
    if config.amp and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        console.print("[yellow]warning: this CPU has no native bfloat16; --amp will be several times slower here")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if dataset is not None:
        return dataset
    return load_dataset(
        config.dataset,
        Path(config.data_dir) if config.data_dir else None,
        device=device,
        normalize=config.normalize,
        subset=config.subset,
        test_subset=config.test_subset,
        download=config.download,
        verify=config.verify,
    )


def _step_model(model: nn.Module, config: TrainConfig, process: Process, device: torch.device) -> nn.Module:
    """What trains: `model`, or a DDP / compiled wrapper sharing its parameters (`model`'s plain state_dict is
    what is saved)."""
    step_model = model
    if process.world > 1:
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = compile_model(step_model, device)
    return step_model


def _generators(config: TrainConfig, process: Process, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The order's stream and the augmentation's. One process draws order and augmentation from one stream, whose
    state the checkpoint keeps. Under DDP that stream draws the order alone, so it stays the same on every rank
    (rank 0's saved state is every rank's), and each rank augments from its own stream, reseeded each epoch from
    (seed, epoch, rank)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator, torch.Generator(device=device) if process.world > 1 else generator


def _prepare_files(run_dir: Path, replace: bool, replacement: runs.Replacement) -> None:
    """Rank 0's run directory: an old run set aside when `replace` (only now: every check passed and the data
    loaded), the directory made, and the half-written run files of a killed process removed (not a probe's)."""
    if replace and run_dir.exists():
        replacement.set_aside()
    prepare_run_dir(run_dir)
    for leftover in run_dir.glob(".*.tmp"):
        if leftover.name.startswith(tuple(f".{name}." for name in runs.RUN_FILES)):
            leftover.unlink()


def _resume(state: dict[str, Any], run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            generator: torch.Generator, device: torch.device, console: Console) -> tuple[list[dict[str, Any]], int]:
    """Model, optimizer and order stream restored from the checkpoint; its history and the epochs it trained."""
    _restore(state, runs.checkpoint_path(run_dir), model, optimizer, generator, device)
    history, start_epoch = list(state["history"]), int(state["epoch"])
    console.print(f"Resuming {escape(str(run_dir))} after epoch {start_epoch}.", soft_wrap=True)
    return history, start_epoch


def _loaders(config: TrainConfig, dataset: DeviceDataset, process: Process, generator: torch.Generator,
             augment_generator: torch.Generator) -> tuple[DeviceLoader, DeviceLoader, DeviceLoader]:
    """The training loader (this rank's shard, augmented), the test loader, and the train-eval loader: eval-mode
    accuracy on a fixed set of training images, the honest side of the generalisation gap."""
    channels_last = config.channels_last
    train_loader = DeviceLoader(
        dataset.train_x, dataset.train_y, dataset.mean, dataset.std, config.batch_size // process.world,
        shuffle=True, flip=config.flip, translate=config.translate, generator=generator,
        augment_generator=augment_generator, shard=(process.rank, process.world), channels_last=channels_last,
    )
    test_loader = DeviceLoader(
        dataset.test_x, dataset.test_y, dataset.mean, dataset.std, config.eval_batch_size, channels_last=channels_last
    )
    train_eval_index = fixed_subset(len(dataset.train_y), config.train_eval_subset, dataset.train_y.device)
    train_eval_loader = DeviceLoader(
        dataset.train_x[train_eval_index], dataset.train_y[train_eval_index], dataset.mean, dataset.std,
        config.eval_batch_size, channels_last=channels_last,
    )
    return train_loader, test_loader, train_eval_loader


def run_epochs(t: Training, callbacks: Sequence[EpochCallback], on_step: Optional[Callable[[], None]] = None) -> None:
    """Train from `t.start_epoch` to the last epoch; after each, append its record and run `callbacks`."""
    config = t.config
    for epoch in range(t.start_epoch, config.epochs):
        lr = config.lr_at(epoch)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        if t.process.world > 1:
            t.augment_generator.manual_seed(augmentation_seed(config.seed, epoch, t.process.rank))
        started = time.perf_counter()
        train_loss, train_acc = train_one_epoch(
            t.step_model, t.train_loader, t.optimizer, config.amp, on_step=on_step, step=t.step,
        )
        seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            kept = f"the last good checkpoint (epoch {epoch}) is kept in {t.run_dir}" if epoch else "no checkpoint was written"
            raise BnprobeError(f"training loss became {train_loss} in epoch {epoch + 1}; stopped, {kept}")
        test_loss, test_acc = evaluate(t.step_model, t.test_loader, config.amp)
        train_eval_loss, train_eval_acc = evaluate(t.step_model, t.train_eval_loader, config.amp)
        record = {
            "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
            "train_eval_loss": train_eval_loss, "train_eval_acc": train_eval_acc,
            "test_loss": test_loss, "test_acc": test_acc, "gap": train_eval_acc - test_acc,
            "seconds": seconds, "images_per_s": t.train_loader.examples * t.process.world / seconds,
        }
        infinite = [key for key, value in record.items() if not math.isfinite(value)]
        if infinite:  # metrics.json (JSON) cannot hold it, and every reader refuses it
            kept = f"the last good checkpoint (epoch {epoch}) is kept in {t.run_dir}" if epoch else "no checkpoint was written"
            raise BnprobeError(f"{infinite[0]} became {record[infinite[0]]} in epoch {epoch + 1}; stopped, {kept}")
        t.history.append(record)
        for callback in callbacks:
            callback(t, record)


# ---- the epoch callbacks ---------------------------------------------------------------------------


def _run_file_callbacks(t: Training) -> list[EpochCallback]:
    """Rank 0's: telemetry.h5, then checkpoint.pt, then metrics.json (which makes an --overwrite final)."""
    telemetry = TelemetryWriter(t.run_dir, t.model, t.config, t.recorder, (t.trainable, t.total))
    telemetry.start(t.start_epoch)

    # Telemetry before the checkpoint: an epoch's gradient rows cannot be made again once its checkpoint is saved,
    # and a resume trims rows past the checkpoint (a kill between the two). A checkpoint that fails (a full disk,
    # Ctrl-C) takes its epoch's rows back at once, so the files agree on the epochs done.
    def checkpoint(t: Training, record: dict[str, Any]) -> None:
        try:
            save_checkpoint(t, record)
        except BaseException:
            try:
                telemetry.trim(record["epoch"] - 1)  # journaled; the failed checkpoint's space is free again
            except Exception:  # noqa: BLE001 - the checkpoint's error is the one to report; a resume trims them
                pass
            raise

    return [lambda _, record: telemetry.write_epoch(record), checkpoint, save_metrics]


def save_checkpoint(t: Training, record: dict[str, Any]) -> None:
    runs.save_checkpoint(
        runs.checkpoint_path(t.run_dir),
        {
            "config": t.config.to_dict(), "epoch": record["epoch"], "finished": record["epoch"] == t.config.epochs,
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "rng": _rng_state(t.generator, t.device), "history": t.history,
            "normalization": {"mean": t.dataset.mean.cpu(), "std": t.dataset.std.cpu()},
            "trainable": t.trainable, "total": t.total, "processes": t.process.world,
            "random_feature_masks": {name: mask.cpu() for name, mask in t.masks.items()},
        },
    )


def save_metrics(t: Training, record: dict[str, Any]) -> None:
    runs.write_json(runs.metrics_path(t.run_dir), t.history)
    t.replacement.commit()  # the epoch's files are written: an --overwrite's old run can go


class ConsoleOutput:
    """The header line, the progress bars (transient) and one line per epoch; `step` advances the steps bar."""

    def __init__(self, t: Training):
        self.t = t
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
            console=t.console, transient=True,
        )

    def __enter__(self) -> "ConsoleOutput":
        t, config = self.t, self.t.config
        t.console.print(
            f"[bold]{config.model}[/] on {config.dataset} ({len(t.dataset.train_y)} train / {len(t.dataset.test_y)} "
            f"test), freeze={config.freeze}: [bold]{t.trainable:,}[/] of {t.total:,} parameters trainable "
            f"({100 * t.trainable / t.total:.2f}%), device={t.device}{', bf16 autocast' if config.amp else ''}"
            f"{', CUDA graphs' if t.step.graphs is not None else ''}"
            f"{f', {t.process.world} processes' if t.process.world > 1 else ''}",
            soft_wrap=True,
        )
        self.progress.__enter__()
        self.epochs = self.progress.add_task("epochs", total=config.epochs, completed=t.start_epoch, status="")
        self.steps = self.progress.add_task("steps", total=len(t.train_loader), status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def step(self) -> None:
        self.progress.advance(self.steps)

    def epoch_done(self, t: Training, record: dict[str, Any]) -> None:
        self.progress.advance(self.epochs)
        self.progress.update(self.epochs, status=f"test acc {record['test_acc']:.2%}")
        t.console.print(
            f"epoch {record['epoch']}/{t.config.epochs} lr {record['lr']:.3g} | train {_loss(record['train_loss'])} "
            f"{record['train_acc']:.1%} | test {_loss(record['test_loss'])} {record['test_acc']:.1%} | "
            f"gap {record['gap']:+.1%} | {record['images_per_s']:,.0f} img/s",
            soft_wrap=True,
        )
        self.progress.reset(self.steps, total=len(t.train_loader))  # for the next epoch


def _loss(value: float) -> str:
    """3 decimals, or 3 significant digits when huge (deep BN-only nets at epoch 1 in eval mode)."""
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.3g}"


def summary_table(
    config: TrainConfig, run_dir: Path, history: list[dict[str, Any]], trainable: int, total: int
) -> Table:
    last = history[-1]
    best = max(history, key=lambda r: r["test_acc"])
    table = Table(title=f"Run {escape(str(run_dir))}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", f"{config.model} (width {config.width}, shortcut {config.shortcut}"
                  f"{norm_suffix(config.norm, config.norm_groups, ', {}')})"),
        ("data set", config.dataset),
        ("freeze", config.freeze),
        ("trainable / total", f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"),
        ("epochs", str(last["epoch"])),
        ("train acc (running, augmented)", f"{last['train_acc']:.2%}"),
        ("train acc (eval mode)", f"{last['train_eval_acc']:.2%}"),
        ("test acc (final)", f"{last['test_acc']:.2%}"),
        ("test acc (best)", f"{best['test_acc']:.2%} at epoch {best['epoch']}"),
        ("generalisation gap", f"{last['gap']:+.2%} (eval-mode train acc - test acc)"),
        ("train time", f"{sum(r['seconds'] for r in history):.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table

