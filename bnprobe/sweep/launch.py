"""Running a plan: every run that is not done, trained (and, with the plan's [ablate], its small γ clamped) in this
process one after another, or in worker processes (`--devices`, `--per-device`), or submitted as one Slurm job
array through submitit (`--launcher slurm`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from rich.console import Console
from rich.markup import escape

from bnprobe.analysis.ablate import run_ablation
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, first_line, printable
from bnprobe.core.options import AblateOptions, LoadOptions
from bnprobe.files.lock import locked
from bnprobe.sweep.ablation_job import ablation_file, ablation_from_job, ablation_to_job
from bnprobe.sweep.budget import NOT_STARTED, TimeBudget
from bnprobe.sweep.plan import PlannedRun
from bnprobe.training.train import train

MAX_PER_DEVICE = 64  # processes per device: beyond this, memory and context switches, not the GPU, decide


def check_per_device(per_device: int) -> None:
    if not 1 <= per_device <= MAX_PER_DEVICE:
        raise BnprobeError(f"--per-device must be between 1 and {MAX_PER_DEVICE}, got {per_device}")


def run_sweep(
    planned: list[PlannedRun], console: Console, devices: Optional[list[str]] = None, per_device: int = 1,
    budget: Optional[TimeBudget] = None, estimates: Optional[dict[Path, float]] = None,
) -> dict[str, str]:
    """Train every run that is not done: one at a time in this process, or in worker processes, `per_device`
    at once on each device (default: each run's own), a new one starting as soon as one finishes. With `budget`,
    a run starts only while it is expected to end within it (`estimates`: each run's seconds still to train, by
    run directory); the first that is not, and every run after it, is left NOT_STARTED."""
    check_per_device(per_device)
    todo = [run for run in planned if run.todo()]
    console.print(f"{len(planned) - len(todo)} of {len(planned)} runs already done; {len(todo)} to "
                  f"{'train or ablate' if any(run.ablation for run in planned) else 'train'}.")
    outcome = {run.run_dir.name: "done" for run in planned if run not in todo}
    estimates = estimates or {}

    def out_of_time(run: PlannedRun, queue: list[PlannedRun]) -> bool:
        """Whether the budget stops the sweep before `run`; if so, `run` and `queue` (the runs after it) are
        marked not started."""
        estimate = estimates.get(run.run_dir, 0.0)
        if budget is None or budget.fits(estimate):
            return False
        console.print(f"[yellow]time budget: {max(budget.left(), 0):.0f} s left, {escape(run.run_dir.name)} expected to "
                      f"take {budget.expected(estimate):.0f} s; {1 + len(queue)} runs left for a later sweep",
                      soft_wrap=True)
        for left in (run, *queue):
            outcome[left.run_dir.name] = NOT_STARTED
        return True

    # A slot is one worker process at a time; None: the run's own device.
    slots: list[Optional[str]] = [device for device in (devices or [None]) for _ in range(per_device)]
    if len(slots) == 1:
        for i, run in enumerate(todo, 1):
            if out_of_time(run, todo[i:]):
                break
            config = dataclasses.replace(run.config, device=devices[0]) if devices else run.config
            console.rule(f"run {i}/{len(todo)}: {run.run_dir.name}")
            started = time.monotonic()
            try:
                run_job(config, run.run_dir, run.ablation, console)
                outcome[run.run_dir.name] = "done"
                if budget is not None:
                    budget.finished(estimates.get(run.run_dir, 0.0), time.monotonic() - started)
            except BnprobeError as exc:  # one failed run does not stop the sweep
                console.print(f"[red]{escape(run.run_dir.name)} failed: {escape(printable(str(exc)))}", soft_wrap=True)
                outcome[run.run_dir.name] = f"failed: {exc}"
        return outcome
    # Worker processes, each pinned with CUDA_VISIBLE_DEVICES to its slot's GPU, pulling runs as slots free up.
    queue, active = list(todo), {}
    try:
        _run_slots(queue, active, slots, outcome, console, out_of_time, budget, estimates)
    except BaseException:  # Ctrl-C or TERM (bnprobe.cli makes it one): the runs stop too, resumable as after a kill
        for _, process, log, _ in active.values():
            process.terminate()
            process.wait()
            log.close()
        raise
    return outcome


def _run_slots(queue: list[PlannedRun], active: dict, slots: list[Optional[str]], outcome: dict[str, str],
               console: Console, out_of_time: Callable[[PlannedRun, list[PlannedRun]], bool],
               budget: Optional[TimeBudget], estimates: dict[Path, float]) -> None:
    """Start the queued runs as slots free up (while `out_of_time` lets the next one start), until every run has
    ended; `active` maps a slot to its (run, process, log, start time)."""
    while queue or active:
        for slot, device in enumerate(slots):
            if slot not in active and queue:
                run = queue.pop(0)
                if out_of_time(run, queue):
                    queue = []
                    break
                env, config = dict(os.environ), run.config
                if device is not None:
                    if device.startswith("cuda:"):
                        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
                    config = dataclasses.replace(config, device="cuda" if device.startswith("cuda") else device)
                run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                log = open(run.run_dir.parent / f"{run.run_dir.name}.log", "w")
                command = [sys.executable, "-m", "bnprobe.sweep.launch", json.dumps(config.to_dict()), str(run.run_dir),
                           json.dumps(ablation_to_job(run.ablation))]
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                active[slot] = (run, process, log, time.monotonic())
                console.print(f"started {escape(run.run_dir.name)} on {device or config.device}", soft_wrap=True)
        for slot, (run, process, log, started) in list(active.items()):
            if process.poll() is not None:
                log.close()
                outcome[run.run_dir.name] = "done" if process.returncode == 0 else f"failed (exit {process.returncode})"
                if budget is not None and process.returncode == 0:
                    budget.finished(estimates.get(run.run_dir, 0.0), time.monotonic() - started)
                where = slots[slot] or run.config.device
                console.print(f"{escape(run.run_dir.name)} on {where}: {escape(str(outcome[run.run_dir.name]))}",
                              soft_wrap=True)
                del active[slot]
        if active:
            time.sleep(0.5)


def run_job(config: TrainConfig, run_dir: Path, ablation: Optional[AblateOptions] = None,
            console: Optional[Console] = None) -> None:
    """One run of a plan: trained (resumed from what an earlier attempt left), then, with the plan's [ablate],
    its small γ clamped into its ablation file unless that exists."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train(config, run_dir, resume=True, console=console)
    if ablation is not None:
        out = ablation_file(run_dir, ablation)
        with locked(out, str(out)):
            if not out.exists():  # checked under the lock: another worker may have written it meanwhile
                run_ablation(run_dir, LoadOptions(device=config.device), ablation, out=out, console=console)


def train_job(config_dict: dict[str, Any], run_dir: str, ablation: Optional[dict[str, Any]] = None) -> str:
    """One run as a job of a cluster array or a local worker (pickled by submitit, or given as JSON): resumes
    what a previous job left."""
    run_job(TrainConfig.from_dict(config_dict, "the run's settings"), Path(run_dir),
            ablation_from_job(ablation))
    return run_dir


def submit_sweep(
    planned: list[PlannedRun], folder: Path, cluster: Optional[str] = None, **parameters: Any
) -> list[Any]:
    """Submit every run that is not done as one job array through submitit (Slurm, or `cluster="local"`)."""
    try:
        import submitit
    except ImportError:
        raise BnprobeError("--launcher slurm needs submitit: pip install 'bnprobe[slurm]'")
    todo = [run for run in planned if run.todo()]
    if not todo:
        return []
    try:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
        return executor.map_array(train_job, [r.config.to_dict() for r in todo], [str(r.run_dir) for r in todo],
                                  [ablation_to_job(r.ablation) for r in todo])
    except Exception as exc:  # sbatch missing or refusing: say it in one line
        raise BnprobeError(f"submitting {len(todo)} jobs failed: {first_line(exc)}")


def _worker(config_json: str, run_dir: str, ablation_json: str = "null") -> None:
    """Entry point of one parallel local worker (`python -m bnprobe.sweep.launch CONFIG_JSON RUN_DIR ABLATE_JSON`)."""
    try:
        train_job(json.loads(config_json), run_dir, json.loads(ablation_json))
    except BnprobeError as exc:
        print(f"bnprobe: error: {printable(str(exc))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])


