"""`bnprobe ablate --eval file.py:evaluate`: the user's own evaluation of a model (a pitch tracker's error, a
language model's perplexity, anything), loaded like a --model factory, called with the model on its device in
eval mode, and held to returning a dict of named finite numbers. What it raises is the user's failure: one line
naming the file and line of the user's code where it happened, never a traceback of bnprobe's internals."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
import torch.nn as nn

from bnprobe.analysis.loading import USER_CODE_FAILURES, load_factory, user_line
from bnprobe.core.errors import BnprobeError, first_line, printable
from bnprobe.files.schema import MAX_METRICS as FILE_METRICS

# Each metric is a dataset of ablation.h5 and a column of the table: names must fit both; --text's two fit beside.
MAX_METRICS = FILE_METRICS - 2
MAX_NAME = 64


def load_eval(spec: str) -> Callable[[nn.Module], Any]:
    """The --eval callable (path/to/file.py:evaluate or package.module:evaluate)."""
    return load_factory(spec, flag="--eval", what="evaluate")


def check_metric_name(name: Any, spec: str) -> str:
    if (not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable() or "/" in name
            or name.startswith(".")):
        shown = printable(repr(name))[:80]
        raise BnprobeError(f"--eval: {spec} returned the key {shown}; metric names must be printable strings of "
                           f"1 to {MAX_NAME} characters without '/' or a leading '.'")
    return name


def run_eval(evaluate: Callable[[nn.Module], Any], model: nn.Module, spec: str) -> dict[str, float]:
    """evaluate(model) under torch.no_grad, in eval mode, checked: a dict of names to finite real numbers (Python
    or numpy numbers, or tensors of one element)."""
    model.eval()
    try:
        with torch.no_grad():
            result = evaluate(model)
    except USER_CODE_FAILURES as exc:
        raise BnprobeError(f"--eval: {spec} raised {first_line(exc, typed=True)}{user_line(exc, evaluate)}")
    if not isinstance(result, dict):
        raise BnprobeError(f"--eval: {spec} returned a {type(result).__name__}, not a dict of named numbers "
                           f"like {{'loss': 0.31, 'accuracy': 0.92}}")
    if not result:
        raise BnprobeError(f"--eval: {spec} returned an empty dict; return at least one named number")
    if len(result) > MAX_METRICS:
        raise BnprobeError(f"--eval: {spec} returned {len(result)} metrics; at most {MAX_METRICS}")
    metrics = {}
    for name, value in result.items():
        check_metric_name(name, spec)
        number = _number(value)
        if number is None or not math.isfinite(number):
            shown = printable(repr(value))[:60]
            raise BnprobeError(f"--eval: {spec} returned {name}={shown}, not a finite number")
        metrics[name] = number
    return metrics


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return None
        return float(value.detach().cpu().item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None  # True is an int to Python, but not a measurement
    return float(value)


def check_same_names(metrics: dict[str, float], baseline: dict[str, float], spec: str) -> None:
    """Every call must return the same metrics: each is a column of every row."""
    if set(metrics) != set(baseline):
        raise BnprobeError(f"--eval: {spec} returned metrics {sorted(metrics)} after a clamp but {sorted(baseline)} "
                           f"before; return the same names every time")
