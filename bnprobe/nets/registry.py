"""Registry of model builders by name (timm's pattern): `create_model(name, ...)` and `list_models()`.

Besides the registered names, a family may claim every name of a pattern (`register_model_pattern`): any
CIFAR ResNet depth 6n+2 is `resnet<6n+2>`. A registered name always wins over a pattern (resnet50 is the
bottleneck ResNet-50, although 50 = 6*8+2); `list_models()` lists registered names only, and
`model_name_patterns()` the patterns.

Every builder takes the same keywords, so `build_model` builds any of them from a ModelSpec
(bnprobe.core.model_spec): `in_channels`, `num_classes`, `width` (multiplier), `shortcut` (A or B, CIFAR ResNets
only) and `norm_layer` (channels -> the norm layer or nn.Identity: bnprobe.nets.norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from bnprobe.core.errors import BnprobeError, printable
from bnprobe.core.model_spec import ModelSpec
from bnprobe.nets.init import init_weights
from bnprobe.nets.norms import norm_layer_for, remove_norm_affine

if TYPE_CHECKING:
    from bnprobe.core.config import TrainConfig

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}
_DESCRIPTIONS: dict[str, str] = {}
# (builder, description) for a name of the pattern, or None where the name does not fit (resnet21)
PatternResolver = Callable[[re.Match], Optional[tuple[ModelBuilder, str]]]


@dataclass(frozen=True)
class ModelPattern:
    label: str  # how listings and errors show it, e.g. "resnet<6n+2>"
    regex: re.Pattern  # what a whole name must match
    summary: str  # one line: which names it takes and what they build
    resolve: PatternResolver


_PATTERNS: list[ModelPattern] = []


def register_model(name: str, description: str = "") -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator (or plain call on a `functools.partial`) that files a builder under `name`."""

    def add(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = builder
        _DESCRIPTIONS[name] = description or (builder.__doc__ or "").strip().splitlines()[0]
        return builder

    return add


def register_model_pattern(label: str, regex: str, summary: str) -> Callable[[PatternResolver], PatternResolver]:
    """Decorator on `resolve(match) -> (builder, description) or None`: builds every name that fully matches
    `regex`, is not registered, and that `resolve` accepts."""

    def add(resolve: PatternResolver) -> PatternResolver:
        _PATTERNS.append(ModelPattern(label, re.compile(regex), summary, resolve))
        return resolve

    return add


def list_models() -> list[str]:
    """The registered names (each a concrete model); names of a pattern are not listed one by one."""
    return list(_REGISTRY)


def model_name_patterns() -> list[tuple[str, str]]:
    """(label, summary) of every name pattern, e.g. ("resnet<6n+2>", "CIFAR ResNet of any depth 6n+2 ...")."""
    return [(pattern.label, pattern.summary) for pattern in _PATTERNS]


def _from_pattern(pattern: ModelPattern, name: str) -> Optional[tuple[ModelBuilder, str]]:
    match = pattern.regex.fullmatch(name)
    return pattern.resolve(match) if match else None


def model_name_patterns_note() -> str:
    """One line for `bnprobe models`: the patterns, and the registered names they do not override."""
    parts = []
    for pattern in _PATTERNS:
        # registered names the pattern would build as another model (resnet50 is not CIFAR ResNet-50)
        kept = [name for name in _REGISTRY
                if (found := _from_pattern(pattern, name)) and found[1] != _DESCRIPTIONS[name]]
        parts.append(f"{pattern.label} names a {pattern.summary}"
                     + (f"; {', '.join(kept)} keep the models listed above" if kept else ""))
    return "Also: " + "; ".join(parts) + "." if parts else ""


def _lookup(name: str) -> tuple[ModelBuilder, str]:
    """(builder, description) of a registered name, else of the first pattern that takes it; else one line."""
    if name in _REGISTRY:
        return _REGISTRY[name], _DESCRIPTIONS[name]
    for pattern in _PATTERNS:
        if found := _from_pattern(pattern, name):
            return found
    patterns = "".join(f", and {label} names a {summary}" for label, summary in model_name_patterns())
    raise BnprobeError(f"unknown model {printable(name, limit=100)!r}; `bnprobe models` lists the {len(_REGISTRY)} registered ones{patterns}")


def describe_model(name: str) -> str:
    return _lookup(name)[1]


def check_model_name(name: str) -> None:
    _lookup(name)


def build_model(spec: ModelSpec) -> nn.Module:
    """The model `spec` describes, with PyTorch's default init (drawn from torch's global generator);
    `init_weights` applies Frankle's.

    `spec.norm` chooses the norm layers (batch, group with `norm_groups` groups, layer) and `spec.bn` places them:
    `full` after every conv, `none` nowhere, `every-k` after every `bn_every`-th conv (counted in construction
    order); the others become nn.Identity. The layers `bn_affine_off` names lose their gamma/beta.
    """
    model = _lookup(spec.model)[0](
        in_channels=spec.in_channels, num_classes=spec.num_classes, width=spec.width, shortcut=spec.shortcut,
        norm_layer=norm_layer_for(spec.bn, spec.bn_every, spec.norm, spec.norm_groups),
    )
    remove_norm_affine(model, spec.bn_affine_off)
    return model


def create_model(name: str, **settings: Any) -> nn.Module:
    """`build_model` by name, the other ModelSpec fields as keywords (their defaults where left out)."""
    return build_model(ModelSpec(name, **settings))


def from_config(config: "TrainConfig") -> nn.Module:
    """The model exactly as a run's `config` initialises it: the same seed gives the same tensors (open_lth's
    registry idea: training, loading a checkpoint and exporting all build through here)."""
    torch.manual_seed(config.seed)
    return init_weights(build_model(config.model_spec()), config.gamma_init)
