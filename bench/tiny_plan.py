"""A tiny copy of a sweep plan, for rehearsing a GPU script on a CPU (bench/gpu_study.sh's GPU_STUDY_TINY=1):

    python bench/tiny_plan.py examples/gpu-study.toml OUT.toml

The same tables and grids, in the same order, with every run cut down: 1 epoch of a few hundred images on the CPU,
the first seed and the first two models of each grid, and the clamp sweep on a few hundred images. Every other
setting stays as the plan has it, so `bnprobe sweep` checks the real plan's settings while it runs the tiny one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

TINY_DEFAULTS = {"epochs": 1, "milestones": "", "subset": 256, "test_subset": 200, "train_eval_subset": 100,
                 "device": "cpu"}
TINY_ABLATE = {"test_subset": 200, "train_subset": 100}


def tiny(plan: dict[str, Any]) -> dict[str, Any]:
    """`plan` cut down as the module's docstring says."""
    out = {"defaults": {**plan.get("defaults", {}), **TINY_DEFAULTS}}
    if "ablate" in plan:
        out["ablate"] = {**plan["ablate"], **TINY_ABLATE}
    grids = plan.get("grid", [])
    out["grid"] = []
    for grid in grids if isinstance(grids, list) else [grids]:
        grid = dict(grid)
        for key in ("seed", "seeds"):
            if isinstance(grid.get(key), list):
                grid[key] = grid[key][:1]
        if isinstance(grid.get("model"), list):
            grid["model"] = grid["model"][:2]
        out["grid"].append(grid)
    if isinstance(out["defaults"].get("seeds"), list):
        out["defaults"]["seeds"] = out["defaults"]["seeds"][:1]
    return out


def value(v: Any) -> str:
    """A TOML value of the kinds plans hold: text, numbers, booleans and lists of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise ValueError(f"cannot write {v!r} as a plan value")


def to_toml(plan: dict[str, Any]) -> str:
    lines = []
    for table in ("ablate", "defaults"):
        if table in plan:
            lines += [f"[{table}]", *(f"{k} = {value(v)}" for k, v in plan[table].items()), ""]
    for grid in plan["grid"]:
        lines += ["[[grid]]", *(f"{k} = {value(v)}" for k, v in grid.items()), ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.write_text(to_toml(tiny(tomllib.loads(args.plan.read_text()))))


if __name__ == "__main__":
    main(sys.argv[1:])
