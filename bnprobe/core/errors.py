"""The one exception type the CLI turns into a one-line message, the one way to quote another exception, and
the one way to print a name read from a file."""

from __future__ import annotations

from typing import Sequence


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


def printable(text: str) -> str:
    """`text` (a name from a file: a tensor, a layer, a run, a setting) safe to print on a terminal: each character
    that is not printable (ESC of an escape sequence, a newline, a bidi override) as a repr writes it (\\x1b,
    \\n, \\u202e), so no file can recolour the terminal, move its cursor or split a one-line message."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)


def listing(names: Sequence[str], limit: int = 4) -> str:
    """`a, b, c, d, ... (6 more)`: a few of many names, for a one-line message."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
