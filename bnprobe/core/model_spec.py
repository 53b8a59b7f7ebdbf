"""The settings that decide a model's modules and tensor shapes, as one frozen value.

`TrainConfig.model_spec()` resolves a run's data-set facts (input channels, classes) into it; it is the one
argument of `bnprobe.nets.registry.build_model`, the cache key of the meta-device model check
(`bnprobe.nets.check`) and of the sweep's cost model (`bnprobe.sweep.cost`). A new model setting is added here
once, instead of to every place that builds a model. How the model is initialised (seed, gamma init) and
trained (freezing, random features) stays in TrainConfig: runs that differ only there share a spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    model: str  # a registered name or one of a pattern (`bnprobe models`)
    in_channels: int = 3
    num_classes: int = 10
    width: int = 1  # multiplier of every layer
    shortcut: str = "B"  # CIFAR ResNets: A (zero-pad) or B (1x1 conv + norm)
    norm: str = "batch"  # batch | group | layer
    norm_groups: int = 16  # with norm group
    bn: str = "full"  # norm placement: full | none | every-k
    bn_every: int = 1  # with bn every-k
    bn_affine_off: str = ""  # norm layers without gamma/beta: comma-separated names or globs
