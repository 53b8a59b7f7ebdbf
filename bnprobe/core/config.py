"""One config dataclass that flows from the CLI to `config.json`, into every checkpoint, and back.

Each field is a command-line flag of `bnprobe train` (the help text sits next to the field, as in
open_lth). Fields marked `identity=False` only say *how* to run (device, paths); the others decide
*what* is computed, and a hash of them names the run directory (TrainConfig.hashed_identity says which are
hashed: a setting added with a default changes no earlier run's name).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from bnprobe.core.datasets import default_data_dir, get_dataset_spec
from bnprobe.core.errors import BnprobeError, check_int, int_text, printable
from bnprobe.core.formats import (
    BN_FREEZE_MODES,
    BN_PLACEMENTS,
    DEVICES,
    FREEZE_MODES,
    GAMMA_INITS,
    NORMALIZATIONS,
    NORMS,
    SHORTCUTS,
)
from bnprobe.core.model_spec import ModelSpec
from bnprobe.core.modelnames import norm_channels
from bnprobe.core.norm_names import norm_suffix
from bnprobe.core.options import NORM_UNITS, LoadOptions

# The largest model bnprobe builds: 2e9 parameters are 8 GB of float32 weights, 24 GB with their gradients and
# SGD momentum, before one activation (resnet200 has 62M). Counted on the meta device before anything is allocated.
MAX_PARAMETERS = 2_000_000_000
# Every model passes MAX_PARAMETERS below this width (resnet8, the smallest, at 161); the cap keeps the meta
# device's sizes within int64 (--width 10**9 would overflow them) and answers before torch is imported.
MAX_WIDTH = 1024


# Whether `--graphs` is on unless --no-graphs says otherwise. Opt-in until every CUDA test of tests/test_graphs.py
# has passed on a GPU (issues 26 and 35); the switch is this line and the first assert of
# tests/test_graphs.py::test_graphs_only_where_they_apply (docs/gpu-study.md lists the docs that say it). On a CPU,
# under --compile and under --ddp the step stays eager either way (training/graphs.py: uses_graphs).
GRAPHS_BY_DEFAULT = False

# More epochs than this is a typo (a month of 25 s CIFAR epochs); it also bounds a run file's per-epoch rows.
MAX_EPOCHS = 100_000
# Images and steps: far more than any data set bnprobe reads holds (60,000), far below 2**63, past which no file
# (HDF5 attributes, a checkpoint's int64) can store a number.
MAX_COUNT = 1_000_000_000
# Groups per norm layer: more than any layer within MAX_WIDTH has channels (a larger value is one per channel).
MAX_NORM_GROUPS = 65_536
# Every integer setting's range, both ends included, checked by TrainConfig.check alike for the command line,
# config.json, a checkpoint's config and a plan, before anything is written.
INT_RANGES = {
    "subset": (0, MAX_COUNT), "test_subset": (0, MAX_COUNT), "train_eval_subset": (0, MAX_COUNT),
    "width": (1, MAX_WIDTH), "norm_groups": (1, MAX_NORM_GROUPS), "bn_every": (1, 10_000),
    "random_features": (0, MAX_COUNT), "epochs": (1, MAX_EPOCHS), "batch_size": (1, MAX_COUNT),
    "eval_batch_size": (1, MAX_COUNT), "translate": (0, 1024), "seed": (0, 2**32 - 1),
    "telemetry_every": (0, MAX_COUNT),
}


def _flag(help: str, identity: bool = True, applies_when: Optional[tuple[str, str]] = None, **extra: Any) -> Any:
    """A field's metadata: its help text; whether it is part of a run's identity (else it only says how to run);
    and, for a setting that acts only under another one's value, that (setting, value) pair."""
    return {"help": help, "identity": identity, "applies_when": applies_when, **extra}


@dataclass
class TrainConfig:
    model: str = field(default="resnet20", metadata=_flag("Model name from the registry (`bnprobe models`)."))
    dataset: str = field(default="cifar10", metadata=_flag("mnist | cifar10 | cifar100 | digits."))
    subset: int = field(default=0, metadata=_flag("Train on the first N images of a fixed shuffle (0 = all)."))
    test_subset: int = field(default=0, metadata=_flag("Evaluate on the first N test images (0 = all)."))
    width: int = field(default=1, metadata=_flag("Width multiplier of every layer."))
    shortcut: str = field(default="B", metadata=_flag("CIFAR ResNet shortcut: A (zero-pad) or B (1x1 conv + BN)."))
    gamma_init: str = field(
        default="uniform",
        metadata=_flag("Norm layers' gamma init: uniform (U[0,1], Frankle), ones, normal (N(1, 0.1)); beta = 0."),
    )
    freeze: str = field(
        default="none",
        metadata=_flag("What stays at init: none, non-bn (train only the norm layers' gamma/beta), non-bn-output, "
                       "all-but-output, bn (train all but them); non-norm, non-norm-output, norm say the same for "
                       "any --norm (a BN run stores the BN name, a GN/LN run the general one)."),
    )
    norm: str = field(
        default="batch",
        metadata=_flag("Normalisation layers: batch (BatchNorm), group (GroupNorm, see --norm-groups), layer "
                       "(LayerNorm of conv nets: GroupNorm of one group). --bn, --bn-every, --bn-affine-off, "
                       "--gamma-init, --gamma-l1 and --bn-l2 act on them."),
    )
    norm_groups: int = field(
        default=16,
        metadata=_flag("With --norm group: groups per layer (a layer with fewer channels: one per channel).",
                       applies_when=("norm", "group")),
    )
    bn: str = field(
        default="full",
        metadata=_flag("Norm layer placement: full (after every conv), none, every-k (after every --bn-every convs)."),
    )
    bn_every: int = field(
        default=2, metadata=_flag("With --bn every-k: a norm layer after every K-th conv.", applies_when=("bn", "every-k"))
    )
    bn_affine_off: str = field(
        default="",
        metadata=_flag("Norm layers without gamma/beta: comma-separated names or globs, e.g. 'layer3.*'."),
    )
    gamma_l1: float = field(
        default=0.0, metadata=_flag("L1 penalty S * sum|gamma| on the norm layers' gammas (Network Slimming).")
    )
    bn_l2: float = field(
        default=0.0,
        metadata=_flag("Extra L2 on the norm layers' gamma/beta: adds S * param to their gradient, beside "
                       "--weight-decay."),
    )
    random_features: int = field(
        default=0,
        metadata=_flag("Also train K random weights per output channel of every conv (element-wise mask), "
                       "Frankle's random-features baseline."),
    )
    epochs: int = field(default=160, metadata=_flag("Training epochs."))
    batch_size: int = field(default=128, metadata=_flag("Training batch size."))
    lr: float = field(default=0.1, metadata=_flag("Initial learning rate (SGD)."))
    momentum: float = field(default=0.9, metadata=_flag("SGD momentum."))
    weight_decay: float = field(default=1e-4, metadata=_flag("Weight decay on every trainable tensor, BN included."))
    milestones: str = field(default="80,120", metadata=_flag("Epochs at which lr is multiplied by --lr-drop."))
    lr_drop: float = field(default=0.1, metadata=_flag("Factor applied to lr at each milestone."))
    flip: Optional[bool] = field(default=None, metadata=_flag("Random horizontal flip [default: per data set]."))
    translate: Optional[int] = field(
        default=None, metadata=_flag("Random translation up to N px, pad + crop [default: per data set].")
    )
    normalize: Optional[str] = field(
        default=None, metadata=_flag("per-pixel (Frankle) or per-channel [default: per data set].")
    )
    seed: int = field(default=0, metadata=_flag("Seed of init, data order and augmentation (0 to 2**32 - 1)."))
    telemetry_every: int = field(
        default=10, metadata=_flag("Record gradient magnitudes every N steps in telemetry.h5 (0 = never).", identity=False)
    )
    train_eval_subset: int = field(
        default=10000,
        metadata=_flag("Measure eval-mode train accuracy on N fixed training images (0 = all).", identity=False),
    )
    device: str = field(default="auto", metadata=_flag("auto | cpu | cuda | cuda:N.", identity=False))
    amp: bool = field(default=False, metadata=_flag("bfloat16 autocast (mixed precision).", identity=False))
    channels_last: bool = field(
        default=True, metadata=_flag("channels_last memory format (faster with cuDNN and oneDNN).", identity=False)
    )
    compile: bool = field(
        default=False,
        metadata=_flag("torch.compile the model (CUDA graphs on CUDA): ~2x on small models, slow to start; "
                       "--graphs is faster.",
                       identity=False),
    )
    graphs: bool = field(
        default=GRAPHS_BY_DEFAULT,
        metadata=_flag("Capture the training step as a CUDA graph on CUDA: 2-5x faster on an H100 " + (
            "(the default; --no-graphs for the eager step)" if GRAPHS_BY_DEFAULT else
            "(opt-in until its test against eager passes on a GPU)") + "; no effect on CPU.", identity=False),
    )
    ddp: bool = field(
        default=False,
        metadata=_flag("Data-parallel over the processes of torchrun (--batch-size is the global batch).", identity=False),
    )
    sync_bn: bool = field(
        default=False, metadata=_flag("With --ddp and --norm batch: BN statistics over the global batch (CUDA).")
    )
    eval_batch_size: int = field(default=1000, metadata=_flag("Batch size for evaluation.", identity=False))
    data_dir: str = field(
        default="", metadata=_flag("Data folder [default: $BNPROBE_DATA_DIR or ./data].", identity=False)
    )
    download: bool = field(default=True, metadata=_flag("Download missing data sets.", identity=False))
    verify: bool = field(default=True, metadata=_flag("Check md5 sums of data files.", identity=False))

    # ---- derived views -------------------------------------------------------------------------
    @property
    def milestone_epochs(self) -> tuple[int, ...]:
        text = self.milestones.strip()
        if not text:
            return ()
        try:
            epochs = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise BnprobeError(f"--milestones must be comma-separated epochs like 80,120, got {printable(self.milestones, limit=100)!r}")
        return epochs

    def lr_at(self, epoch: int) -> float:
        """Learning rate for 0-based `epoch`: multiplied by lr_drop at every milestone reached."""
        return self.lr * self.lr_drop ** sum(epoch >= m for m in self.milestone_epochs)

    def model_spec(self) -> ModelSpec:
        """The model these settings build (bnprobe.core.model_spec), with the data set's channels and classes."""
        spec = get_dataset_spec(self.dataset)
        return ModelSpec(model=self.model, in_channels=spec.channels, num_classes=spec.num_classes,
                         width=self.width, shortcut=self.shortcut, norm=self.norm, norm_groups=self.norm_groups,
                         bn=self.bn, bn_every=self.bn_every, bn_affine_off=self.bn_affine_off)

    def identity(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity", True)}

    def hashed_identity(self) -> dict[str, Any]:
        """What the run name's hash covers: the FIRST_IDENTITY settings always, as the first stored runs hashed
        them; every identity setting added since only where it is in effect (away from its default, and where
        its `applies_when` holds). So a setting added with a default leaves every stored run's name as it was,
        and a sweep started before it still finds its runs."""
        fields = {f.name: f for f in dataclasses.fields(self) if f.metadata.get("identity", True)}
        return {name: getattr(self, name) for name, f in fields.items()
                if name in FIRST_IDENTITY or (getattr(self, name) != f.default and self._applies(f))}

    def _applies(self, f: dataclasses.Field) -> bool:
        """Whether the setting of field `f` acts in this config: unless its `applies_when` says otherwise."""
        applies_when = f.metadata.get("applies_when")
        return applies_when is None or getattr(self, applies_when[0]) == applies_when[1]

    def run_name(self) -> str:
        """Readable prefix plus a hash of the identity settings (hashed_identity), so equal configs share a
        directory."""
        digest = hashlib.sha256(json.dumps(self.hashed_identity(), sort_keys=True).encode()).hexdigest()[:8]
        norm = norm_suffix(self.norm, self.norm_groups, "-{}").lower()
        variant = {"full": "", "none": "-nobn", "every-k": f"-bn-every{self.bn_every}"}.get(self.bn, "")
        return f"{self.model}{norm}{variant}-{self.dataset}-{self.freeze}-s{self.seed}-{digest}"

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> "TrainConfig":
        """The one way back from what was stored or written (config.json, a checkpoint's config, a sweep plan):
        every field of the right type and in range, else one line naming `where`."""
        if not isinstance(data, dict):
            raise BnprobeError(f"{where} must be a table of settings, not {_shown(data)}")
        unknown = sorted(set(data) - set(_FIELD_TYPES))
        if unknown:
            raise BnprobeError(f"{where}: unknown config keys: {', '.join(unknown)}")
        return check_settings(data, where)

    # ---- validation ------------------------------------------------------------------------------
    def check(self) -> None:
        """The ranges of every field that needs no data set or model: answered before torch is imported."""
        _choice("freeze", self.freeze, FREEZE_MODES)
        _choice("gamma-init", self.gamma_init, GAMMA_INITS)
        _choice("shortcut", self.shortcut, SHORTCUTS)
        check_device(self.device)
        _choice("bn", self.bn, BN_PLACEMENTS)
        _choice("norm", self.norm, NORMS)
        if self.normalize is not None:
            _choice("normalize", self.normalize, NORMALIZATIONS)
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is None:  # translate: the data set's default
                continue
            if name == "seed" and not low <= value <= high:  # torch seeds are 64-bit; numpy's and most tools' are 32
                raise BnprobeError(f"--seed must be in [0, 2**32), got {int_text(value, grouped=False)}")
            if name == "width" and value > high:
                raise BnprobeError(f"--width must be at most {MAX_WIDTH:,} (every model is then past "
                                   f"{MAX_PARAMETERS:,} parameters), got {int_text(value)}")
            check_int(f"--{name.replace('_', '-')}", value, low, high)
        for name in ("lr", "momentum", "weight_decay", "gamma_l1", "bn_l2", "lr_drop"):
            if not math.isfinite(getattr(self, name)):
                raise BnprobeError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BnprobeError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise BnprobeError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.weight_decay >= 0:
            raise BnprobeError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("gamma_l1", "bn_l2"):
            if not getattr(self, name) >= 0:
                raise BnprobeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.bn == "none" and (self.gamma_l1 or self.bn_l2):
            raise BnprobeError("--gamma-l1 and --bn-l2 act on the norm layers' γ and β, but --bn none leaves none")
        if self.norm != "batch" and self.bn == "none":  # one model under two names would split its findings
            raise BnprobeError(f"--norm {self.norm} chooses the norm layers, but --bn none places none; "
                               f"leave --norm at batch for a net without normalisation")
        if self.norm == "group":
            check_groups(self.model, self.width, self.norm_groups)
        if self.norm != "batch" and self.sync_bn:
            raise BnprobeError(f"--sync-bn synchronises BatchNorm's batch statistics; --norm {self.norm} has none")
        if not self.lr_drop > 0:
            raise BnprobeError(f"--lr-drop must be > 0, got {self.lr_drop}")
        milestones = self.milestone_epochs
        if any(m < 1 for m in milestones) or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise BnprobeError(f"--milestones must be increasing positive epochs, e.g. 80,120; got {printable(self.milestones, limit=100)!r}")

    def resolved(self) -> "TrainConfig":
        """Validate every field and fill the per-data-set defaults, so config.json holds concrete values. The
        model these settings build is checked by bnprobe.nets.check.check_model (it needs torch)."""
        self.check()
        spec = get_dataset_spec(self.dataset)
        normalize = spec.normalize if self.normalize is None else self.normalize
        translate = spec.translate if self.translate is None else self.translate
        if not 0 <= translate < spec.size:
            raise BnprobeError(f"--translate must be in [0, {spec.size}) for {spec.name}, got {translate}")
        # Absolute, so that probes and ablations run from another folder find the same data.
        data_dir = Path(self.data_dir) if self.data_dir else default_data_dir()
        return dataclasses.replace(
            self,
            data_dir=os.path.abspath(data_dir.expanduser()),
            flip=spec.flip if self.flip is None else self.flip,
            translate=translate,
            normalize=normalize,
            milestones=",".join(str(m) for m in self.milestone_epochs),
            freeze=freeze_spelling(self.freeze, self.norm),
        )


IDENTITY_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.metadata.get("identity", True)}
# The identity settings of the first stored runs, hashed always (TrainConfig.hashed_identity). Never add a name
# here: a setting outside it is hashed only where it is in effect, which keeps every earlier run's name.
FIRST_IDENTITY = frozenset(IDENTITY_DEFAULTS) - {"norm", "norm_groups"}
# (setting, value) under which a setting acts, for those that act only under another one's (bn_every, norm_groups)
APPLIES_WHEN = {f.name: f.metadata["applies_when"] for f in dataclasses.fields(TrainConfig)
                if f.metadata.get("applies_when")}


def freeze_spelling(freeze: str, norm: str) -> str:
    """The one spelling of a freeze mode a config stores: BN's (non-bn, ...) for BatchNorm nets, so that their run
    names and findings groups stay those of the runs made before --norm; the general one (non-norm, ...) for
    GroupNorm and LayerNorm nets, so that their names say what trains."""
    if norm == "batch":
        return BN_FREEZE_MODES.get(freeze, freeze)
    return next((general for general, bn in BN_FREEZE_MODES.items() if bn == freeze), freeze)


def seed_group(config: dict[str, Any]) -> tuple:
    """What runs that differ only by seed share: the identity settings of a stored config.json but the seed.
    A setting the config lacks (a run from an older bnprobe) counts as its default; one that acts only under
    another's value (APPLIES_WHEN: bn_every with --bn every-k, norm_groups with --norm group) counts only there,
    so a full-BN run groups the same whatever --bn-every said; the freeze mode in its norm's spelling
    (freeze_spelling)."""
    identity = {name: config.get(name, default) for name, default in IDENTITY_DEFAULTS.items() if name != "seed"}
    for name, (setting, value) in APPLIES_WHEN.items():
        if identity[setting] != value:
            identity[name] = IDENTITY_DEFAULTS[name]
    if isinstance(identity["freeze"], str):
        identity["freeze"] = freeze_spelling(identity["freeze"], identity["norm"])
    for name, value in identity.items():  # 0 and 0.0 are one setting (a plan's TOML may write either)
        if isinstance(IDENTITY_DEFAULTS[name], float) and isinstance(value, int) and not isinstance(value, bool):
            identity[name] = float(value)
    return tuple(sorted((name, json.dumps(value)) for name, value in identity.items()))


def _shown(value: Any, limit: int = 40) -> str:
    try:
        text = json.dumps(value, default=repr)
    except ValueError:  # an integer of more than 4,300 digits
        return "a number too long to print"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_load_options(options: LoadOptions) -> None:
    """The probe's and ablation's flags that only make sense together, checked before anything is loaded."""
    check_device(options.device)  # also when no checkpoint needs a device (every one probed from its file)
    if options.model_arg and not options.model:
        raise BnprobeError("--model-arg passes arguments to a --model factory; pass --model too")
    if options.norm_units not in NORM_UNITS:
        raise BnprobeError(f"--norm-units must be one of {', '.join(NORM_UNITS)}; got {options.norm_units!r}")
    if options.norm_units != "auto" and options.mean is None:
        raise BnprobeError("--norm-units says how to read --mean/--std; pass them too")
    if (options.mean is None) != (options.std is None):
        raise BnprobeError("--mean and --std go together; pass both")


def check_groups(model: str, width: int, groups: int) -> None:
    """--norm-groups as GroupNorm layers take it: dividing each layer's channels (a layer with fewer channels
    than groups gets one per channel), checked without torch from the channel counts of the model's family."""
    for channels in norm_channels(model, width) or ():
        if channels % min(groups, channels):
            raise BnprobeError(f"--norm-groups {groups} does not divide a layer's {channels} channels; pick a divisor "
                               f"of every layer's width (16 and its divisors fit every bnprobe model)")


def check_device(name: str) -> None:
    """One of DEVICES, or cuda:N."""
    if not re.fullmatch(r"cuda:\d+", name):
        _choice("device", name, DEVICES)


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise BnprobeError(f"--{flag} must be one of {', '.join(choices)}; got {printable(str(value), limit=100)!r}")


def check_types(data: dict[str, Any], where: Any) -> None:
    """The one type check of stored settings (config.json, a checkpoint's config, a sweep plan): each known
    setting has the type of its TrainConfig field (a bool is no int, null only for Optional fields, a number
    is finite). Unknown settings are left to the caller: the report shows runs of newer versions too."""
    for name, value in data.items():
        if name not in _FIELD_TYPES:
            continue
        kind, optional = _FIELD_TYPES[name]
        types, expected = _KINDS[kind]
        if value is None and optional:
            continue
        if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
            raise BnprobeError(f"{where}: setting {name!r} must be {expected}{' or null' if optional else ''}, "
                               f"not {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise BnprobeError(f"{where}: setting {name!r} must be a finite number, not {value}")


def check_settings(data: dict[str, Any], where: Any) -> TrainConfig:
    """The one check of stored settings that every reader makes: check_types, then TrainConfig.check's ranges
    over the known settings, a missing one counting as its default (unknown ones are left to the caller).
    Returns the TrainConfig of the known settings."""
    check_types(data, where)
    config = TrainConfig(**{name: value for name, value in data.items() if name in _FIELD_TYPES})
    try:
        config.check()
    except BnprobeError as exc:
        raise BnprobeError(f"{where}: {exc}") from None
    return config


# Each field's kind (its annotation without Optional[...]) and whether it may be None; the Python types a
# value of each kind may have (an int is a float too), and how an error names them.
_FIELD_TYPES = {f.name: (f.type.removeprefix("Optional[").removesuffix("]"), f.type.startswith("Optional["))
                for f in dataclasses.fields(TrainConfig)}
_KINDS = {"str": (str, "text"), "int": (int, "an integer"), "float": ((int, float), "a number"),
          "bool": (bool, "true or false")}
