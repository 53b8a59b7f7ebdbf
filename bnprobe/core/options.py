"""The options of `bnprobe probe` and `bnprobe ablate` as dataclasses (LoadOptions, shared; ProbeOptions,
AblateOptions), which the CLI turns into flags as it does TrainConfig and which each result file records;
and the syntax of their value lists.

Kept free of torch (and numpy), because the CLI builds its commands from these at import time and
`bnprobe --help` should not wait for torch to load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bnprobe.core.errors import BnprobeError, check_int, int_text

NORM_UNITS = ("auto", "unit", "pixel")
DEFAULT_TAUS = "0.001,0.01,0.05,0.1"
REPORT_TAUS = "0.01,0.05,0.1"  # the report's figures and tables: fewer columns
# A channel counts as turned off when |γ| is below this: its BN output is then (almost) the constant β. The probe's
# default --off-threshold, and the findings' "channels off".
OFF_THRESHOLD = 0.01
# Each value is at least one evaluation (ablate) or a column (probe, report): more than this is a typo, and
# would otherwise spend minutes and gigabytes before saying anything.
MAX_SWEEP_VALUES = 10_000
# Images and batch sizes of a probe or ablation: far more than any data set holds, far below 2**63 (HDF5's and
# torch's integers), as TrainConfig's MAX_COUNT.
MAX_IMAGES = 1_000_000_000
# Each bin is a column of every layer's γ and β histogram (layers x bins int64): finer than a layer's channels
# (a few thousand at most) can fill, where 10^8 bins took 7 GB before a line was written.
MAX_BINS = 10_000
SWEEP_SYNTAX = (
    "One value (0.05), a comma-separated list (0.01,0.05,0.1), or START:STOP:COUNT for COUNT evenly spaced "
    "values from START to STOP inclusive (0:0.2:20 is 20 values 0, 0.0105, ..., 0.2); items can be mixed "
    "(0,0.001,0.01:0.2:10). Values are sorted and de-duplicated; at most 10,000 in all."
)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """A field's flag: its help text; `flag` renames it (False: no flag, the command sets the field itself);
    `parse` = (default text, function): a flag of text (a sweep like 0:0.2:20) read into the field's value."""
    return {"help": text, "identity": False, **extra}


def _sweep(flag: str, default: str, help: str) -> Any:
    parse = lambda text: parse_sweep(text, flag)  # noqa: E731
    return field(default_factory=lambda: parse(default), metadata=_help(f"{help} {SWEEP_SYNTAX}", parse=(default, parse)))


@dataclass
class LoadOptions:
    """How to turn a checkpoint file into a model and its evaluation data (see bnprobe.analysis.loading)."""

    model: Optional[str] = field(default=None, metadata=_help(
        "Build the model with a factory of your own: path/to/file.py:factory or package.module:factory "
        "[default: rebuild a bnprobe checkpoint's model from its config]."))
    model_arg: Optional[list[str]] = field(default=None, metadata=_help(
        "key=value keyword argument of the --model factory, repeatable; values are parsed as JSON when they "
        "are JSON (10, 0.5, true, \"text\"), else taken as strings."))
    dataset: Optional[str] = field(default=None, metadata=_help(
        "Data set to evaluate on: mnist | cifar10 | cifar100 | digits "
        "[default: the run's; required for other checkpoints]."))
    data_dir: Optional[Path] = field(default=None, metadata=_help(
        "Data folder [default: the run's (never one an exported file names), else $BNPROBE_DATA_DIR or ./data]."))
    mean: Optional[str] = field(default=None, metadata=_help(
        "Input normalisation mean, one value or one per channel, e.g. 0.4914,0.4822,0.4465 "
        "[default: a bnprobe checkpoint's stored statistics, else the training set's per-channel mean]."))
    std: Optional[str] = field(default=None, metadata=_help(
        "Input normalisation std, as --mean (e.g. 0.247,0.243,0.261)."))
    norm_units: str = field(default="auto", metadata=_help(
        "Units of --mean/--std: unit (0..1, as torchvision's Normalize after ToTensor), pixel (0..255), or auto "
        "(unit when every value is <= 1)."))
    download: Optional[bool] = field(default=None, metadata=_help(
        "Download missing data [default: the run's, else yes]."))
    verify: Optional[bool] = field(default=None, metadata=_help(
        "Check md5 sums of data files [default: the run's, else yes]; --no-verify for modified copies."))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N."))


PROBED_NORMS = ("all", "bn")  # probe --norms: every normalisation layer, or BatchNorm alone
SCALE_OFFSETS = (0.0, 1.0)  # probe --scale-offset: w as stored, or 1 + w (the Gemma family)


def check_scale_offset(value: Optional[float]) -> None:
    if value is not None and value not in SCALE_OFFSETS:
        raise BnprobeError(f"--scale-offset must be 0 (the scale is w as stored) or 1 (the model computes 1 + w); "
                           f"got {value:g}")


@dataclass
class ProbeOptions:
    """What `bnprobe probe` measures, besides how it loads (LoadOptions)."""

    taus: list[float] = _sweep("--taus", DEFAULT_TAUS, "Thresholds τ for the fraction of |γ| < τ.")
    off_threshold: float = field(default=OFF_THRESHOLD, metadata=_help("A channel counts as turned off when |γ| is below this."))
    bins: int = field(default=40, metadata=_help(
        "Histogram bins for γ and β in probe.h5 (edges shared by all layers), at most 10,000."))
    images: int = field(default=1000, metadata=_help("Test images to measure ReLU sparsity on (0 = all)."))
    batch_size: int = field(default=500, metadata=_help("Batch size of the forward passes."))
    norms: str = field(default="all", metadata=_help(
        "Which normalisation layers: all (BatchNorm, and LayerNorm/GroupNorm/RMSNorm-like layers found by their "
        "names and tensors) or bn (BatchNorm alone)."))
    scale_offset: Optional[float] = field(default=None, metadata=_help(
        "The norms' effective scale is the stored w plus this: 1 for a model that computes x * (1 + w) (the Gemma "
        "family), 0 for w as stored; applied to every norm layer but BatchNorm, in a static probe [default: 1 for "
        "the RMSNorm-like layers of a Hugging Face file whose config.json names a Gemma-family model type, else 0]."))
    # 10x: far outside the bulk of a layer's |γ| (which spreads over a few times its median), so what is listed
    # stands apart from its layer, not merely at the top of its spread; a smaller factor lists milder ones.
    outlier_factor: float = field(default=10.0, metadata=_help(
        "A dimension is an outlier of its layer when its |γ| is above this many times the layer's median |γ|."))

    def check(self) -> None:
        """Every option, once, before any file is opened or written (the CLI and run_probe both ask)."""
        if not (math.isfinite(self.off_threshold) and self.off_threshold >= 0):
            raise BnprobeError(f"--off-threshold must be >= 0 (a finite number), got {self.off_threshold:g}")
        if any(not (math.isfinite(t) and t >= 0) for t in self.taus):
            raise BnprobeError("thresholds τ must be >= 0")
        self.check_counts()
        if self.norms not in PROBED_NORMS:
            raise BnprobeError(f"--norms must be one of {', '.join(PROBED_NORMS)}; got {self.norms!r}")
        if not (math.isfinite(self.outlier_factor) and self.outlier_factor > 0):
            raise BnprobeError(f"--outlier-factor must be a finite number > 0, got {self.outlier_factor:g}")
        check_scale_offset(self.scale_offset)

    def check_counts(self) -> None:
        """The integer options' ranges (answered before any file is opened or written)."""
        if not 1 <= self.bins <= MAX_BINS:
            raise BnprobeError(f"--bins must be in [1, {MAX_BINS:,}], got {int_text(self.bins)}")
        check_int("--images", self.images, 0, MAX_IMAGES)
        check_int("--batch-size", self.batch_size, 1, MAX_IMAGES)


@dataclass
class AblateOptions:
    """What `bnprobe ablate` clamps and re-measures, besides how it loads (LoadOptions)."""

    mode: str = field(default="threshold", metadata=_help(
        "threshold (--clamp-gamma: γ := 0 where |γ| < τ) or fraction (--clamp-fraction).", flag=False))
    values: list[float] = field(default_factory=list, metadata=_help("The τ or p swept, ascending.", flag=False))
    per_layer: bool = field(default=False, metadata=_help(
        "Apply within each layer: --clamp-fraction zeroes the smallest p of each layer; --clamp-gamma "
        "clamps |γ| < τ times the layer's largest |γ|."))
    zero_beta: bool = field(default=False, metadata=_help(
        "Also set β of clamped channels to 0 [default: keep β, so they output β]."))
    test_subset: int = field(default=0, metadata=_help("Evaluate on the first N test images (0 = all)."))
    train_subset: int = field(default=10000, metadata=_help(
        "Train images to re-measure on, of those a run trained on, chosen as train's --train-eval-subset chooses "
        "them (0 = all)."))
    measure_train: bool = field(default=True, metadata=_help("Also re-measure train accuracy and loss.", flag="train"))
    batch_size: Optional[int] = field(default=None, metadata=_help(
        "Evaluation batch size [default: 4000 on CUDA, 256 on CPU]."))
    fold: bool = field(default=True, metadata=_help(
        "Fold BN into the preceding convs once (fast) or mask γ on the BN modules."))
    # --clamp-dims, --eval, Hugging Face models (issue 34): docs/probes-and-ablations.md
    dims: list[str] = field(default_factory=list, metadata=_help("The --clamp-dims values.", flag=False))
    seed: int = field(default=0, metadata=_help("Seed of --clamp-dims random:K's draws."))
    repeats: int = field(default=1, metadata=_help(
        "Draws of --clamp-dims random:K (each a row), at most 1000."))
    outlier_factor: float = field(default=10.0, metadata=_help(
        "--clamp-dims recurring: a dimension is an outlier of a layer when its |γ| is above this many times the "
        "layer's median |γ| (as probe's --outlier-factor)."))
    eval: Optional[str] = field(default=None, metadata=_help(
        "Measure with your own function instead of image accuracy: path/to/file.py:evaluate or "
        "package.module:evaluate, called with the model (on the device, eval mode), returning a dict of named "
        "numbers; no --dataset needed."))
    text: Optional[Path] = field(default=None, metadata=_help(
        "Hugging Face causal or masked language model: mean token loss and perplexity on this text file, "
        "tokenised by the folder's tokenizer."))
    tokens: int = field(default=20000, metadata=_help("--text: at most this many tokens of the file."))
    context: int = field(default=256, metadata=_help(
        "--text: tokens per sequence (at most the model's positions)."))

    def check(self) -> None:
        """Every option, once, before any file is opened or written (the CLI, run_ablation and the Hugging Face
        path all ask), once the command has set what is clamped (mode, values, dims)."""
        if any(v < 0 for v in self.values):
            raise BnprobeError("clamp values must be >= 0")
        if self.mode == "dims" and not self.dims:
            raise BnprobeError("--clamp-dims needs at least one value")
        if self.mode == "dims" and self.per_layer:
            raise BnprobeError("--per-layer applies to --clamp-gamma and --clamp-fraction, not --clamp-dims")
        if self.mode != "dims" and self.repeats != 1:
            raise BnprobeError("--repeats repeats the random draws of --clamp-dims random:K; pass --clamp-dims too")
        if not self.outlier_factor > 0:
            raise BnprobeError(f"--outlier-factor must be > 0, got {self.outlier_factor}")
        self.check_counts()

    def check_counts(self) -> None:
        """The integer options' ranges (answered before any file is opened or written)."""
        if self.batch_size is not None:
            check_int("--batch-size", self.batch_size, 1, MAX_IMAGES)
        check_int("--test-subset", self.test_subset, 0, MAX_IMAGES)
        check_int("--train-subset", self.train_subset, 0, MAX_IMAGES)


def parse_sweep(text: str, flag: str, upper: Optional[float] = None) -> list[float]:
    """`0.05`, `0.01,0.05,0.1`, `0:0.2:20` (20 values, both ends included), or a mix, as sorted floats.

    Every error is one line naming `flag` and the offending item: an empty item (`0.1,,0.2`, a trailing
    comma), a non-number, a non-finite value (inf, nan), a value < 0 or above `upper`, a bad range."""
    if not text.strip():
        raise BnprobeError(f"{flag} needs at least one value; got {text!r}")
    values: list[float] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            raise BnprobeError(f"{flag} has an empty item in {text!r} (two commas in a row, or a comma at an end)")
        parts = item.split(":")
        if len(parts) not in (1, 3):
            raise BnprobeError(
                f"{flag} must be a number, a list like 0.01,0.05,0.1 or a range START:STOP:COUNT; got {item!r}")
        try:
            ends = [float(p) for p in parts[:2]]
        except ValueError:
            raise BnprobeError(
                f"{flag} must be a number, a list like 0.01,0.05,0.1 or a range START:STOP:COUNT; got {item!r}")
        if not all(math.isfinite(end) for end in ends):
            raise BnprobeError(f"{flag} values must be finite and >= 0; got {item!r}")
        if len(parts) == 3 and ends[1] < ends[0]:
            raise BnprobeError(f"{flag}: STOP must be >= START in {item!r}")
        if min(ends) < 0:
            raise BnprobeError(f"{flag} values must be finite and >= 0; got {item!r}")
        if upper is not None and max(ends) > upper:
            raise BnprobeError(f"{flag} values must be in [0, {upper:g}]; got {item!r}")
        if len(parts) == 1:
            if len(values) == MAX_SWEEP_VALUES:
                raise BnprobeError(f"{flag} has more than {MAX_SWEEP_VALUES:,} values in {_short(text)}")
            values.append(ends[0])
            continue
        start, stop = ends
        try:
            count = int(parts[2])
        except ValueError:
            raise BnprobeError(f"{flag}: the COUNT of {item!r} must be a whole number >= 1")
        if not 1 <= count <= MAX_SWEEP_VALUES:
            raise BnprobeError(f"{flag}: the COUNT of {item!r} must be in [1, {MAX_SWEEP_VALUES:,}]")
        if len(values) + count > MAX_SWEEP_VALUES:
            raise BnprobeError(f"{flag} has more than {MAX_SWEEP_VALUES:,} values in {_short(text)}")
        step = (stop - start) / (count - 1) if count > 1 else 0.0
        values.extend([start + i * step for i in range(count - 1)] + [stop if count > 1 else start])
    return sorted(set(values))


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
