"""The house as docs/design.md draws it: packages by floor, every import going down, no cycle, no module over 600
lines, and a torch-free base. Read from the source with ast (nothing is imported), as ../shared/tools/import-graph
reads it."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bnprobe"
MAX_LINES = 600


def floors() -> dict[str, int]:
    """Package (or module) name -> floor, from the first two columns of docs/design.md's layout table."""
    text = (ROOT / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `bnprobe/([\w.]+?)/?` \|", text, re.M)
    return {name.removesuffix(".py"): int(floor) for floor, name in rows}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The bnprobe modules `path` imports, anywhere in it (a function-level import counts as much as any)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("bnprobe"):
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a package's face and its own modules are not edges (import-graph's rule)."""
    known = modules()
    edges = {}
    for name, path in known.items():
        edges[name] = {target for target in imports(path, set(known))
                       if target != name and not target.startswith(name + ".") and not name.startswith(target + ".")}
    return edges


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_layout_table_names_every_package():
    table = floors()
    packages = {package_of(m) for m in modules()} - {""}
    assert packages - {"__main__"} == set(table), "docs/design.md's layout table and bnprobe/ differ"


def test_every_import_goes_down_a_floor():
    table = {**floors(), "__main__": max(floors().values()) + 1}
    wrong = []
    for module, targets in graph().items():
        source = package_of(module)
        for target in targets:
            into = package_of(target)
            if source and into and source != into and table[into] >= table[source]:
                wrong.append(f"{module} (floor {table[source]}) imports {target} (floor {table[into]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_no_module_over_600_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_base_and_the_report_never_import_torch_at_the_top():
    """core/ is torch-free wherever it is imported; reporting/ only loads torch for runs from before telemetry,
    inside the function that reads them (a report of hundreds of runs starts no torch)."""
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        nodes = list(ast.walk(tree)) if package_of(name) == "core" else tree.body if package_of(name) == "reporting" else []
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                named = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("torch", "torchvision") for n in named), f"{name} imports torch"
                targets = imports(path, set(modules())) if package_of(name) == "core" else set()
                assert all(package_of(t) in ("core", "") for t in targets), f"{name} imports {targets}"
