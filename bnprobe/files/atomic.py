"""Replace files atomically: write beside the target under a temporary name, then rename over it, so a
crash at any moment leaves the previous complete file. No torch import: the report uses it too."""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from bnprobe.core.errors import BnprobeError


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`, on failure removed."""
    path = Path(path)
    try:
        if path.is_dir():  # is_dir raises for a name too long for the file system, or a symlink loop
            raise BnprobeError(f"cannot write {path}: it is a directory (name a file)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise BnprobeError(f"cannot write {path} ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        try:
            yield Path(tmp)
        except Exception as exc:
            if _disk_full(exc):  # the old file stays; this temporary one is removed below
                raise BnprobeError(f"cannot write {path}: no space left on device") from None
            raise
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the usual permissions
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise BnprobeError(f"cannot write {path} ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _disk_full(exc: Optional[BaseException]) -> bool:
    """Whether a full disk (or quota) caused `exc`: torch.save, for one, raises its own error on top of it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)` to a temporary file, fsync, then rename it over `path`."""
    with replacing(path) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
