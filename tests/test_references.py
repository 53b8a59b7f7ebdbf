"""Comments that keep their word: every dotted `bnprobe.*` name that a comment or a docstring of bnprobe/, or
pyproject.toml, speaks of must still exist. The module part is imported and the rest looked up with getattr, so a
name that moved or was renamed fails here, listed, instead of sending a reader to nothing."""

import ast
import importlib
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bnprobe.x.y, not tool.bnprobe.check (pyproject's table) nor bnprobe.cli:main's colon part; a name may end a
# sentence, so a trailing dot is not part of it.
DOTTED = re.compile(r"(?<![\w.\-/])bnprobe(?:\.[A-Za-z_]\w*)+")
# Dead names let through for now, each with why (none: every dotted name resolves).
ALLOWED: set[str] = set()


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    text = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    return found


def references() -> dict[str, list[str]]:
    """Dotted name -> where it is written (path:line)."""
    places = [(path, prose(path)) for path in sorted((ROOT / "bnprobe").rglob("*.py"))]
    places.append((ROOT / "pyproject.toml", list(enumerate((ROOT / "pyproject.toml").read_text().splitlines(), 1))))
    found: dict[str, list[str]] = {}
    for path, texts in places:
        for line, text in texts:
            for name in DOTTED.findall(text):
                found.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


def resolves(name: str) -> bool:
    """Whether the longest importable prefix of `name` is a module whose attributes hold the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            target = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and not module.startswith(exc.name):  # the module exists; something it imports does not
                raise
            continue
        for attribute in parts[cut:]:
            if attribute in getattr(target, "__dataclass_fields__", {}) and not hasattr(target, attribute):
                return True  # a dataclass field without a class-level default: it exists on every instance
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def test_every_dotted_bnprobe_name_in_comments_docstrings_and_pyproject_resolves():
    found = references()
    assert len(found) > 50, "the scan finds the names it is meant to check"
    dead = {name: where for name, where in found.items() if name not in ALLOWED and not resolves(name)}
    assert not dead, "names that no longer resolve:\n" + "\n".join(
        f"{name}  ({', '.join(where)})" for name, where in sorted(dead.items()))


def test_the_allow_list_holds_only_dead_names_still_written():
    """An allowed name that resolves again, or that no file writes any more, leaves the allow-list."""
    found = references()
    assert not {name for name in ALLOWED if name not in found or resolves(name)}


def test_a_dead_name_is_caught():
    assert resolves("bnprobe.core.formats.PROBE_FORMAT") and resolves("bnprobe.core.config.TrainConfig.run_name")
    assert resolves("bnprobe.core.options.AblateOptions.values")  # a field with a default_factory
    assert not resolves("bnprobe.report.find_templates") and not resolves("bnprobe.core.formats.NO_SUCH_NAME")
