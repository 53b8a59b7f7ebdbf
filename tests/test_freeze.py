import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from bnprobe.core.errors import BnprobeError
from bnprobe.core.formats import FREEZE_MODES
from bnprobe.nets.freeze import apply_freeze, norm_parameter_names, output_layer_name, trainable_parameter_names
from bnprobe.nets.init import init_weights
from bnprobe.nets.registry import create_model


def bn_names_by_module_type(model):
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, _BatchNorm) for p in ("weight", "bias")}


@pytest.mark.parametrize("model_name", ["resnet20", "resnet50", "vgg14"])
def test_freeze_modes_select_the_right_tensors(model_name):
    model = create_model(model_name)
    every = {n for n, _ in model.named_parameters()}
    bn = bn_names_by_module_type(model)
    output = {n for n in every if n.startswith(output_layer_name(model) + ".")}
    assert norm_parameter_names(model) == bn
    assert output == {"fc.weight", "fc.bias"}
    assert trainable_parameter_names(model, "none") == every
    assert trainable_parameter_names(model, "non-bn") == bn
    assert trainable_parameter_names(model, "non-bn-output") == bn | output
    assert trainable_parameter_names(model, "all-but-output") == output
    assert trainable_parameter_names(model, "bn") == every - bn


def test_counts_for_bn_only_resnet20():
    trainable, total = apply_freeze(create_model("resnet20"), "non-bn")
    assert (trainable, total) == (1_568, 272_474)  # 784 BN channels (16 + 6x16 + 6x32 + 6x64 + 2 shortcuts of 32, 64), gamma and beta each


def test_unknown_mode():
    with pytest.raises(BnprobeError, match="--freeze must be one of"):
        trainable_parameter_names(create_model("resnet8"), "everything")


@pytest.mark.parametrize("mode", FREEZE_MODES)
def test_frozen_tensors_stay_bit_identical_and_get_no_gradient(mode):
    torch.manual_seed(0)
    model = init_weights(create_model("resnet8", in_channels=1))
    apply_freeze(model, mode)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    chosen = trainable_parameter_names(model, mode)
    for name, param in model.named_parameters():
        if name in chosen:
            assert not torch.equal(param, before[name]), f"{name} should have trained"
        else:
            assert param.grad is None, f"{name} is frozen but autograd computed its gradient"
            assert torch.equal(param, before[name]), f"frozen {name} changed"
