"""`bnprobe check`, the computing part: which rules run with which thresholds (defaults, then
`[tool.bnprobe.check]` of the nearest pyproject.toml or --config FILE, then the command line), the checkpoints
a list of paths names, and the findings of every enabled rule on each one's normalisation layers, read from the
file alone (bnprobe.analysis.static). Presenting them (text, JSON, SARIF) is bnprobe.reporting.check_output's.

A config file is hostile input like any other: bounded in size, every key and value checked, one line for the
first thing wrong.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from bnprobe.analysis.rules import MAX_DIMS, RULES, SEVERITIES, Rule, check_param
from bnprobe.analysis.static import norms_from_tensors, static_probe
from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import CHECK_FORMAT, CHECKPOINT_FILE, DIFF_FORMAT
from bnprobe.files.file_tensors import FileTensors, checkpoint_file, checkpoint_label, torch_tensors
from bnprobe.files.headers import torch_file_kind
from bnprobe.files.schema import MAX_JSON_BYTES, check_outside_runs, read_json, regular_file
from bnprobe.files.shards import INDEX_SUFFIX, model_folder_file

FAIL_ON = (*SEVERITIES, "never")  # --fail-on: the least severe finding that fails the check
FORMATS = ("text", "json", "sarif")
CONFIG_FILE = "pyproject.toml"
MAX_CONFIG_BYTES = 1 << 20  # a pyproject.toml is a few kB; a bigger one is not read
MAX_CHECKED = 10_000  # checkpoints one check takes, folders expanded
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".th", ".bin", ".ckpt", ".safetensors", ".gguf")
CONFIG_KEYS = ("select", "ignore", "fail-on")  # besides a table of thresholds per rule code


@dataclass
class CheckConfig:
    select: tuple[str, ...] = ("BNP",)  # code prefixes; the longest matching prefix of select or ignore decides
    ignore: tuple[str, ...] = ()
    params: dict[str, dict[str, float]] = field(default_factory=dict)  # code -> threshold -> value, set ones only
    fail_on: str = "error"
    source: str = "defaults"  # the config file read, if any

    def enabled(self) -> list[Rule]:
        def longest(prefixes: Sequence[str], code: str) -> int:
            return max((len(p) for p in prefixes if code.startswith(p)), default=-1)

        return [rule for code, rule in RULES.items() if longest(self.select, code) > longest(self.ignore, code)]

    def thresholds(self, rule: Rule) -> dict[str, float]:
        return {**rule.defaults(), **self.params.get(rule.code, {})}


def parse_codes(codes: Sequence[Any], where: str) -> tuple[str, ...]:
    """Rule codes or prefixes of them (BNP1, BNP101), each naming at least one rule."""
    found = []
    for code in codes:
        if not isinstance(code, str) or not code.strip():
            raise BnprobeError(f"{where}: a rule code must be text such as BNP101 or BNP1, got {code!r}")
        code = code.strip().upper()
        if not any(known.startswith(code) for known in RULES):
            raise BnprobeError(f"{where}: no rule code starts with {code!r} (bnprobe check --list-rules)")
        found.append(code)
    return tuple(found)


def split_codes(text: Optional[str], flag: str) -> Optional[tuple[str, ...]]:
    return None if text is None else parse_codes([c for c in text.split(",") if c.strip()] or [""], flag)


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """--set CODE.param=value, each checked against the rule's thresholds."""
    params: dict[str, dict[str, float]] = {}
    for item in items:
        key, equals, text = item.partition("=")
        code, dot, name = key.strip().partition(".")
        code = code.upper()
        if not (equals and dot and name) or code not in RULES:
            raise BnprobeError(f"--set takes CODE.threshold=value, e.g. BNP101.max_fraction=0.3; got {item!r}")
        try:
            value = float(text)
        except ValueError:
            raise BnprobeError(f"--set {item}: {text.strip()!r} is not a number") from None
        params.setdefault(code, {})[name.strip()] = check_param(code, name.strip(), value)
    return params


def find_config(start: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The nearest pyproject.toml upwards from `start` that has a [tool.bnprobe.check] table, with that table."""
    for folder in (start, *start.parents):
        candidate = folder / CONFIG_FILE
        if candidate.is_file():
            table = read_config(candidate, required=False)
            if table is not None:
                return candidate, table
    return None


def read_config(path: Path, required: bool = True) -> Optional[dict[str, Any]]:
    """The [tool.bnprobe.check] table of a TOML file (None when it has none and is not `required`)."""
    try:
        if not path.is_file():
            raise BnprobeError(f"--config {path}: no such file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BnprobeError(f"{path}: {path.stat().st_size:,} bytes, more than a config file may hold "
                               f"({MAX_CONFIG_BYTES:,})")
        with open(path, "rb") as f:
            document = tomllib.loads(f.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except OSError as exc:
        raise BnprobeError(f"cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise BnprobeError(f"{path}: not UTF-8 text, so not a TOML file") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise BnprobeError(f"{path}: not valid TOML ({str(exc).splitlines()[0] if str(exc) else 'too deep'})") from None
    table: Any = document
    for key in ("tool", "bnprobe", "check"):
        table = table.get(key) if isinstance(table, dict) else None
    if table is None:
        if required:
            raise BnprobeError(f"{path}: no [tool.bnprobe.check] table")
        return None
    if not isinstance(table, dict):
        raise BnprobeError(f"{path}: tool.bnprobe.check must be a table, got {type(table).__name__}")
    return table


def config_from_table(table: Mapping[str, Any], where: str) -> CheckConfig:
    """A [tool.bnprobe.check] table, every key and value checked: select, ignore (lists of codes), fail-on, and a
    table of thresholds per rule code."""
    config = CheckConfig(source=where)
    for key, value in table.items():
        if key in ("select", "ignore"):
            if not isinstance(value, list):
                raise BnprobeError(f"{where}: {key} must be a list of rule codes, got {type(value).__name__}")
            setattr(config, key, parse_codes(value, f"{where}: {key}"))
        elif key == "fail-on":
            if value not in FAIL_ON:
                raise BnprobeError(f"{where}: fail-on must be one of {', '.join(FAIL_ON)}, got {value!r}")
            config.fail_on = value
        elif key.upper() in RULES:
            if not isinstance(value, dict):
                raise BnprobeError(f"{where}: {key} must be a table of thresholds, got {type(value).__name__}")
            code = key.upper()
            config.params[code] = {name: check_param(code, str(name), v) for name, v in value.items()}
        else:
            raise BnprobeError(f"{where}: unknown key {key!r} in [tool.bnprobe.check] (keys: {', '.join(CONFIG_KEYS)}, "
                               f"and a table of thresholds per rule code such as [tool.bnprobe.check.BNP101])")
    return config


def resolve_config(*, config_file: Optional[Path] = None, cwd: Optional[Path] = None, select: Optional[str] = None,
                   ignore: Optional[str] = None, sets: Sequence[str] = (), fail_on: Optional[str] = None) -> CheckConfig:
    """Defaults, then the config file (--config, else the nearest pyproject.toml with [tool.bnprobe.check]), then
    the command line: --select replaces the file's, --ignore adds to it, --set overrides thresholds."""
    if config_file is not None:
        config = config_from_table(read_config(config_file), str(config_file))
    else:
        found = find_config((cwd or Path.cwd()).resolve())
        config = config_from_table(found[1], str(found[0])) if found else CheckConfig()
    if select is not None:
        config.select = split_codes(select, "--select")
    if ignore is not None:
        config.ignore = config.ignore + split_codes(ignore, "--ignore")
    for code, values in parse_sets(sets).items():
        config.params.setdefault(code, {}).update(values)
    if fail_on is not None:
        if fail_on not in FAIL_ON:
            raise BnprobeError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
        config.fail_on = fail_on
    return config


# ---- where the report goes -------------------------------------------------------------------------------------

# The last line of a text report of check, and of diff: how a file is known as one (text has no format key).
TEXT_REPORTS = re.compile(r"^[\d,]+ checkpoints?, [\d,]+ rules?: .*--fail-on \w+$"
                          r"|^[\d,]+ of [\d,]+ norm layers changed")
OUR_FORMATS = (CHECK_FORMAT, DIFF_FORMAT)


def _is_our_report(path: Path, output_format: str) -> bool:
    try:
        if output_format == "text":
            regular_file(path)
            with open(path, "rb") as f:
                data = f.read(MAX_JSON_BYTES + 1)
            lines = data.decode("utf-8").strip().splitlines() if len(data) <= MAX_JSON_BYTES else []
            return bool(lines) and bool(TEXT_REPORTS.match(lines[-1]))
        stored = read_json(path)
    except (BnprobeError, OSError, UnicodeDecodeError):
        return False
    if not isinstance(stored, dict):
        return False
    runs = stored.get("runs")
    driver = runs[0].get("tool", {}).get("driver", {}) if isinstance(runs, list) and runs and isinstance(
        runs[0], dict) and isinstance(runs[0].get("tool"), dict) else {}
    return stored.get("format") in OUR_FORMATS or (isinstance(driver, dict) and driver.get("name") == "bnprobe")


def check_output_path(path: Path, output_format: str) -> None:
    """Replace only a report of check or diff (any of their formats), never another file, nor write one inside a
    run directory; checked before any checkpoint is read."""
    check_outside_runs(path)
    if os.path.lexists(path) and not _is_our_report(path, output_format):
        raise BnprobeError(f"will not replace {path}: it is not a report bnprobe check or diff wrote; move it away "
                           f"or name another file")


# ---- what to check ---------------------------------------------------------------------------------------------


def _is_checkpoint_folder(folder: Path) -> bool:
    return (folder / CHECKPOINT_FILE).is_file() or model_folder_file(folder) is not None


def checkpoint_paths(paths: Sequence[Path]) -> list[Path]:
    """Each path as `probe` reads it (a file, a run directory, a model folder), and any other folder as the
    checkpoints under it: run directories and model folders whole, other files by their suffix, in name order;
    symbolic links to folders are not followed."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir() or _is_checkpoint_folder(path):
            found.append(path)
            continue
        for root, folders, files in os.walk(path):
            here = Path(root)
            folders.sort()
            taken = [name for name in folders if _is_checkpoint_folder(here / name)]
            found.extend(here / name for name in taken)
            folders[:] = [name for name in folders if name not in taken]
            found.extend(here / name for name in sorted(files)
                         if name.endswith(CHECKPOINT_SUFFIXES + (INDEX_SUFFIX,)) and not _in_model_folder(here, name))
            if len(found) > MAX_CHECKED:
                raise BnprobeError(f"{path}: more than {MAX_CHECKED:,} checkpoints; check fewer at a time")
        if not found:
            raise BnprobeError(f"{path}: a folder without checkpoints (files ending {' '.join(CHECKPOINT_SUFFIXES)}, "
                               f"run directories or Hugging Face model folders)")
    return found


def _in_model_folder(folder: Path, name: str) -> bool:
    """A shard or an index of a folder that is not a model folder but holds an index: the index stands for them."""
    return any(folder.glob(f"*{INDEX_SUFFIX}")) and not name.endswith(INDEX_SUFFIX)


@dataclass
class Finding:
    code: str
    name: str  # the rule's
    severity: str
    layer: Optional[str]  # the layer's name (its tensors' prefix), None for the whole model
    depth: Optional[int]
    dims: list[int]  # the first MAX_DIMS dimensions concerned
    dims_total: int
    value: float
    threshold: float
    message: str


@dataclass
class FileResult:
    path: str  # as given (what a SARIF location names)
    file: str  # the file read
    label: str
    layers: int
    attrs: dict[str, Any]
    findings: list[Finding]


@dataclass
class CheckResult:
    config: CheckConfig
    rules: list[Rule]
    files: list[FileResult]

    def count(self, severity: str) -> int:
        return sum(1 for f in self.files for finding in f.findings if finding.severity == severity)

    def failed(self) -> bool:
        """Whether a finding reaches --fail-on."""
        if self.config.fail_on == "never":
            return False
        worst = SEVERITIES[: SEVERITIES.index(self.config.fail_on) + 1]
        return any(finding.severity in worst for f in self.files for finding in f.findings)


def check_stats(bn: Any, attrs: Mapping[str, Any], config: CheckConfig) -> list[Finding]:
    """Every enabled rule's findings on one checkpoint's layers (a NormStats), in rule order."""
    findings = []
    for rule in config.enabled():
        for hit in rule.check(bn, attrs, config.thresholds(rule)):
            dims = [int(d) for d in hit.dims]
            findings.append(Finding(
                rule.code, rule.name, rule.severity, None if hit.layer is None else bn.names[hit.layer], hit.layer,
                dims[:MAX_DIMS], len(dims), _number(hit.value), _number(hit.threshold), hit.message))
    return findings


def _number(x: float) -> float:
    return float(x) if math.isfinite(x) else float("nan")


def read_norms(path: Path) -> tuple[Any, dict[str, Any], str, Path]:
    """(NormStats, attrs, label, file) of a checkpoint from its tensors alone; a bnprobe run's checkpoint or export
    too (its model's state dict, read without building the model)."""
    result = static_probe(path, "all")
    if result is not None:
        return result.bn, result.attrs, result.label, Path(result.path)
    file = checkpoint_file(path)
    if torch_file_kind(file):  # a run's checkpoint.pt: read inertly, as any torch file, without torch
        obj, _ = torch_tensors(file)
        weights = obj.get("model") if isinstance(obj, dict) else None
    else:
        # An export: a compact one regenerates its frozen tensors from the model, which takes torch (imported
        # here, for this case alone, so that checking any other file never waits for it).
        from bnprobe.files.checkpoints import read_weights

        weights = read_weights(file).get("model")
    if not isinstance(weights, dict):
        raise BnprobeError(f"{file}: a bnprobe checkpoint without model weights")
    bn = norms_from_tensors(FileTensors(weights, "bnprobe", "model", [], "file"), file, "all")
    label = checkpoint_label(file, path)
    return bn, {"source": "file", "file_format": "bnprobe", "state_dict_key": "model"}, label, file.resolve()


def run_check(paths: Sequence[Path], config: CheckConfig) -> CheckResult:
    files = []
    for path in checkpoint_paths(paths):
        bn, attrs, label, file = read_norms(path)
        files.append(FileResult(str(path), str(file), label, len(bn.names), dict(attrs),
                                check_stats(bn, attrs, config)))
    return CheckResult(config, config.enabled(), files)
