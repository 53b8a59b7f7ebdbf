"""BN variants and regularisers: --bn, --bn-every, --bn-affine-off, --gamma-l1, --bn-l2, --random-features."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.files import checkpoints, runs
from bnprobe.nets.check import check_model
from bnprobe.nets.freeze import apply_freeze, apply_random_features, norm_parameter_names, random_feature_masks
from bnprobe.nets.norms import remove_norm_affine
from bnprobe.nets.registry import create_model, from_config
from bnprobe.training.regularize import gamma_l1_step, make_optimizer
from bnprobe.training.train import train


def count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "vgg38"])
@pytest.mark.parametrize("every", [1, 2, 5])
def test_bn_every_k_convs(name, every):
    with torch.device("meta"):
        model = create_model(name, bn="every-k", bn_every=every)
        convs = count(model, nn.Conv2d)
        assert count(model, nn.BatchNorm2d) == convs // every
        assert count(create_model(name, bn="none"), nn.BatchNorm2d) == 0
        assert count(create_model(name, bn="full"), nn.BatchNorm2d) == convs


def test_models_without_bn_still_classify():
    model = create_model("resnet20", bn="none").eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(BnprobeError, match="nothing to train"):
        train(TrainConfig(model="resnet8", dataset="digits", bn="none", freeze="non-bn", epochs=1, device="cpu"),
              __import__("pathlib").Path("/nonexistent/never-written"))


def test_bn_affine_off_removes_gamma_and_beta():
    model = create_model("resnet20")
    before = sum(p.numel() for p in model.parameters())
    removed = remove_norm_affine(model, "layer3.*, bn1")
    assert removed[0].startswith("layer3.") and "bn1" in removed
    assert sum(p.numel() for p in model.parameters()) == before - 2 * (16 + 7 * 64)  # stem 16; layer3: 6 BNs + shortcut
    assert model.bn1.weight is None and not model.bn1.affine
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(BnprobeError, match="matches no norm layer"):
        remove_norm_affine(create_model("resnet20"), "layer9.*")


def test_gamma_l1_adds_the_subgradient():
    torch.manual_seed(0)
    model = create_model("resnet8")
    apply_freeze(model, "non-bn")
    config = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, gamma_l1=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    loss_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    gamma_l1_step(model, config.gamma_l1)()
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.requires_grad:  # gammas
            assert torch.allclose(p.grad, loss_grads[name] + 0.01 * torch.sign(p.detach()))
        elif p.requires_grad:  # betas untouched
            assert torch.equal(p.grad, loss_grads[name])
    assert gamma_l1_step(model, 0.0) is None


def test_bn_l2_decays_bn_tensors_more():
    model = create_model("resnet8")
    optimizer = make_optimizer(model, TrainConfig(weight_decay=1e-4, bn_l2=5e-3))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.bn1.weight)] == pytest.approx(5.1e-3)
    assert decay[id(model.bn1.bias)] == pytest.approx(5.1e-3)
    assert decay[id(model.conv1.weight)] == pytest.approx(1e-4)


def test_random_features_train_only_the_masked_elements(tmp_path):
    config = TrainConfig(model="resnet8", dataset="digits", freeze="all-but-output", random_features=2, epochs=1,
                         subset=200, test_subset=100, device="cpu", milestones="").resolved()
    initial = from_config(config).state_dict()
    train(config, tmp_path / "run")
    state = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "run"))
    masks = state["random_feature_masks"]
    model = from_config(config)
    convs = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(masks) == set(convs)
    for name, mask in masks.items():
        assert torch.equal(mask.flatten(1).sum(1), torch.full((convs[name].out_channels,), 2))
        trained, before = state["model"][name], initial[name]
        assert torch.equal(trained[~mask], before[~mask]), f"unmasked elements of {name} moved"
        assert not torch.equal(trained[mask], before[mask])
    for name in norm_parameter_names(model):  # BN gamma/beta stay at init; only fc and the masked elements train
        assert torch.equal(state["model"][name], initial[name]), name
    assert state["trainable"] == sum(int(m.sum()) for m in masks.values()) + 64 * 10 + 10


def test_random_features_need_frozen_convs():
    model = create_model("resnet8")
    masks = random_feature_masks(model, 2, torch.Generator().manual_seed(0))
    with pytest.raises(BnprobeError, match="already trains whole"):
        apply_random_features(model, masks)  # freeze 'none': every conv already trains


@pytest.mark.parametrize("changes,message", [
    (dict(bn="some"), "--bn must be one of"),
    (dict(bn="every-k", bn_every=0), "--bn-every must be >= 1"),
    (dict(bn_affine_off="nope*"), "matches no norm layer"),
    (dict(gamma_l1=-1.0), "--gamma-l1 must be >= 0"),
    (dict(random_features=1000), "exceeds"),
])
def test_variant_validation(changes, message):
    with pytest.raises(BnprobeError, match=message):
        check_model(TrainConfig(model="resnet20", dataset="digits", **changes).resolved())


def test_run_name_shows_the_bn_variant():
    assert "-bn-every5-" in TrainConfig(model="resnet20", bn="every-k", bn_every=5).resolved().run_name()
    assert "-nobn-" in TrainConfig(model="resnet20", bn="none").resolved().run_name()
