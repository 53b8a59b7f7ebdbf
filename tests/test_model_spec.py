"""ModelSpec (bnprobe.core.model_spec): what TrainConfig.model_spec() resolves, and that it is the one argument of
model creation and the key of the meta-device model check."""

import dataclasses

import pytest
import torch

from bnprobe.core.config import TrainConfig
from bnprobe.core.model_spec import ModelSpec
from bnprobe.nets import check
from bnprobe.nets.norms import norm_layers
from bnprobe.nets.registry import build_model, create_model, from_config


def test_model_spec_holds_the_model_settings_and_the_data_sets_facts():
    config = TrainConfig(model="resnet8", dataset="digits", width=2, shortcut="A", norm="group", norm_groups=8,
                         bn="every-k", bn_every=3, bn_affine_off="layer1.*").resolved()
    assert config.model_spec() == ModelSpec("resnet8", in_channels=1, num_classes=10, width=2, shortcut="A",
                                            norm="group", norm_groups=8, bn="every-k", bn_every=3,
                                            bn_affine_off="layer1.*")
    assert (TrainConfig(dataset="cifar100").model_spec().in_channels,
            TrainConfig(dataset="cifar100").model_spec().num_classes) == (3, 100)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model_spec().width = 4


def test_runs_differing_in_init_or_training_share_a_spec_and_one_model_check():
    a = TrainConfig(model="resnet8", dataset="digits", seed=1).resolved()
    b = dataclasses.replace(a, seed=2, gamma_init="ones", lr=0.5, freeze="non-bn")
    assert a.model_spec() == b.model_spec() and hash(a.model_spec()) == hash(b.model_spec())
    check._check_model.cache_clear()
    check.check_model(a)
    check.check_model(b)
    assert (check._check_model.cache_info().misses, check._check_model.cache_info().hits) == (1, 1)
    check.check_model(dataclasses.replace(a, width=2))
    assert check._check_model.cache_info().misses == 2


def test_from_config_builds_the_spec_seeded_and_initialised():
    config = TrainConfig(model="resnet8", dataset="digits", seed=5, bn_affine_off="layer1.*",
                         gamma_init="ones").resolved()
    model = from_config(config)
    built = build_model(config.model_spec())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in built.state_dict().items()}
    layers = dict(norm_layers(model))
    off = [name for name in layers if name.startswith("layer1.")]
    assert off and all(layers[name].weight is None for name in off)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for name, m in layers.items()
               if m.weight is not None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), from_config(config).state_dict().values()))
    # create_model is build_model by name
    assert create_model("resnet8", in_channels=1, width=2).state_dict().keys() == build_model(
        ModelSpec("resnet8", in_channels=1, width=2)).state_dict().keys()
