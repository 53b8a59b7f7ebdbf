"""The one exception type the CLI turns into a one-line message, the one way to quote another exception, and
the one way to print a name read from a file or a number of any size."""

from __future__ import annotations

import os
from typing import Any, Sequence


class BnprobeError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def first_line(exc: BaseException, typed: bool = False, limit: int = 300) -> str:
    """The first line of exc's message (at most `limit` characters), or its type name when it has none;
    typed: "TypeName: line", for errors from code that is not ours (the type says what kind of failure)."""
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    if typed or not line:
        return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line


def printable(text: str, limit: int = 1000) -> str:
    """`text` (a name from a file: a tensor, a layer, a run, a setting) safe to print on a terminal: each character
    that is not printable (ESC of an escape sequence, a newline, a bidi override) as a repr writes it (\\x1b,
    \\n, \\u202e), so no file can recolour the terminal, move its cursor or split a one-line message; and
    past `limit` characters shortened, its length said (a file may name a shard in 60 MB)."""
    if len(text) > limit:
        text = f"{text[:limit - 40]}... ({len(text):,} characters)"
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


# The longest file name (one part of a path) and path Linux takes, in bytes; past them every call on the path
# fails with "File name too long".
NAME_MAX = 255
PATH_MAX = 4096


def check_path_length(path: Any) -> None:
    """A path given or read from a file that no file system could hold is one line naming it (shortened), before
    any call on it raises OSError(ENAMETOOLONG)."""
    text = os.fsencode(path)
    longest = max((len(part) for part in text.split(b"/")), default=0)
    if longest > NAME_MAX:
        raise BnprobeError(f"{printable(os.fsdecode(path), limit=120)}: a file name of {longest:,} bytes, longer than "
                           f"the {NAME_MAX} bytes a file name can have")
    if len(text) > PATH_MAX:
        raise BnprobeError(f"{printable(os.fsdecode(path), limit=120)}: a path of {len(text):,} bytes, longer than the "
                           f"{PATH_MAX:,} bytes a path can have")


def int_text(value: int, grouped: bool = True) -> str:
    """An integer for a message: with thousands separators (grouped), or its size where it is too long to print
    (Python refuses to print one of more than 4,300 digits)."""
    if abs(value) < 10**30:
        return f"{value:,}" if grouped else str(value)
    return f"a {value.bit_length()}-bit number"


def check_int(flag: str, value: int, low: int, high: int) -> None:
    """An integer option within [low, high], else one line naming `flag`."""
    if value < low:
        raise BnprobeError(f"{flag} must be >= {low}, got {int_text(value, grouped=False)}")
    if value > high:
        raise BnprobeError(f"{flag} must be at most {high:,}, got {int_text(value)}")


def listing(names: Sequence[str], limit: int = 4) -> str:
    """`a, b, c, d, ... (6 more)`: a few of many names, for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
