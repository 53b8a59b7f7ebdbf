"""The report's worker processes: runs are read and their figures drawn in a pool of forked processes, started
only for task lists long enough to pay for them, stopped at once when the report is interrupted (Ctrl-C, TERM),
and ended with the report's process however it ends."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

FEW = 4  # fewer tasks than this are worked through in the report's own process: quicker than in workers
# Worker processes (each a Python with numpy and matplotlib, started at once for a large report): more than
# this is a typo, not a machine.
MAX_JOBS = 1024


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Workers:
    """Up to `jobs` worker processes for reading runs and drawing their figures, started at the first task list
    long enough to pay for them (one per task at most); shorter lists are worked through in this process."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.started: Optional[Executor] = None

    def executor(self, tasks: int) -> Optional[Executor]:
        """The processes for a list of `tasks` tasks (started now if need be), or None: work here."""
        if self.jobs <= 1 or tasks < FEW:
            return None
        if self.started is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork on Linux: the workers start at once with everything imported. Elsewhere the platform's default
            # (macOS system libraries are not fork-safe).
            method = "fork" if sys.platform.startswith("linux") else None
            self.started = ProcessPoolExecutor(min(self.jobs, tasks), mp_context=multiprocessing.get_context(method),
                                               initializer=_worker_start, initargs=(os.getpid(), worker_niceness()))
        return self.started

    def map(self, function: Callable, tasks: list) -> list:
        """`map`, in order: in the processes one task at a time (runs differ in size, workers stay busy), or here."""
        executor = self.executor(len(tasks))
        return list(executor.map(function, tasks)) if executor else [function(task) for task in tasks]


@contextmanager
def workers(jobs: int) -> Iterator[Workers]:
    """Workers(jobs), stopped when done; interrupted (Ctrl-C, TERM, an error), they stop at once, not after the
    queued tasks."""
    pool = Workers(jobs)
    try:
        yield pool
    except BaseException:
        if pool.started is not None:
            pool.started.shutdown(wait=False, cancel_futures=True)
            for process in list((pool.started._processes or {}).values()):
                process.terminate()
        raise
    else:
        if pool.started is not None:
            pool.started.shutdown(wait=True)


# On a machine nothing else keeps busy, workers run below the report's own process: while they draw figures it
# lays out the PDF, and that is what the report waits for (50 runs to PDF: 0.66x the time of 67b3346, against
# 0.77x at equal priority). Beside a busy process (a training run) they would starve at that niceness (2.4x the
# time of 67b3346 beside two busy loops), so there they keep the report's priority (0.78x): bench/report_speed.py
# --busy N measures both.
QUIET_NICENESS = 10
QUIET_PROBE_S = 0.1  # how long the machine's idle time is watched before the workers start


def worker_niceness(ticks: Callable[[], tuple[int, int]] = lambda: cpu_ticks()) -> int:
    """QUIET_NICENESS when other processes keep less than half a core busy (`ticks` read QUIET_PROBE_S apart,
    while this process waits), else 0; 0 where the machine's ticks cannot be read."""
    try:
        idle_before, total_before = ticks()
        time.sleep(QUIET_PROBE_S)
        idle_after, total_after = ticks()
    except (OSError, ValueError, IndexError):
        return 0
    busy = 1 - (idle_after - idle_before) / max(1, total_after - total_before)  # of every core together
    return QUIET_NICENESS if busy * default_jobs() < 0.5 else 0


def cpu_ticks() -> tuple[int, int]:
    """(idle, total) clock ticks of every core since boot, from Linux's /proc/stat (idle + iowait; user .. steal)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks[:8])


def _worker_start(parent: int, niceness: int) -> None:
    """In each pool worker: end with the report's process, however that ends (kill -9 too), instead of staying
    behind blocked on a pipe. Ctrl-C and TERM are the parent's to handle: it stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits stop_on_sigterm's handler
    os.nice(niceness)  # see worker_niceness
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: killed when the parent ends
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os._exit(1)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """TERM (`kill`, a scheduler's time limit) ends the report as Ctrl-C does: by unwinding, so the temporary
    output file is removed and the pool's workers are stopped, instead of dying on the spot."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    received = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:  # raised where Python ignores exceptions (an at-fork hook, a __del__): stop here instead
        raise KeyboardInterrupt


