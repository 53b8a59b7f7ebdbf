"""Every run and result file under the reported directories: the walk (hidden, set-aside and undecodable names
said, not skipped silently), the runs read in worker processes, each result file given to the run it belongs to,
all in the report's order. `bnprobe findings` collects as the report does."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.formats import FREEZE_MODES, RUN_FILES, TELEMETRY_FILE
from bnprobe.core.options import parse_sweep
from bnprobe.files import schema
from bnprobe.reporting.diff_read import DIFF_SUFFIX, DiffRow, read_diff
from bnprobe.reporting.read import (
    EXPORT_SUFFIX,
    Ablation,
    Export,
    ProbeRow,
    Run,
    RunSkipped,
    Skipped,
    printable_name,
    read_result_file,
    read_run,
)
from bnprobe.reporting.workers import Workers, workers

SET_ASIDE = ".replaced"  # .NAME.replaced: the old run an --overwrite killed midway left (bnprobe.files.runs)
FREEZE_ORDER = FREEZE_MODES  # the report's column order


@dataclass
class Collection:
    roots: list[Path]
    runs: list[Run]
    skipped: list[Skipped]
    ablations: list[Ablation]
    probes: list[ProbeRow]
    exports: list[Export] = field(default_factory=list)
    diffs: list[DiffRow] = field(default_factory=list)  # `bnprobe diff --format json` files (NAME.diff.json)


def parse_taus(text: str) -> list[float]:
    """The same syntax as `bnprobe probe --taus` (a list or START:STOP:COUNT), sorted and de-duplicated."""
    return parse_sweep(text, "--taus")


def _holds_run_files(folder: Path) -> bool:
    try:
        return any(name in RUN_FILES for name in os.listdir(folder))
    except OSError:
        return False


def collect(roots: Sequence[Path], include_unfinished: bool = False, *, taus: Optional[Sequence[float]] = None,
            jobs: int = 1, pool: Optional[Workers] = None) -> Collection:
    """Every run directory under each of `roots` (or the root itself) and every probe/ablation file there,
    read defensively. Names are paths relative to their root, prefixed by the root's name when there are several.

    Runs are read in `pool` (see `workers`), else in up to `jobs` processes. With `taus`, a run's γ arrays are let go
    where it was read, for the numbers and the digest the report shows of them at those τ (keep_gamma_summary):
    what comes back is small, whatever the depth of the net.
    """
    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.exists():
            raise BnprobeError(f"no runs directory at {root}")
        if not root.is_dir():
            raise BnprobeError(f"{root} is not a directory")
    found = _Found()
    for root in roots:
        _walk(root, f"{root.resolve().name}/" if len(roots) > 1 else "", found)

    collection = Collection(roots, [], found.passed_over, [], [])
    tasks = [(run_dir, name, include_unfinished, taus) for run_dir, name in found.run_dirs.items()]
    skipped_runs: dict[Path, Skipped] = {}
    with workers(jobs) if pool is None else nullcontext(pool) as readers:
        outcomes = readers.map(_read, tasks)
    for (run_dir, *_), outcome in zip(tasks, outcomes):
        if isinstance(outcome, Run):
            collection.runs.append(outcome)
        else:
            collection.skipped.append(outcome)
            skipped_runs[run_dir] = outcome
    collection.skipped += found.set_aside
    _leave_out_with_their_runs(found, skipped_runs)
    for path, name in found.result_files.values():
        _add_result_file(collection, path, name)
    collection.runs.sort(key=_run_order)
    collection.ablations.sort(key=lambda a: (_run_order(a.run) if a.run else (1,), a.name))
    if not (collection.runs or collection.skipped or collection.ablations or collection.probes or collection.exports
            or collection.diffs):
        where = ", ".join(str(r) for r in roots)
        raise BnprobeError(f"no runs under {where} (a run directory holds config.json, metrics.json, checkpoint.pt)")
    return collection


@dataclass
class _Found:
    """What the walk found under the roots."""
    run_dirs: dict[Path, str] = field(default_factory=dict)  # resolved path -> name: a run named twice is read once
    result_files: dict[Path, tuple[Path, str]] = field(default_factory=dict)  # resolved path -> (path, name)
    set_aside: list[Skipped] = field(default_factory=list)  # old runs an --overwrite killed midway left
    # What the walk itself cannot take: unreadable, hidden, not UTF-8.
    passed_over: list[Skipped] = field(default_factory=list)


def _walk(root: Path, prefix: str, found: _Found) -> None:
    """Every run directory and result file under `root` into `found`, named by their path from `root`."""

    def display(path: Path) -> str:
        relative = path.relative_to(root).as_posix()
        return printable_name(path.name if relative == "." else prefix + relative)

    def unreadable(exc: OSError) -> None:
        found.passed_over.append(Skipped(display(Path(exc.filename)), f"cannot be read ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        found.set_aside += [Skipped(display(Path(dirpath, d)), _set_aside_reason(d[1:-len(SET_ASIDE)]))
                            for d in sorted(dirnames) if d.startswith(".") and d.endswith(SET_ASIDE)
                            and schema.is_set_aside(Path(dirpath, d))]
        here = Path(dirpath)
        for d in sorted(dirnames):  # .foo: hidden; named when it holds a run (.NAME.replaced: see Replacement)
            if d.startswith(".") and not schema.is_set_aside(here / d) and _holds_run_files(here / d):
                found.passed_over.append(Skipped(display(here / d), "hidden: its name starts with '.' (rename it to "
                                                                    "include it)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files = {f for f in filenames if not f.startswith(".")}
        if files.intersection(RUN_FILES):
            if printable_name(dirpath) != dirpath:
                found.passed_over.append(Skipped(display(here), "its name is not valid UTF-8 (rename it to include "
                                                                "it)"))
                files = set()  # its result files go with it
            else:
                found.run_dirs.setdefault(_real(here), display(here))
        for f in sorted(files):
            if (f.endswith(".h5") and f != TELEMETRY_FILE) or f.endswith((EXPORT_SUFFIX, DIFF_SUFFIX)):
                if printable_name(str(here / f)) != str(here / f):
                    found.passed_over.append(Skipped(display(here / f), "its name is not valid UTF-8 (rename it)"))
                else:
                    found.result_files.setdefault(_real(here / f), (here / f, display(here / f)))


def _leave_out_with_their_runs(found: _Found, skipped_runs: dict[Path, Skipped]) -> None:
    """A result file inside a skipped run is left out with it (it would still label a curve and a table row with
    that run's name); the nearest run directory above the file is the one it belongs to."""
    left_out: dict[Path, list[str]] = {}
    for resolved in list(found.result_files):
        owner = next((d for d in resolved.parents if d in found.run_dirs), None)
        if owner in skipped_runs:
            del found.result_files[resolved]
            left_out.setdefault(owner, []).append(resolved.relative_to(owner).as_posix())
    for owner, files in left_out.items():
        skipped_runs[owner].reason += f"; left out with it: {', '.join(sorted(files))}"


def _add_result_file(collection: Collection, path: Path, name: str) -> None:
    """One probe, ablation, export or diff file, read into `collection` (or skipped there, in one line)."""
    try:
        result = read_diff(path, name) if path.name.endswith(DIFF_SUFFIX) else read_result_file(path, name)
    except BnprobeError as exc:  # a diff file's fault, in one line
        collection.skipped.append(Skipped(name, str(exc)))
        return
    except RunSkipped as reason:
        collection.skipped.append(Skipped(name, str(reason)))
        return
    except Exception as exc:  # noqa: BLE001 -- as in _read: one file, not the report
        collection.skipped.append(Skipped(name, f"could not be read ({first_line(exc, typed=True)})"))
        return
    if isinstance(result, Ablation):
        result.run = _owner(path, result.checkpoint, collection.runs)
        if result.run is not None and _real(path.parent) == _real(result.run.path):
            result.name = path.name  # its run is named in the next column
        collection.ablations.append(result)
    elif isinstance(result, list):
        collection.probes += result
    elif isinstance(result, Export):
        collection.exports.append(result)
    elif isinstance(result, DiffRow):
        collection.diffs.append(result)


def _set_aside_reason(name: str) -> str:
    return (f"the old run {name}, set aside by an --overwrite that was interrupted; the next `bnprobe train` "
            f"of {name} puts it back, or removes it if the new run has saved a checkpoint")


def _read(task: tuple[Path, str, bool, Optional[Sequence[float]]]) -> Run | Skipped:
    run_dir, name, include_unfinished, taus = task
    try:
        run = read_run(run_dir, name, include_unfinished)
        if taus is not None:
            run.keep_gamma_summary(taus)  # the arrays stay in this process
    except RunSkipped as reason:
        return Skipped(name, str(reason))
    except Exception as exc:  # noqa: BLE001 -- data no reader foresaw must cost one run, not the report
        return Skipped(name, f"could not be read ({first_line(exc, typed=True)})")
    return run


def _run_order(run: Run) -> tuple:
    freeze = FREEZE_ORDER.index(run.freeze) if run.freeze in FREEZE_ORDER else len(FREEZE_ORDER)
    depth = run.depth if run.depth is not None else 10**9
    return (0, run.dataset, run.family, run.width, depth, freeze, run.freeze, run.norm, run.bn, run.seed, run.name)


def _owner(path: Path, checkpoint: str, runs: Sequence[Run]) -> Optional[Run]:
    """The run an ablation belongs to: the one it sits in, else the one whose checkpoint it read."""
    candidates = [path.parent]
    if checkpoint:  # stored as given on the command line: relative to wherever `bnprobe ablate` ran
        for source in (Path(checkpoint), path.parent / checkpoint):
            candidates.append(source if os.path.isdir(source) else source.parent)
    for candidate in candidates:
        resolved = _real(candidate)
        for run in runs:
            if _real(run.path) == resolved:
                return run
    return None


def _real(path: Path) -> Path:
    """The path with every symlink resolved; unlike Path.resolve, never raises (a symlink loop stays as it is)."""
    return Path(os.path.realpath(path))


