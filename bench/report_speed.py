"""How long `bnprobe report` takes on a realistic directory, and its peak memory: 50 runs -> one PDF.

The runs are synthetic but valid: config.json, metrics.json, checkpoint.pt and telemetry.h5 written
directly by docs/hdf5-schema.md (no training; file names, formats and versions from bnprobe.core.formats, the
telemetry groups from bnprobe.training.telemetry, so a schema change there reaches this bench), with the sizes of real CIFAR-10 runs: 160 epochs of 391
steps (62,560 recorded steps per run), BN snapshots of every layer after every epoch, five models from
ResNet-20 to ResNet-110 and VGG-14/38, all five freeze modes, two seeds; ten runs carry a clamp ablation
(format bnprobe-ablation, as bnprobe/analysis/ablate.py writes it). Only the report is timed.

    .venv/bin/python bench/report_speed.py                 # 50 runs -> PDF, prints the time
    .venv/bin/python bench/report_speed.py --runs 10 --html --keep /tmp/bench-runs
    .venv/bin/python bench/report_speed.py --against 67b3346 --rounds 2   # beside that commit, alternately
    .venv/bin/python bench/report_speed.py --against 67b3346 --busy 2     # ... each beside 2 busy processes

--against REV times the report of git revision REV (its own bench/report_speed.py, on runs that it makes in its
own formats) and this one's in turns, in one session: machines differ, and a neighbour's load comes and goes, so
the ratio is the figure to read. 67b3346 is the code issue 15 measured at 14.6 s ("< 10 s" asked: a ratio of
0.68 or less). --busy N runs N busy-loop processes (as many cores as a training run takes) beside every report
timed, the usual case on a shared machine: a report must not starve beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnprobe.core.config import TrainConfig  # noqa: E402
from bnprobe.core.formats import (
    ABLATION_FORMAT,
    ABLATION_VERSION,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    BN_FREEZE_MODES,
    FREEZE_MODES,
    METRICS_FILE,
    TELEMETRY_FILE,
    TELEMETRY_FORMAT,
    TELEMETRY_VERSION,
)
from bnprobe.files.store import append_rows, set_attrs, write_array  # noqa: E402

MODELS = ("resnet20", "resnet56", "resnet110", "vgg14", "vgg38")
BN_NET_FREEZE_MODES = tuple(mode for mode in FREEZE_MODES if mode not in BN_FREEZE_MODES)  # as BN nets spell them
EPOCHS, STEPS_PER_EPOCH = 160, 391


def bn_layers(model: str) -> list[tuple[str, int]]:
    """(name, channels) of every BN layer, in network order, shaped like the real models."""
    depth = int("".join(c for c in model if c.isdigit()))
    if model.startswith("vgg"):
        widths = np.repeat([64, 128, 256, 512], int(np.ceil((depth - 1) / 4)))[: depth - 1]
        return [(f"features.{i}.bn", int(w)) for i, w in enumerate(widths)]
    blocks = (depth - 2) // 6
    layers = [("bn1", 16)]
    for stage in (1, 2, 3):
        width = 16 * 2 ** (stage - 1)
        for block in range(blocks):
            layers += [(f"layer{stage}.{block}.bn1", width), (f"layer{stage}.{block}.bn2", width)]
            if stage > 1 and block == 0:
                layers.append((f"layer{stage}.0.shortcut.1", width))
    return layers


def parameters(model: str, freeze: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    names, groups, numel = [], [], []
    previous = 3
    for layer, channels in bn_layers(model):
        conv = layer.replace("bn", "conv") if "shortcut" not in layer else layer[:-1] + "0"
        names += [f"{conv}.weight", f"{layer}.weight", f"{layer}.bias"]
        groups += ["conv_weight", "bn_gamma", "bn_beta"]
        numel += [previous * channels * 9, channels, channels]
        previous = channels
    names += ["fc.weight", "fc.bias"]
    groups += ["linear_weight", "bias"]
    numel += [previous * 10, 10]
    groups_arr = np.array(groups)
    bn = np.isin(groups_arr, ["bn_gamma", "bn_beta"])
    output = np.array([n.startswith("fc.") for n in names])
    trainable = {"none": np.ones(len(names), bool), "non-bn": bn, "non-bn-output": bn | output,
                 "all-but-output": output, "bn": ~bn}[freeze]
    return names, groups, np.array(numel, dtype=np.int64), trainable


def write_run(run_dir: Path, model: str, freeze: str, seed: int, rng: np.random.Generator) -> None:
    run_dir.mkdir(parents=True)
    config = TrainConfig(model=model, dataset="cifar10", freeze=freeze, seed=seed, epochs=EPOCHS,
                         flip=True, translate=4, normalize="per-pixel")
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))

    # Plausible curves: BN-only and output-only runs learn less, deeper nets a little more.
    ceiling = {"none": 0.93, "bn": 0.91, "non-bn": 0.6, "non-bn-output": 0.65, "all-but-output": 0.35}[freeze]
    ceiling += 0.01 * np.log2(int("".join(c for c in model if c.isdigit())) / 20) + rng.normal(0, 0.005)
    epoch = np.arange(1, EPOCHS + 1, dtype=np.float64)
    test = ceiling * (1 - np.exp(-epoch / 15)) + rng.normal(0, 0.01, EPOCHS)
    train_eval = np.minimum(1, test + 0.04 * epoch / EPOCHS + rng.normal(0, 0.005, EPOCHS))
    history = {
        "epoch": epoch, "lr": np.where(epoch <= 80, 0.1, np.where(epoch <= 120, 0.01, 0.001)),
        "train_loss": 2.3 * np.exp(-epoch / 20), "train_acc": train_eval - 0.02,
        "train_eval_loss": 2.2 * np.exp(-epoch / 20), "train_eval_acc": train_eval,
        "test_loss": 2.4 * np.exp(-epoch / 22), "test_acc": test, "gap": train_eval - test,
        "seconds": np.full(EPOCHS, 20.0), "images_per_s": np.full(EPOCHS, 2500.0),
    }
    rows = [{k: float(v[i]) for k, v in history.items()} for i in range(EPOCHS)]
    (run_dir / METRICS_FILE).write_text(json.dumps(rows, indent=2, sort_keys=True))

    from bnprobe.training.telemetry import GROUPS as TELEMETRY_GROUPS  # imports torch: only where runs are made

    names, groups, numel, trainable = parameters(model, freeze)
    # A loadable checkpoint without the weights (the report reads weights only for runs without telemetry).
    from bnprobe.files.runs import save_checkpoint

    save_checkpoint(run_dir / CHECKPOINT_FILE, {
        "config": config.to_dict(), "epoch": EPOCHS, "finished": True, "history": rows,
        "trainable": int(numel[trainable].sum()), "total": int(numel.sum()),
    })

    steps = EPOCHS * STEPS_PER_EPOCH
    with h5py.File(run_dir / TELEMETRY_FILE, "w") as f:
        set_attrs(f, {"format": TELEMETRY_FORMAT, "version": TELEMETRY_VERSION, "config_json": json.dumps(config.to_dict())})
        set_attrs(f, {f"config.{k}": v for k, v in config.to_dict().items()})
        p = f.create_group("params")
        write_array(p, "name", np.array(names))
        write_array(p, "group", np.array(groups))
        write_array(p, "numel", numel)
        write_array(p, "trainable", trainable)
        s = f.create_group("steps")
        append_rows(s, "step", np.arange(steps, dtype=np.int64))
        append_rows(s, "epoch", np.repeat(np.arange(1, EPOCHS + 1, dtype=np.int32), STEPS_PER_EPOCH))
        for dataset in ("grad_abs_mean", "grad_l2"):
            # (S, P) per tensor: never read by the report, so left unwritten (NaN fill) to keep the bench small.
            s.create_dataset(dataset, shape=(steps, len(names)), dtype=np.float32, chunks=(1024, len(names)),
                             compression="gzip", fillvalue=np.nan)
        t = np.arange(steps)
        for group in (g for g in TELEMETRY_GROUPS if g in groups):  # as training writes them: the model's groups
            members = np.array(groups) == group
            g = s.create_group(f"groups/{group}")
            frozen = not (members & trainable).any()
            set_attrs(g, {"frozen": frozen, "numel": int(numel[members].sum()), "tensors": int(members.sum())})
            scale = {"bn_gamma": 5e-2, "bn_beta": 4e-2, "conv_weight": 1e-2, "linear_weight": 2e-2, "bias": 3e-2}[group]
            curve = scale * np.exp(-t / steps * 2) * rng.lognormal(0, 0.3, steps)
            values = np.full(steps, np.nan) if frozen else curve
            append_rows(g, "grad_abs_mean", values.astype(np.float32))
            append_rows(g, "grad_l2", (values * 30).astype(np.float32))
        e = f.create_group("epochs")
        for key, column in history.items():
            append_rows(e, key, column.astype(np.float64))
        bn = f.create_group("bn")
        append_rows(bn, "epoch", np.arange(EPOCHS + 1, dtype=np.int32))
        bn_trains = freeze in ("none", "non-bn", "non-bn-output")
        for layer, channels in bn_layers(model):
            init = rng.uniform(0, 1, channels)
            final = init * rng.lognormal(-0.3, 0.6, channels) * np.where(rng.random(channels) < 0.15, 0.01, 1)
            drift = np.linspace(0, 1, EPOCHS + 1)[:, None] if bn_trains else np.zeros((EPOCHS + 1, 1))
            g = bn.create_group(layer)
            append_rows(g, "gamma", (init + drift * (final - init)).astype(np.float32))
            append_rows(g, "beta", (drift * rng.normal(0, 0.1, channels)).astype(np.float32))
            constant = lambda row: np.repeat(row[None], EPOCHS + 1, 0).astype(np.float32)  # noqa: E731
            append_rows(g, "running_mean", constant(rng.normal(0, 1, channels)))
            append_rows(g, "running_var", constant(rng.uniform(0.5, 2, channels)))


def write_ablation(run_dir: Path, mode: str, rng: np.random.Generator) -> None:
    """ablation.h5 in the layout of bnprobe.analysis.ablate.write_ablation_h5."""
    values = np.linspace(0, 0.2, 20) if mode == "threshold" else np.linspace(0, 0.9, 19)
    fraction = np.clip(values * 2.5, 0, 1) if mode == "threshold" else values
    baseline = {"test_acc": 0.9, "train_acc": 0.97, "test_loss": 0.4, "train_loss": 0.1}
    acc = baseline["test_acc"] - 0.6 * fraction ** 2 + rng.normal(0, 0.003, len(values))
    with h5py.File(run_dir / f"ablation-{mode}.h5", "w") as f:
        set_attrs(f, {"format": ABLATION_FORMAT, "version": ABLATION_VERSION, "mode": mode, "per_layer": False,
                      "zero_beta": False, "total_channels": 1000, "checkpoint": str(run_dir / CHECKPOINT_FILE),
                      "label": run_dir.name, **{f"baseline_{k}": v for k, v in baseline.items()}})
        write_array(f, "values", values)
        write_array(f, "clamped", (fraction * 1000).astype(np.int64))
        write_array(f, "clamped_fraction", fraction)
        write_array(f, "test_acc", acc)
        write_array(f, "train_acc", acc + 0.05)
        write_array(f, "test_loss", 0.4 + fraction)
        write_array(f, "train_loss", 0.1 + fraction)


def make_runs(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    combos = [(m, fr, s) for s in range(max(1, -(-count // 25))) for m in MODELS for fr in BN_NET_FREEZE_MODES][:count]
    for i, (model, freeze, seed) in enumerate(combos):
        run_dir = root / f"{model}-cifar10-{freeze}-s{seed}"
        write_run(run_dir, model, freeze, seed, rng)
        if i % 5 == 0:
            write_ablation(run_dir, "threshold" if i % 10 == 0 else "fraction", rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--html", action="store_true", help="write HTML instead of PDF")
    parser.add_argument("--jobs", type=int, default=0, help="the report's worker processes (0 = one per core)")
    parser.add_argument("--keep", type=Path, help="make (or reuse) the runs here instead of a temporary folder")
    parser.add_argument("--against", metavar="REV", help="also time git revision REV's report, in turns with this one")
    parser.add_argument("--rounds", type=int, default=2, help="with --against: reports of each (default 2)")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes beside each report timed")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: report --keep's runs to this file
    args = parser.parse_args()

    if args.measure:
        measure(args.keep, args.measure, args.jobs)
        return
    with tempfile.TemporaryDirectory() as tmp:
        reference = checkout(args.against, Path(tmp) / "reference") if args.against else None
        root = args.keep or Path(tmp) / "runs"
        if not root.exists():
            started = time.perf_counter()
            make_runs(root, args.runs)
            print(f"wrote {args.runs} synthetic runs to {root} in {time.perf_counter() - started:.1f} s", flush=True)
        # The report in a process of its own, as `bnprobe report` runs: making the runs imported torch (the
        # checkpoints), which the report never does, and its memory would be counted as the report's.
        output = Path(tmp) / ("report.html" if args.html else "report.pdf")
        ours = [sys.executable, __file__, "--keep", str(root), "--measure", str(output), "--jobs", str(args.jobs)]
        if not args.against:
            with busy(args.busy):
                subprocess.run(ours, check=True)
            return
        theirs = [sys.executable, str(reference / "bench" / "report_speed.py"), "--runs", str(args.runs),
                  "--keep", str(Path(tmp) / "reference-runs")] + (["--html"] if args.html else [])
        walls: dict[str, list[float]] = {args.against: [], "this tree": []}
        for _ in range(max(1, args.rounds)):
            for name, command in ((args.against, theirs), ("this tree", ours)):
                print(f"--- {name}", flush=True)
                with busy(args.busy):
                    walls[name].append(wall_of(command))
        mine, old = (float(np.median(walls[k])) for k in ("this tree", args.against))
        beside = f" beside {args.busy} busy processes" if args.busy else ""
        print(f"{args.runs} runs to {output.suffix[1:].upper()}{beside}, median of {len(walls[args.against])} in turns: "
              f"{mine:.1f} s here against {old:.1f} s for {args.against}: {mine / old:.2f}x the time "
              f"(each: {', '.join(f'{k} ' + ' / '.join(f'{w:.1f}' for w in v) + ' s' for k, v in walls.items())})")


@contextmanager
def busy(count: int) -> Iterator[None]:
    """`count` processes spinning at full speed (at the report's own priority) while the body runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def checkout(revision: str, folder: Path) -> Path:
    """The tree of git revision `revision` of this repository, unpacked in `folder` (the repository untouched)."""
    repository = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repository), "archive", "--format=tar", revision], capture_output=True)
    if archive.returncode:
        said = archive.stderr.decode(errors="replace").strip().splitlines() or ["git failed"]
        sys.exit(f"report_speed.py: cannot take revision {revision!r} from {repository} ({said[-1]})")
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def wall_of(command: list[str]) -> float:
    """Run one report bench, showing its output; the wall time its last line gives."""
    result = subprocess.run(command, capture_output=True, text=True)
    print(result.stdout + result.stderr, end="", flush=True)
    times = re.findall(r"^report of .*?: ([\d.]+) s wall", result.stdout, re.MULTILINE)
    if result.returncode or not times:
        sys.exit(f"report_speed.py: {' '.join(command[1:2])} gave no time (exit {result.returncode})")
    return float(times[-1])


def measure(root: Path, output: Path, jobs: int) -> None:
    from bnprobe.reporting.render import write_report

    def cpu() -> float:  # this process and its finished workers: what the report costs on an idle machine
        return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF,
                   resource.RUSAGE_CHILDREN) for field in ("ru_utime", "ru_stime"))

    marks: list[tuple[str, float, float]] = []
    load = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), cpu()
    summary = write_report(root, output, jobs=jobs or None,
                           on_progress=lambda what: marks.append((what, time.perf_counter(), cpu())))
    wall, cpu_total = time.perf_counter() - started, cpu() - cpu_started
    previous = (started, cpu_started)
    for what, at, cpu_at in marks + [("wrote the " + output.suffix[1:].upper(), started + wall, cpu_started + cpu_total)]:
        print(f"  {at - previous[0]:6.1f} s wall {cpu_at - previous[1]:6.1f} s CPU  {what}")
        previous = (at, cpu_at)
    # Peak resident memory of the report's process and of its largest figure worker: runs come back from the
    # workers with their figure and a few numbers, not their arrays.
    # (ru_maxrss of this process would carry its parent's across fork and exec; VmHWM is this program's own.)
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    own = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"  peak memory: {f'{own:.0f} MiB' if own else 'unknown (no /proc)'} the report, {workers:.0f} MiB its "
          f"largest worker{' (torch was imported!)' if 'torch' in sys.modules else ''}")
    pages = f", {summary.pages} pages" if summary.pages else ""
    print(f"report of {summary.runs} runs ({summary.ablations} ablations{pages}, "
          f"{output.stat().st_size / 1e6:.1f} MB): {wall:.1f} s wall, {cpu_total:.1f} s CPU "
          f"(load average {load:.1f} on {os.cpu_count()} cores at the start); target for 50 runs to PDF: < 10 s "
          f"where 67b3346 took 14.6 s (time both: --against 67b3346)")


if __name__ == "__main__":
    main()
