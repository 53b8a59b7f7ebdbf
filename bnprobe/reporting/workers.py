"""The report's worker processes: runs are read and their figures drawn in a pool of forked processes, started
only for task lists long enough to pay for them, stopped at once when the report is interrupted (Ctrl-C, TERM),
and ended with the report's process however it ends."""

from __future__ import annotations

import os
import signal
import sys
import threading
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
                                               initializer=_worker_start, initargs=(os.getpid(),))
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


def _worker_start(parent: int) -> None:
    """In each pool worker: end with the report's process, however that ends (kill -9 too), instead of staying
    behind blocked on a pipe. Ctrl-C and TERM are the parent's to handle: it stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits _stop_on_sigterm's handler
    # Below the report's own process: while workers draw figures it lays out the PDF, and that is what the
    # report waits for; the workers take the cycles it leaves.
    os.nice(10)
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


