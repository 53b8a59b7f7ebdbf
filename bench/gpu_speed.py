"""GPU speed of the experiments users run (issue 14): eager against CUDA-graphed training steps, and packed runs.

In one run, on CIFAR-10-shaped synthetic data (batch 128), nothing downloaded:

(a) images/s of bnprobe's own training, `bnprobe.training.train.train` (the code `bnprobe train` runs: model, freezing,
    optimizer, telemetry and step), for resnet20 and resnet110 (`--models`), BN-only (`--freeze non-bn`) and full,
    in fp32 and bf16 autocast (`--amp`), eager (`graphs=False`), graphed (`graphs=True`, the step captured as a
    CUDA graph) and, with `--compile-models`, compiled (`compile=True`: torch.compile's reduce-overhead mode),
    with each one's ratio to eager.
(b) the aggregate images/s of 1, 2 and 4 ResNet-20 BN-only runs trained at once by `bnprobe sweep --per-device N`
    (`bnprobe.sweep.launch.run_sweep`: one process per run, all on this device, started together), against one run.

Timing: each run trains a few epochs of exactly `steps` full batches; epoch 1 is the warm-up (cuDNN's algorithm
search, graph capture) and is reported separately; the rate is the median over the later epochs of the time
`train` itself records for an epoch's steps (they end on a host sync, `.item()`; the evaluation after them is
not timed). Graph capture's one-time cost is the graphed warm-up epoch's extra time over the eager one's.
Packed: each run's median rate over its later epochs, summed over the runs (the runs are identical and
started together, so those epochs overlap); also the whole sweep's images / wall clock, start-up included.

Graph capture's and compilation's one-time costs are their warm-up epoch's extra time over the eager one's.
On a CPU graphs are off (rows are eager only, marked so), fp32 alone by default, and sizes should be tiny
(tests/test_bench.py runs it that way).

    python bench/gpu_speed.py                       # CUDA: ~2-3 minutes on an H100
    python bench/gpu_speed.py --compile-models resnet20 --packed ''   # + compiled rows (~1 minute per compile)
    python bench/gpu_speed.py --json speed.json     # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable without installing the package

from common import device_name, device_or_exit, sync, verdict  # noqa: E402

from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.core.datasets import get_dataset_spec  # noqa: E402
from bnprobe.core.errors import first_line  # noqa: E402
from bnprobe.data.device import DeviceDataset, normalization_stats  # noqa: E402
from bnprobe.files import runs  # noqa: E402
from bnprobe.files.schema import read_json  # noqa: E402
from bnprobe.sweep.launch import run_sweep  # noqa: E402
from bnprobe.sweep.plan import PlannedRun  # noqa: E402
from bnprobe.training.evaluate import resolve_device  # noqa: E402
from bnprobe.training.train import train  # noqa: E402

TARGET_RESNET20_BN_ONLY = 50_000  # img/s, graphed, H200, from the issue
TARGET_RESNET110_RATIO = 3.0  # ResNet-110 BN-only graphed / eager
TARGET_PACKED_4 = 2.5  # aggregate of 4 packed runs / one run

# Timed steps per epoch on CUDA: a few for the slow eager ResNet-866, so the whole script stays in minutes.
CUDA_STEPS = {"resnet20": 200, "resnet110": 40, "resnet866": 8}

# How each mode trains: TrainConfig fields.
MODES = {"eager": dict(graphs=False, compile=False), "graphed": dict(graphs=True, compile=False),
         "compiled": dict(graphs=False, compile=True)}
PRECISIONS = {"fp32": False, "bf16": True}  # -> TrainConfig.amp


def graph_modes(cuda: bool) -> list[bool]:
    """The `graphs` settings to time: eager and graphed on CUDA, eager alone on a CPU (graphs are CUDA's)."""
    return [False, True] if cuda else [False]


def names(text: str, allowed=None) -> list[str]:
    """A comma-separated list (empty entries dropped), each checked against `allowed` when given."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    bad = [item for item in items if allowed is not None and item not in allowed]
    if bad:
        raise ValueError(f"{', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def synthetic_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


def synthetic_dataset(images: int, test_images: int, device: torch.device) -> DeviceDataset:
    """CIFAR-10-shaped random images on the device, as load_dataset would hand them to train."""
    spec = get_dataset_spec("cifar10")
    train_x, train_y = (torch.from_numpy(a).to(device) for a in synthetic_arrays(images, 0))
    test_x, test_y = (torch.from_numpy(a).to(device) for a in synthetic_arrays(test_images, 1))
    mean, std = normalization_stats(train_x, spec.normalize)
    return DeviceDataset(spec, train_x, train_y, test_x, test_y, mean, std)


def write_cifar(folder: Path, images: int, test_images: int) -> Path:
    """The same kind of data as CIFAR-10's python batches on disk, for worker processes that load it themselves."""
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("data_batch_1", synthetic_arrays(images, 0)), ("test_batch", synthetic_arrays(test_images, 1))):
        with open(root / name, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), "labels": y.tolist()}, f)
    return folder


def rates(history: list[dict[str, Any]]) -> tuple[float, float]:
    """(median images/s of the epochs after the first, seconds the first epoch took beyond that rate)."""
    rate = statistics.median(r["images_per_s"] for r in history[1:])
    first = history[0]
    return rate, first["seconds"] - first["images_per_s"] * first["seconds"] / rate


def measure(config: TrainConfig, dataset: DeviceDataset, run_dir: Path) -> dict[str, Any]:
    """One run of `train` on `dataset`: its steady images/s and its first epoch's extra seconds."""
    from rich.console import Console

    device = resolve_device(config.device)
    sync(device)
    history = train(config, run_dir, console=Console(quiet=True), dataset=dataset)
    sync(device)
    rate, warmup = rates(history)
    return {"images_per_s": rate, "warmup_s": warmup, "epochs": [r["images_per_s"] for r in history]}


def table_a(result: dict[str, Any], args: argparse.Namespace, eager_only: str) -> Any:
    """Eager against graphed (and compiled), one row per model, freeze and precision (adds each row's ratios to
    `result`)."""
    from rich.table import Table

    def number(cell: Optional[dict[str, Any]], key: str, fmt: str) -> str:
        if cell is None:
            return "-"
        return "failed" if "error" in cell else format(cell[key], fmt)

    def over_eager(row: dict[str, Any], mode: str) -> Optional[float]:
        eager, other = row["eager"], row.get(mode)
        if other is None or "error" in other or "error" in eager:
            return None
        return other["images_per_s"] / eager["images_per_s"]

    modes = ["eager", "graphed"] + (["compiled"] if any("compiled" in row for row in result["rows"]) else [])
    table = Table(title=f"(a) training img/s, eager vs CUDA graphs: {result['device_name']}, batch {args.batch_size}, "
                        f"median of {args.epochs - 1} epochs after a warm-up epoch")
    headers = ["model", "freeze", "precision", "steps/epoch", *(f"{mode} img/s" for mode in modes)]
    headers += [f"{mode} / eager" for mode in modes if mode != "eager"] + ["eager warm-up s"]
    headers += [{"graphed": "capture s", "compiled": "compile s"}[mode] for mode in modes if mode != "eager"]
    for header in headers + ["target"]:
        table.add_column(header, justify="left" if header in ("model", "freeze", "precision", "target") else "right")
    for row in result["rows"]:
        ratios = {mode: over_eager(row, mode) for mode in modes if mode != "eager"}
        row.update({f"{mode}_over_eager": ratio for mode, ratio in ratios.items()})
        extra = {mode: row[mode]["warmup_s"] - row["eager"]["warmup_s"] if ratios[mode] is not None else None
                 for mode in ratios}
        graphed, ratio = row.get("graphed"), ratios.get("graphed")
        target = ""
        if row["freeze"] == "non-bn" and row["model"] == "resnet20":
            best = graphed if ratio is not None else row["eager"]
            target = f">= {TARGET_RESNET20_BN_ONLY:,} img/s graphed: " + (
                verdict(best["images_per_s"] >= TARGET_RESNET20_BN_ONLY) if "error" not in best else "failed")
        if row["freeze"] == "non-bn" and row["model"] == "resnet110":
            target = f">= {TARGET_RESNET110_RATIO:g}x: " + (verdict(ratio >= TARGET_RESNET110_RATIO) if ratio else "not measured")
        cells = [row["model"], row["freeze"], row["precision"], str(result["steps"][row["model"]])]
        for mode in modes:
            cells.append(number(row.get(mode), "images_per_s", ",.0f") if mode == "eager" or row.get(mode)
                         else f"[dim]{eager_only or '-'}" if mode == "graphed" else "-")
        cells += [f"{r:.2f}x" if r else "-" for r in ratios.values()] + [number(row["eager"], "warmup_s", ".1f")]
        cells += [f"{e:+.1f}" if e is not None else "-" for e in extra.values()] + [target]
        table.add_row(*cells)
    return table


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--models", default="resnet20,resnet110",
                   help="comma-separated (resnet866 too, if you have the minutes); '' skips part (a) [resnet20,resnet110]")
    p.add_argument("--freezes", default="non-bn,none", help="freeze modes of part (a) [non-bn,none]")
    p.add_argument("--precisions", default=None, help="fp32 and/or bf16 (autocast) [CUDA: fp32,bf16; CPU: fp32]")
    p.add_argument("--compile-models", default="", help="models of part (a) also timed with --compile [none]")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per epoch [CUDA: {', '.join(f'{k} {v}' for k, v in CUDA_STEPS.items())}, others 40; CPU: 2]")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first one warm-up [3]")
    p.add_argument("--packed", default="1,2,4", help="numbers of runs trained at once; '' skips them [1,2,4]")
    p.add_argument("--pack-model", default="resnet20", help="model of the packed runs (BN-only) [resnet20]")
    p.add_argument("--pack-steps", type=int, default=None, help="steps per epoch of each packed run [CUDA 300, CPU 2]")
    p.add_argument("--pack-epochs", type=int, default=5, help="epochs of each packed run, the first one warm-up [5]")
    p.add_argument("--pack-eager", action="store_true", help="packed runs eager (default: graphed where graphs are timed)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here as JSON")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.steps is not None and args.steps < 1) or (args.pack_steps is not None and args.pack_steps < 1):
        p.error("--batch-size, --steps and --pack-steps must be >= 1")
    if args.epochs < 2 or args.pack_epochs < 2:
        p.error("--epochs and --pack-epochs must be >= 2 (the first one is warm-up)")
    try:
        args.packed = [int(n) for n in args.packed.split(",") if n.strip()]  # "": skip part (b)
    except ValueError:
        p.error(f"--packed must be comma-separated counts, got {args.packed!r}")
    if args.packed and min(args.packed) < 1:
        p.error("--packed counts must be >= 1")
    try:
        args.freezes = names(args.freezes, ("non-bn", "none", "all-but-output"))
        args.precisions = None if args.precisions is None else names(args.precisions, tuple(PRECISIONS))
        args.compile_models = names(args.compile_models)
    except ValueError as exc:
        p.error(f"unknown {exc}")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    args = parse_args(argv)
    console = Console()
    device = device_or_exit(console, args.device)
    cuda = device.type == "cuda"
    modes = graph_modes(cuda)
    eager_only = "" if True in modes else "graphs off on a CPU"
    console.print(f"[bold]torch {torch.__version__} | {device.type}: {device_name(device)} | batch {args.batch_size}"
                  + (f" | {eager_only}" if eager_only else ""))
    result: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": device_name(device),
                              "batch_size": args.batch_size, "steps": {}, "rows": [],
                              "packed": []}
    started = time.perf_counter()
    base = dict(dataset="cifar10", batch_size=args.batch_size, device=str(device), milestones="",
                train_eval_subset=args.batch_size, eval_batch_size=args.batch_size, download=False, verify=False)

    with tempfile.TemporaryDirectory(prefix="gpu-speed-") as scratch:
        scratch = Path(scratch)
        # ---- (a) eager against graphed, one process
        precisions = args.precisions or (list(PRECISIONS) if cuda else ["fp32"])
        for model in names(args.models):
            steps = args.steps or (CUDA_STEPS.get(model, 40) if cuda else 2)
            result["steps"][model] = steps
            dataset = synthetic_dataset(steps * args.batch_size, args.batch_size, device)
            timed = [("graphed" if graphs else "eager") for graphs in modes]
            timed += ["compiled"] if model in args.compile_models else []
            for freeze in args.freezes:
                for precision in precisions:
                    row: dict[str, Any] = {"model": model, "freeze": freeze, "precision": precision}
                    for name in timed:
                        config = TrainConfig(model=model, freeze=freeze, epochs=args.epochs, amp=PRECISIONS[precision],
                                             **MODES[name], **base)
                        try:
                            row[name] = measure(config, dataset, scratch / f"{model}-{freeze}-{precision}-{name}")
                            console.print(f"  {model:<10} {freeze:<7} {precision} {name:<8} "
                                          f"{row[name]['images_per_s']:>10,.0f} img/s "
                                          f"(warm-up epoch {row[name]['warmup_s']:+.1f} s)")
                        except Exception as exc:  # one failing row must not cost the others: the machine time is scarce
                            row[name] = {"error": first_line(exc, typed=True, limit=200)}
                            console.print(f"  [red]{model} {freeze} {precision} {name} failed: {escape(row[name]['error'])}")
                        if cuda:
                            torch.cuda.empty_cache()
                    result["rows"].append(row)
            del dataset
        if result["rows"]:  # printed now: the packed runs below cannot take these numbers with them
            console.print(table_a(result, args, eager_only))

        # ---- (b) packed runs through `sweep --per-device N`, the data on disk as workers load it
        pack_steps = args.pack_steps or (300 if cuda else 2)
        data_dir = write_cifar(scratch / "data", pack_steps * args.batch_size, args.batch_size)
        pack_graphs = modes[-1] and not args.pack_eager  # graphed where graphs are timed at all
        # Workers import bnprobe themselves: this checkout's, even when it is not installed.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        quiet = Console(quiet=True)
        for n in args.packed:
            begun = time.perf_counter()
            entry: dict[str, Any] = {"runs": n}
            try:
                planned = []
                for seed in range(n):
                    config = TrainConfig(model=args.pack_model, freeze="non-bn", epochs=args.pack_epochs, seed=seed,
                                         data_dir=str(data_dir), graphs=pack_graphs, **base).resolved()
                    planned.append(PlannedRun(config, scratch / f"packed-{n}" / config.run_name()))
                # At least two slots, so that one run too trains in a worker process of its own, as packed ones do.
                outcome = run_sweep(planned, quiet, None, per_device=max(n, 2))
                entry["wall_s"] = wall = time.perf_counter() - begun
                failed = [run for run in planned if outcome[run.run_dir.name] != "done"]
                for run in failed:
                    log = run.run_dir.parent / f"{run.run_dir.name}.log"
                    tail = log.read_text()[-600:] if log.exists() else "(no log)"
                    console.print(f"[red]packed {n}: {escape(str(log))}:[/] {escape(tail)}")
                if failed:
                    raise RuntimeError(f"{len(failed)} of {n} runs failed")
                per_run = [rates(read_json(runs.metrics_path(run.run_dir)))[0] for run in planned]
                entry.update(per_run=per_run, aggregate=sum(per_run),
                             wall_aggregate=n * args.pack_epochs * pack_steps * args.batch_size / wall)
                console.print(f"  packed {n}: {entry['aggregate']:>10,.0f} img/s together "
                              f"({', '.join(f'{r:,.0f}' for r in per_run)}); sweep wall clock {wall:.1f} s")
            except Exception as exc:  # as in (a): the other counts still get measured
                entry["error"] = first_line(exc, typed=True, limit=200)
                console.print(f"  [red]packed {n} failed: {escape(entry['error'])}")
            result["packed"].append(entry)
    result["seconds_total"] = time.perf_counter() - started

    packed = Table(title=f"(b) {args.pack_model} BN-only runs at once (`sweep --per-device N`, one process each, "
                         f"{'graphed' if pack_graphs else 'eager'}), {pack_steps} steps x {args.pack_epochs} epochs each")
    for header in ("runs", "aggregate img/s", "per run img/s", "x one run", "wall-clock img/s (start-up incl.)",
                   "x one run ", "target"):
        packed.add_column(header, justify="right" if header != "target" else "left")
    one = next((e for e in result["packed"] if e["runs"] == 1 and "error" not in e), None)
    for entry in result["packed"]:
        if "error" in entry:
            packed.add_row(str(entry["runs"]), "failed", escape(entry["error"]), "", "", "", "")
            continue
        ratio = entry["aggregate"] / one["aggregate"] if one else None
        wall_ratio = entry["wall_aggregate"] / one["wall_aggregate"] if one else None
        entry["over_one_run"], entry["wall_over_one_run"] = ratio, wall_ratio
        target = f">= {TARGET_PACKED_4:g}x: {verdict(ratio >= TARGET_PACKED_4)}" if entry["runs"] == 4 and ratio else ""
        packed.add_row(str(entry["runs"]), f"{entry['aggregate']:,.0f}", ", ".join(f"{r:,.0f}" for r in entry["per_run"]),
                       f"{ratio:.2f}x" if ratio else "-", f"{entry['wall_aggregate']:,.0f}",
                       f"{wall_ratio:.2f}x" if wall_ratio else "-", target)
    if result["packed"]:
        console.print(packed)
    console.print(f"({result['seconds_total']:.0f} s in all)")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {args.json}")
    failed = sum("error" in cell for row in result["rows"] for cell in row.values() if isinstance(cell, dict))
    failed += sum("error" in entry for entry in result["packed"])
    if failed:  # every number is printed above; the exit status says that some are missing
        console.print(f"[red]{failed} measurement(s) failed")
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
