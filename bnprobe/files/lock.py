"""One writer at a time: a run directory (train) or an output file (probe, ablate, report) is locked by the
process that writes it, and a second process is refused with one line naming the holder's pid.

The lock is `fcntl.flock` on a hidden file beside what it guards (`.NAME.lock`), holding the holder's pid.
The kernel releases it when the process ends however it ends (kill -9 too), so a lock is never left stuck;
the file is removed on a clean exit, and one a killed process leaves is harmless. No torch import."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from bnprobe.core.errors import BnprobeError


def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


@contextmanager
def locked(target: Path, what: str) -> Iterator[None]:
    """Hold `target`'s lock for the body; `what` names the target in the one-line errors."""
    # Spelled without `..` (newdir/../x): making the lock's folder must not make a folder the path only passes.
    path = lock_path(Path(os.path.normpath(target)))
    # Folders made only to hold the lock are removed again when still empty: a refused command leaves no trace.
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BnprobeError(f"cannot write {what} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise BnprobeError(f"{what} is being written by {who} (another bnprobe command); "
                               f"try again when it has finished") from None
        # A holder that just finished removed the file we opened: ours is then no lock anyone else sees.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            break
        os.close(fd)
    try:
        with suppress(OSError):  # the pid only improves the message a second process gives
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no one locks the file on its way out
        os.close(fd)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
