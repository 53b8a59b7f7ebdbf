"""A run's identity: which settings its name's hash covers, and that adding a setting with a default leaves the
name of every run made before it unchanged (bnprobe.core.config.TrainConfig.hashed_identity)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from bnprobe.core.config import FIRST_IDENTITY, IDENTITY_DEFAULTS, TrainConfig, _flag, seed_group

# Names computed by bnprobe at 5ac2049, before the hash's settings were read from field metadata.
KNOWN = [
    ({}, "resnet20-cifar10-none-s0-b22305d8"),
    ({"model": "resnet56", "freeze": "non-bn-output", "bn": "every-k", "bn_every": 3},
     "resnet56-bn-every3-cifar10-non-bn-output-s0-37eea066"),
    ({"norm": "group"}, "resnet20-gn16-cifar10-none-s0-393189a9"),
    ({"norm": "group", "norm_groups": 8, "freeze": "non-norm"}, "resnet20-gn8-cifar10-non-norm-s0-b4ae7e7d"),
    ({"norm": "layer", "bn": "every-k", "bn_every": 3}, "resnet20-ln-bn-every3-cifar10-none-s0-43539097"),
    ({"model": "resnet8", "dataset": "digits", "random_features": 4, "bn_affine_off": "layer1.*", "subset": 200,
      "epochs": 3}, "resnet8-digits-none-s0-bded7da7"),
]


def resolved(cls: type, **settings) -> TrainConfig:
    return cls(**{"data_dir": "/data", **settings}).resolved()


@pytest.mark.parametrize("settings,name", KNOWN)
def test_runs_keep_their_names(settings, name):
    assert resolved(TrainConfig, **settings).run_name() == name


def test_the_hash_is_of_the_hashed_identity():
    config = resolved(TrainConfig, norm="group", norm_groups=8)
    hashed = config.hashed_identity()
    assert hashed["norm_groups"] == 8 and "data_dir" not in hashed and "device" not in hashed
    assert config.run_name().endswith(hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8])
    # a setting added after the first runs is left out where it does not act: at its default, or outside its
    # applies_when (norm_groups without --norm group)
    assert "norm" not in resolved(TrainConfig).hashed_identity()
    assert "norm_groups" not in resolved(TrainConfig, norm="layer", norm_groups=8).hashed_identity()


def test_the_first_identity_settings_stay_as_the_first_runs_hashed_them():
    # Never add a name to FIRST_IDENTITY: every run name made before that setting existed would change.
    assert FIRST_IDENTITY == set(IDENTITY_DEFAULTS) - {"norm", "norm_groups"}
    assert len(FIRST_IDENTITY) == 26
    config = resolved(TrainConfig)
    assert FIRST_IDENTITY <= set(config.hashed_identity())  # hashed even at their defaults


def newer_config(applies_when=None) -> type:
    """TrainConfig as it would be with one more identity setting, added with a default as the next person would."""
    return dataclasses.make_dataclass(
        "NewerConfig",
        [("dropout", float, dataclasses.field(default=0.0, metadata=_flag("Dropout.", applies_when=applies_when)))],
        bases=(TrainConfig,),
    )


@pytest.mark.parametrize("applies_when", [None, ("norm", "group")])
@pytest.mark.parametrize("settings,name", KNOWN)
def test_adding_a_defaulted_setting_keeps_every_earlier_run_name(settings, name, applies_when):
    newer = newer_config(applies_when)
    assert "dropout" in newer().identity()
    assert resolved(newer, **settings).run_name() == name
    changed = resolved(newer, **settings, dropout=0.5).run_name()
    acts = applies_when is None or settings.get("norm") == "group"
    assert (changed != name) == acts
    assert changed.rsplit("-", 1)[0] == name.rsplit("-", 1)[0]  # only the hash says it


def test_seed_groups_follow_applies_when():
    base = resolved(TrainConfig, model="resnet8", dataset="digits").to_dict()
    assert seed_group({**base, "bn_every": 5}) == seed_group(base)  # --bn full places no every-k layer
    assert seed_group({**base, "norm_groups": 4}) == seed_group(base)  # --norm batch has no groups
    assert seed_group({**base, "bn": "every-k", "bn_every": 5}) != seed_group({**base, "bn": "every-k"})
    group = {**base, "norm": "group"}
    assert seed_group({**group, "norm_groups": 4}) != seed_group(group)
    assert seed_group({**base, "seed": 7}) == seed_group(base)
