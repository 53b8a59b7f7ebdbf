"""`sweep --time-budget SECONDS`: runs start in plan order while the next one is expected to end within the budget;
the first that is not stops the sweep cleanly between runs, and the runs left stay for a later sweep.

A run's expected time is its estimate (the plan table's time column: measured with --calibrate, else FLOPs at
--tflops), for the epochs it has left, times a ratio learnt as the sweep goes: what its finished runs took over
their estimates (training steps alone are estimated; evaluation, checkpoints and the clamp sweep are not). Before
any run has finished the ratio is `prior`: the runs sharing a device (--per-device), since they split it. The
budget counts from the start of the command, the plan's calibration included, so that it matches a `timeout`
wrapped around the command.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from bnprobe.core.errors import BnprobeError

NOT_STARTED = "not started (time budget)"  # a run's outcome when the budget stopped the sweep before it


def check_budget(seconds: float) -> None:
    if not (math.isfinite(seconds) and seconds > 0):
        raise BnprobeError(f"--time-budget must be > 0 seconds (a finite number), got {seconds:g}")


@dataclass
class TimeBudget:
    seconds: float
    started: float = field(default_factory=time.monotonic)  # time.monotonic() at the command's start
    prior: float = 1.0  # expected / estimated before any run has finished
    estimated: float = 0.0  # the estimates of the runs finished so far ...
    took: float = 0.0  # ... and the seconds they took

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def ratio(self) -> float:
        return self.took / self.estimated if self.estimated > 0 else self.prior

    def expected(self, estimate: float) -> float:
        return estimate * self.ratio()

    def fits(self, estimate: float) -> bool:
        return self.left() > 0 and self.expected(estimate) <= self.left()

    def finished(self, estimate: float, seconds: float) -> None:
        """A run estimated at `estimate` took `seconds` (training and its clamp sweep)."""
        if estimate > 0:  # a run with only its ablation left teaches nothing about training times
            self.estimated += estimate
            self.took += seconds


def fitting_prefix(estimates: list[float], seconds: float) -> int:
    """How many runs, in order, fit into `seconds` by their estimates alone (what a dry run can say)."""
    total = 0.0
    for count, estimate in enumerate(estimates):
        total += estimate
        if total > seconds:
            return count
    return len(estimates)
