"""The one exception type the CLI turns into a one-line message, and the one way to quote another exception."""


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
