import pytest
import torch
import torch.nn as nn
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError
from bnprobe.nets.init import init_weights
from bnprobe.nets.registry import (
    check_model_name,
    create_model,
    describe_model,
    list_models,
    model_name_patterns,
    model_name_patterns_note,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_classifies_small_images(name):
    model = create_model(name, in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_resnet20_parameter_counts_match_published_numbers():
    # open_lth's cifar_resnet_20 (1x1 shortcuts) and He et al.'s 0.27M (zero-pad shortcuts)
    assert n_params(create_model("resnet20", shortcut="B")) == 272_474
    assert n_params(create_model("resnet20", shortcut="A")) == 269_722


@pytest.mark.parametrize("depth,expected_blocks", [(20, 3), (56, 9), (110, 18)])
def test_cifar_resnet_depth_counts_weight_layers(depth, expected_blocks):
    model = create_model(f"resnet{depth}", shortcut="A")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == depth
    assert len(model.layer1) == expected_blocks


def test_width_multiplier_scales_channels():
    model = create_model("resnet20", width=4)
    assert model.conv1.out_channels == 64 and model.fc.in_features == 256


@pytest.mark.parametrize("depth", [50, 152])
def test_bottleneck_resnets_are_torchvisions_with_a_cifar_stem(depth):
    reference = getattr(torchvision.models, f"resnet{depth}")(num_classes=10)
    ours = create_model(f"resnet{depth}")
    stem_difference = 64 * 3 * 7 * 7 - 64 * 3 * 3 * 3
    assert n_params(ours) == n_params(reference) - stem_difference
    assert isinstance(ours, torchvision.models.ResNet)
    assert isinstance(ours.maxpool, nn.Identity)
    out = ours.eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10)


def test_vgg38_has_38_weight_layers_each_conv_followed_by_bn():
    model = create_model("vgg38")
    modules = list(model.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    bns = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    assert (len(convs), len(linears)) == (37, 1)
    assert len(bns) == len(convs)


def test_frankle_init():
    torch.manual_seed(0)
    model = init_weights(create_model("resnet56", width=2), "uniform")
    gammas = torch.cat([m.weight for m in model.modules() if isinstance(m, _BatchNorm)])
    betas = torch.cat([m.bias for m in model.modules() if isinstance(m, _BatchNorm)])
    assert gammas.min() >= 0 and gammas.max() <= 1
    assert abs(gammas.mean().item() - 0.5) < 0.02  # U[0,1] over ~8,500 channels
    assert torch.count_nonzero(betas) == 0
    conv = model.layer2[3].conv2.weight  # 64 x 64 x 3 x 3: He normal std = sqrt(2 / fan_in)
    expected_std = (2 / (conv.shape[1] * 9)) ** 0.5
    assert abs(conv.std().item() / expected_std - 1) < 0.02
    assert abs(conv.mean().item()) < 0.05 * expected_std


@pytest.mark.parametrize("gamma_init,check", [("ones", lambda g: bool((g == 1).all())), ("normal", lambda g: abs(g.mean().item() - 1) < 0.02)])
def test_other_gamma_inits(gamma_init, check):
    model = init_weights(create_model("resnet20"), gamma_init)
    assert check(torch.cat([m.weight for m in model.modules() if isinstance(m, _BatchNorm)]))


def test_unknown_model_and_bad_options_are_clear_errors():
    with pytest.raises(BnprobeError, match="unknown model 'resnet21'"):
        check_model_name("resnet21")
    with pytest.raises(BnprobeError, match="shortcut"):
        create_model("resnet50", shortcut="A")


@pytest.mark.parametrize("convs", [25, 76, 100])
def test_models_by_number_of_conv_layers(convs):
    with torch.device("meta"):
        model = create_model(f"convs{convs}")
    main_path = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(main_path) == convs
    if convs == 100:  # ResNet-101's main path
        with torch.device("meta"):
            assert n_params(model) == n_params(create_model("resnet101"))


def test_conv_count_must_fit_bottleneck_blocks():
    from bnprobe.nets.bottleneck_resnet import stages_for_convs

    assert stages_for_convs(25) == [2, 2, 2, 2] and stages_for_convs(49) == [3, 4, 6, 3]
    with pytest.raises(BnprobeError, match="1 \\+ 3k convs"):
        stages_for_convs(26)


@pytest.mark.parametrize("depth", [38, 62, 8, 1202])
def test_any_depth_6n_plus_2_builds_a_cifar_resnet(depth):
    from bnprobe.nets.cifar_resnet import CifarResNet

    with torch.device("meta"):
        model = create_model(f"resnet{depth}", shortcut="A")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert isinstance(model, CifarResNet) and len(convs) + len(linears) == depth
    assert len(model.layer1) == (depth - 2) // 6
    assert "CIFAR ResNet" in describe_model(f"resnet{depth}")


@pytest.mark.parametrize("depth", [50, 152, 200])  # also 6n+2: the registered bottleneck ResNets keep the name
def test_registered_names_take_precedence_over_the_depth_pattern(depth):
    with torch.device("meta"):
        assert isinstance(create_model(f"resnet{depth}"), torchvision.models.ResNet)
    assert "Bottleneck" in describe_model(f"resnet{depth}")


@pytest.mark.parametrize("name", ["resnet21", "resnet2", "resnet0", "resnet038", "resnet-38", "resnet", "Resnet38"])
def test_names_outside_the_pattern_are_unknown_and_the_error_names_the_pattern(name):
    with pytest.raises(BnprobeError, match=f"unknown model '{name}'.*resnet<6n\\+2>"):
        check_model_name(name)


def test_the_pattern_is_listed_for_bnprobe_models():
    patterns = dict(model_name_patterns())
    assert "resnet<6n+2>" in patterns and "6n+2" in patterns["resnet<6n+2>"]
    note = model_name_patterns_note()
    assert "\n" not in note and "resnet<6n+2>" in note
    assert all(f"resnet{d}" in note for d in (50, 152, 200))  # the registered names it does not override
    assert "resnet38" not in list_models()  # the listing holds concrete models only; every one is built


def test_config_and_sweep_accept_a_pattern_name():
    from bnprobe.core.config import TrainConfig
    from bnprobe.sweep.cost import forward_flops

    config = TrainConfig(model="resnet38", dataset="cifar10").resolved()
    flops = {d: forward_flops(TrainConfig(model=f"resnet{d}", dataset="cifar10")) for d in (32, 38, 44)}
    assert flops[32] < flops[38] < flops[44]
    assert config.model == "resnet38"


def test_train_a_pattern_name_from_the_cli(capsys, tmp_path):
    from cli_helpers import run_cli

    code, out, err = run_cli(capsys, "train", "resnet38", "--dataset", "digits", "--epochs", "1", "--subset", "64",
                             "--test-subset", "32", "--device", "cpu", "--runs-dir", tmp_path)
    assert code == 0, err
    assert "test acc" in out


def test_bn_layers_are_every_batchnorm_in_module_order_and_with_gamma_only_the_affine_ones():
    from bnprobe.nets.norms import bn_layers, remove_norm_affine

    model = create_model("resnet8", in_channels=1, num_classes=10)
    remove_norm_affine(model, "layer1.*")
    # Independently, from the state dict: a BN layer has running statistics; one with γ also has a weight.
    keys = list(model.state_dict())
    every = [k[: -len(".running_mean")] for k in keys if k.endswith(".running_mean")]
    with_gamma = [name for name in every if f"{name}.weight" in keys]
    assert [name for name, _ in bn_layers(model)] == every
    assert [name for name, _ in bn_layers(model, with_gamma=True)] == with_gamma
    assert 0 < len(with_gamma) < len(every)
