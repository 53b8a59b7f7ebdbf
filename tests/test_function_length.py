"""No function in bnprobe/ longer than 80 lines (issue 31): one that does more than one thing (validate, compute,
write, print) is split where it reads as steps. Measured with ast, from `def` (decorators not counted) to the last
line of its body, docstring and comments included; nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnprobe"
MAX_LINES = 80

# Today's longer functions, each with its length when listed and why it still is. This list may only shrink: a
# function split below the limit (or gone) must leave it, which the last test enforces; none may join it.
ALLOWED: dict[str, tuple[int, str]] = {}  # "path/in/bnprobe.py:function": (its lines when listed, "why")


def function_lengths() -> dict[str, int]:
    """`path/inside/bnprobe.py:Class.function` -> lines, for every function and method (nested ones too)."""
    found = {}

    def visit(node: ast.AST, prefix: str, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found[f"{where}:{name}"] = child.end_lineno - child.lineno + 1
                visit(child, name + ".", where)
            else:
                visit(child, prefix, where)

    for path in sorted(PACKAGE.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), "", path.relative_to(PACKAGE).as_posix())
    return found


def test_the_measure_counts_def_to_last_line():
    tree = ast.parse("def f():\n    '''doc'''\n\n    return 1\n\n\nclass C:\n    def g(self):\n        pass\n")
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef)}
    assert lengths == {"f": 4, "g": 2}
    assert len(function_lengths()) > 500  # every module was read, methods and nested functions too


def test_no_function_is_longer_than_80_lines():
    long = {name: lines for name, lines in function_lengths().items() if lines > MAX_LINES and name not in ALLOWED}
    assert not long, "\n".join(f"{name}: {lines} lines (at most {MAX_LINES}: split it)"
                               for name, lines in sorted(long.items()))


def test_the_allow_list_only_shrinks():
    """Each allowed function still exists and is still too long (else it leaves the list), and grew no longer."""
    lengths = function_lengths()
    stale = [name for name in ALLOWED if lengths.get(name, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove from ALLOWED: {', '.join(stale)}"
    grown = [f"{name}: {lengths[name]} lines, listed at {listed}" for name, (listed, _) in ALLOWED.items()
             if lengths[name] > listed]
    assert not grown, "longer than when it was allowed:\n" + "\n".join(grown)
