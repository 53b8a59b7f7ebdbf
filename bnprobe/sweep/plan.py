"""`bnprobe sweep PLAN.toml`: a grid of training runs, resumable, finished runs skipped.

A plan is TOML. `[defaults]` holds TrainConfig fields shared by every run; each `[[grid]]` table maps
fields to a value or a list of values, and adds every combination of its lists (merged over the
defaults). `seeds = [0, 1, 2]` (in [defaults] or a [[grid]]) repeats each run once per seed, each its own
run. Runs are named by `TrainConfig.run_name()`, so a rerun of the same plan finds its runs:
finished ones are skipped, interrupted ones resume from their last checkpoint.

An `[ablate]` table clamps small γ of every run once it has trained, as `bnprobe ablate RUN` would, into the run's
ablation.h5: `clamp_gamma = "0:0.2:11"` (or `clamp_fraction`, the same syntax) plus `bnprobe ablate`'s options
spelled with underscores (`test_subset`, `train_subset`, `per_layer`, `zero_beta`, `batch_size`, `fold`, `train`).
A run whose ablation file exists is not ablated again.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import tomllib

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError, check_int, int_text, printable
from bnprobe.core.formats import ABLATION_FILES
from bnprobe.core.options import AblateOptions, parse_sweep
from bnprobe.files import runs
from bnprobe.files.checkpoints import load_checkpoint
from bnprobe.nets.check import check_model

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass
class PlannedRun:
    config: TrainConfig
    run_dir: Path
    ablation: Optional[AblateOptions] = None  # the plan's [ablate]: clamp γ once the run has trained

    @property
    def ablation_file(self) -> Optional[Path]:
        return self.run_dir / ABLATION_FILES[self.ablation.mode] if self.ablation else None

    def progress(self) -> str:
        """status(), and whether the plan's ablation of the run is still to do."""
        status = self.status()
        return f"{status}; ablate" if self.ablation and not self.ablation_file.exists() else status

    def todo(self) -> bool:
        """Whether anything of this run is left to do: training, or its ablation."""
        return self.progress() != "done"

    def status(self) -> str:
        """new, done, or `partial (k/N)` from what is on disk."""
        epoch = self.epochs_done()
        if epoch is None:
            return "unreadable"
        if epoch == 0 and not runs.checkpoint_path(self.run_dir).exists():
            return "new"
        return "done" if epoch >= self.config.epochs else f"partial ({epoch}/{self.config.epochs})"

    def epochs_done(self) -> Optional[int]:
        """The epochs its checkpoint holds (0 without one); None when the checkpoint cannot be read."""
        path = runs.checkpoint_path(self.run_dir)
        if not path.exists():
            return 0
        try:
            epoch = load_checkpoint(path).get("epoch")
        except BnprobeError:
            return None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return None
        return epoch


# A grid is a product: two lists of 1,000 make a million runs, which takes hours to even plan. Beyond this
# many, --max-runs must say that it is meant; beyond MAX_RUNS_LIMIT not even then (each run is checked and
# listed before the first trains: 100,000 take about a minute to plan).
MAX_RUNS = 10_000
MAX_RUNS_LIMIT = 100_000
# A plan lists settings: 10,000 runs' seeds fit in 60 KB. A larger file is not a plan (and parsing 7 MB of TOML
# took seconds before a word was said).
MAX_PLAN_BYTES = 1 << 20


def read_plan_text(path: Path) -> str:
    """The text of a plan file: a regular file of at most MAX_PLAN_BYTES, UTF-8."""
    path = Path(path)
    try:
        if not path.exists():
            raise BnprobeError(f"no plan file at {printable(str(path))}")
        if not path.is_file():
            raise BnprobeError(f"{printable(str(path))} is not a plan file (not a regular file)")
        with open(path, "rb") as file:
            data = file.read(MAX_PLAN_BYTES + 1)
    except OSError as exc:
        raise BnprobeError(f"cannot read {printable(str(path))} ({exc.strerror or exc})")
    if len(data) > MAX_PLAN_BYTES:
        raise BnprobeError(f"{printable(str(path))} is larger than a plan's limit of {MAX_PLAN_BYTES:,} bytes "
                           f"(a plan lists settings; a list of values is a range of a few lines)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BnprobeError(f"{printable(str(path))} is not valid TOML ({exc})")


def read_plan(path: Path, runs_dir: Path, max_runs: int = MAX_RUNS) -> list[PlannedRun]:
    check_int("--max-runs", max_runs, 1, MAX_RUNS_LIMIT)
    text = read_plan_text(path)
    try:
        plan = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BnprobeError(f"{printable(str(path))} is not valid TOML ({exc})")
    except RecursionError:  # a = [[[[...]]]] nested past Python's stack
        raise BnprobeError(f"{printable(str(path))} is not valid TOML (nested too deeply)")
    except ValueError:  # Python reads no integer of more than 4,300 digits
        raise BnprobeError(f"{printable(str(path))} is not valid TOML (a number of more than 4,300 digits)")
    unknown_tables = sorted(set(plan) - {"defaults", "grid", "ablate"})
    if unknown_tables:
        raise BnprobeError(f"{path}: unknown tables {', '.join(unknown_tables)} (a plan has [defaults], [[grid]] "
                           f"and [ablate])")
    ablation = read_ablation(plan["ablate"], path) if "ablate" in plan else None
    defaults = plan.get("defaults", {})
    grids = plan.get("grid", [])
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(defaults, dict) or not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise BnprobeError(f"{path}: [defaults] and each [[grid]] must be tables of settings (name = value)")
    if not grids:
        raise BnprobeError(f"{path} has no [[grid]] table, so no runs")
    defaults = dict(defaults)
    default_seeds = _seeds(defaults, path, "[defaults]")
    grids = [dict(grid) for grid in grids]
    for i, grid in enumerate(grids, 1):
        seeds = _seeds(grid, path, f"grid {i}")
        if seeds is not None or (default_seeds is not None and "seed" not in grid):
            grid["seed"] = seeds if seeds is not None else default_seeds  # an axis: each seed its own run
        for table, name in ((defaults, "[defaults]"), (grid, f"grid {i}")):
            bad = sorted(set(table) - FIELDS)
            if bad:
                raise BnprobeError(f"{path} {name}: unknown settings {', '.join(bad)}; see `bnprobe train --help`")
    axes = [{k: v if isinstance(v, list) else [v] for k, v in grid.items()} for grid in grids]
    # Counted from the lists' lengths before any value is checked or any run built: a million seeds are
    # refused at once.
    combinations = sum(math.prod(len(values) for values in grid.values()) for grid in axes)
    if combinations > max_runs:
        hint = (f"pass --max-runs {combinations} if that many is meant" if combinations <= MAX_RUNS_LIMIT
                else f"at most {MAX_RUNS_LIMIT:,} can be planned")
        raise BnprobeError(f"{path} plans {int_text(combinations)} runs, more than the limit of {max_runs:,}; {hint}")
    for i, grid in enumerate(axes, 1):
        # Each value first, beside the first value of every other setting (a run the grid has): a bad one is
        # found at once, not after expanding the millions of runs --max-runs allows.
        if all(grid.values()):
            first = {k: values[0] for k, values in grid.items()}
            for name, values in grid.items():
                for value in values:
                    _checked({**defaults, **first, name: value}, f"{path} grid {i}")
    planned: dict[Path, PlannedRun] = {}
    for i, grid in enumerate(axes, 1):
        for values in itertools.product(*grid.values()):
            config = _checked({**defaults, **dict(zip(grid, values))}, f"{path} grid {i}")
            run = PlannedRun(config, runs_dir / config.run_name(), ablation)
            planned.setdefault(run.run_dir, run)  # grids may overlap: each run once
    if not planned:
        raise BnprobeError(f"{path} plans no runs (is a list in [[grid]] empty?)")
    return list(planned.values())


# [ablate]'s settings: bnprobe ablate's options (AblateOptions) by field name, `train` for its --train/--no-train.
ABLATE_SETTINGS = {"test_subset": int, "train_subset": int, "per_layer": bool, "zero_beta": bool, "batch_size": int,
                   "fold": bool, "train": bool}


def read_ablation(table: Any, path: Path) -> AblateOptions:
    """A plan's [ablate] table as the options `bnprobe ablate` takes, checked as its flags are."""
    if not isinstance(table, dict):
        raise BnprobeError(f"{path}: [ablate] must be a table of settings (name = value)")
    table = dict(table)
    sweeps = [name for name in ("clamp_gamma", "clamp_fraction") if name in table]
    if len(sweeps) != 1:
        raise BnprobeError(f"{path} [ablate]: set exactly one of clamp_gamma and clamp_fraction, e.g. "
                           f"clamp_gamma = \"0:0.2:11\"")
    text = table.pop(sweeps[0])
    flag = "--" + sweeps[0].replace("_", "-")
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        raise BnprobeError(f"{path} [ablate]: {sweeps[0]} must be text like \"0:0.2:11\" or a number")
    settings = AblateOptions(mode="threshold" if sweeps[0] == "clamp_gamma" else "fraction",
                             values=parse_sweep(str(text), flag, upper=None if sweeps[0] == "clamp_gamma" else 1.0))
    for name, value in table.items():
        kind = ABLATE_SETTINGS.get(name)
        if kind is None:
            raise BnprobeError(f"{path} [ablate]: unknown setting {name!r}; choose from clamp_gamma, clamp_fraction, "
                               f"{', '.join(ABLATE_SETTINGS)}")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BnprobeError(f"{path} [ablate]: {name} must be {'true or false' if kind is bool else 'a whole number'}")
        if kind is int and value < (1 if name == "batch_size" else 0):
            raise BnprobeError(f"{path} [ablate]: {name} must be >= {1 if name == 'batch_size' else 0}, got {value}")
        setattr(settings, "measure_train" if name == "train" else name, value)
    return settings


def _checked(settings: dict[str, Any], where: str) -> TrainConfig:
    """One run's settings as train resolves them, its model checked on the meta device (cached per model)."""
    config = TrainConfig.from_dict(settings, where).resolved()
    check_model(config, where)
    return config


def _seeds(table: dict[str, Any], path: Path, name: str) -> Optional[list[int]]:
    """`seeds = [0, 1, 2]`, taken out of `table`: the seeds to repeat each run of the table with (None: not set)."""
    if "seeds" not in table:
        return None
    seeds = table.pop("seeds")
    if "seed" in table:
        raise BnprobeError(f"{path} {name}: seed and seeds both set; keep one")
    if (not isinstance(seeds, list) or not seeds  # integers first: a list of lists cannot be put in a set
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds)):
        raise BnprobeError(f"{path} {name}: seeds must be a list of distinct integers, e.g. seeds = [0, 1, 2]")
    return seeds


