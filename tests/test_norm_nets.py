"""GroupNorm and LayerNorm nets (`--norm group|layer`): run names and groups of BN runs unchanged, the same init
draws, the norm-only freeze, masked clamping against a direct computation, telemetry's groups, foreign models, and
probe / ablate / inspect / export / findings / report on real GN runs."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import single_thread, tiny_config  # noqa: F401 - autouse: one thread for tiny models
from scipy import stats
from test_findings import fake_run

from bnprobe.analysis.ablate import clamp_masks
from bnprobe.analysis.findings import findings_of
from bnprobe.analysis.loading import build_from_factory, load_eval_data, load_model
from bnprobe.analysis.forward_probe import bn_statistics
from bnprobe.core.config import TrainConfig, seed_group
from bnprobe.core.errors import BnprobeError
from bnprobe.core.options import LoadOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.files import checkpoints, runs
from bnprobe.nets.check import check_model
from bnprobe.nets.fold import ClampableModel, MaskedNorm, check_fold
from bnprobe.nets.freeze import norm_parameter_names, trainable_parameter_names
from bnprobe.nets.norms import norm_kind, norm_layers
from bnprobe.nets.registry import create_model, from_config
from bnprobe.sweep.plan import read_plan
from bnprobe.training.evaluate import evaluate
from bnprobe.training.telemetry import parameter_group

REPO = Path(__file__).resolve().parents[1]
CPU = LoadOptions(device="cpu")


# ---- every existing run keeps its name and its findings group -----------------------------------------------


@pytest.mark.parametrize("settings,name", [  # names computed by bnprobe at 8371f67, before --norm existed
    ({}, "resnet20-cifar10-none-s0-b22305d8"),
    ({"freeze": "non-bn", "seed": 2}, "resnet20-cifar10-non-bn-s2-e71f1490"),
    ({"model": "resnet56", "freeze": "non-bn-output", "bn": "every-k", "bn_every": 3},
     "resnet56-bn-every3-cifar10-non-bn-output-s0-37eea066"),
    ({"model": "vgg14", "dataset": "mnist", "gamma_l1": 1e-4}, "vgg14-mnist-none-s0-fa843ccc"),
    # the general spelling of a BN run is stored as BN's: the same run
    ({"freeze": "non-norm", "seed": 2}, "resnet20-cifar10-non-bn-s2-e71f1490"),
    ({"freeze": "non-bn", "seed": 2, "norm_groups": 8}, "resnet20-cifar10-non-bn-s2-e71f1490"),  # not in effect
])
def test_batchnorm_runs_keep_the_names_they_had_before_norm_existed(settings, name):
    config = TrainConfig(**{"model": "resnet20", "dataset": "cifar10", "data_dir": "/data", **settings}).resolved()
    assert config.run_name() == name


def test_old_configs_group_with_new_batchnorm_runs_and_gn_runs_say_what_they_are():
    new = TrainConfig(model="resnet8", dataset="digits", freeze="non-norm").resolved().to_dict()
    old = {k: v for k, v in new.items() if k not in ("norm", "norm_groups")}  # a config.json of an older bnprobe
    assert new["freeze"] == "non-bn" and seed_group(old) == seed_group(new)
    gn = TrainConfig(model="resnet8", dataset="digits", freeze="non-bn", norm="group").resolved()
    assert gn.freeze == "non-norm" and re.fullmatch(r"resnet8-gn16-digits-non-norm-s0-[0-9a-f]{8}", gn.run_name())
    ln = TrainConfig(model="resnet8", dataset="digits", freeze="bn", norm="layer").resolved()
    assert ln.freeze == "norm" and ln.run_name().startswith("resnet8-ln-digits-norm-s0-")
    assert seed_group(gn.to_dict()) != seed_group(new)
    assert seed_group({**gn.to_dict(), "norm": "batch", "norm_groups": 4}) == seed_group(new)  # its BN counterpart


def test_a_run_of_an_older_bnprobe_resumes(tmp_path):
    """A run written before --norm (its config and checkpoint lack norm and norm_groups) is the same run: resume
    finds its settings equal to the BN net's, in either spelling of the freeze mode."""
    from rich.console import Console

    from bnprobe.training.train import train

    config = tiny_config(freeze="non-norm").resolved()
    run = tmp_path / config.run_name()
    train(config, run, console=Console(quiet=True))
    state = checkpoints.load_checkpoint(runs.checkpoint_path(run))
    for key in ("norm", "norm_groups"):
        del state["config"][key]
    runs.save_checkpoint(runs.checkpoint_path(run), state)
    stored = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({k: v for k, v in stored.items() if k not in ("norm", "norm_groups")}))
    history = train(tiny_config(freeze="non-bn"), run, resume=True, console=Console(quiet=True))
    assert [row["epoch"] for row in history] == [1, 2]  # finished: nothing to do, its history back
    with pytest.raises(BnprobeError, match="norm: stored 'batch' vs given 'group'"):
        train(tiny_config(freeze="non-bn", norm="group"), run, resume=True)


# ---- the models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "vgg14"])
def test_norm_chooses_the_layers_and_the_bn_variants_place_them(name):
    with torch.device("meta"):
        bn = create_model(name)
        gn = create_model(name, norm="group")
        ln = create_model(name, norm="layer", bn="every-k", bn_every=2)
    kinds = lambda model: [norm_kind(m) for _, m in norm_layers(model)]  # noqa: E731
    assert set(kinds(bn)) == {"bn"} and set(kinds(gn)) == {"gn"} and set(kinds(ln)) == {"ln"}
    assert len(kinds(gn)) == len(kinds(bn)) and len(kinds(ln)) == len(kinds(bn)) // 2
    for (_, b), (_, g) in zip(norm_layers(bn), norm_layers(gn)):
        assert g.num_channels == b.num_features and g.num_groups == min(16, b.num_features)
    assert all(m.num_groups == 1 for _, m in norm_layers(ln))
    assert norm_parameter_names(gn) == norm_parameter_names(bn)  # the same names, so the same γ/β count


def test_gn_takes_the_init_draws_of_bn_gamma_uniform_beta_zero():
    bn = from_config(TrainConfig(model="resnet8", dataset="digits", seed=3)).state_dict()
    gn = from_config(TrainConfig(model="resnet8", dataset="digits", seed=3, norm="group")).state_dict()
    assert set(gn) < set(bn)  # BN has running statistics besides
    for name, tensor in gn.items():
        assert torch.equal(tensor, bn[name]), name
    gammas = torch.cat([m.weight for _, m in norm_layers(from_config(
        TrainConfig(model="resnet8", dataset="digits", norm="layer")))])
    assert 0 <= gammas.min() and gammas.max() <= 1 and gammas.std() > 0.2  # U[0, 1]


@pytest.mark.parametrize("changes,message", [
    (dict(norm="instance"), "--norm must be one of batch, group, layer; got 'instance'"),
    (dict(norm="group", norm_groups=3), "--norm-groups 3 does not divide a layer's 16 channels"),
    (dict(norm="group", norm_groups=0), "--norm-groups must be >= 1"),
    (dict(norm="group", bn="none"), "--norm group chooses the norm layers, but --bn none places none"),
    (dict(norm="layer", sync_bn=True), "--sync-bn synchronises BatchNorm's batch statistics; --norm layer has none"),
    (dict(norm="group", bn_affine_off="nope*"), "matches no norm layer"),
])
def test_norm_settings_are_checked_in_one_line(capsys, tmp_path, changes, message):
    with pytest.raises(BnprobeError, match=re.escape(message)):
        check_model(TrainConfig(model="resnet20", dataset="digits", **changes).resolved())
    flags = [x for k, v in changes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    flags = [f for f in flags if f not in ("True",)]  # --sync-bn is a switch
    code, _, err = run_cli(capsys, "train", "resnet20", "--dataset", "digits", *flags, "--runs-dir", tmp_path)
    assert_one_line_error(code, err, message)


def test_norm_only_freeze_and_the_regularisers_act_on_the_norm_layers():
    from bnprobe.training.regularize import gamma_l1_step, make_optimizer

    model = create_model("resnet8", norm="group")
    gn = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.GroupNorm) for p in ("weight", "bias")}
    every = {n for n, _ in model.named_parameters()}
    for bn_spelling, general, expected in (("non-bn", "non-norm", gn), ("bn", "norm", every - gn),
                                           ("non-bn-output", "non-norm-output", gn | {"fc.weight", "fc.bias"})):
        assert trainable_parameter_names(model, bn_spelling) == trainable_parameter_names(model, general) == expected
    optimizer = make_optimizer(model, TrainConfig(weight_decay=1e-4, bn_l2=5e-3))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.bn1.weight)] == pytest.approx(5.1e-3) and decay[id(model.conv1.weight)] == 1e-4
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    gamma_l1_step(model, 0.01)()
    assert torch.equal(model.bn1.weight.grad, 0.01 * torch.sign(model.bn1.weight.detach()))
    assert not model.bn1.bias.grad.any()


# ---- clamping γ of GroupNorm/LayerNorm: masked on the layer, checked against a direct computation --------------


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in norm_layers(model, with_gamma=True):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 - 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.3)
    return model.eval()


@pytest.mark.parametrize("zero_beta", [False, True])
def test_a_masked_group_norm_is_the_group_norm_formula_with_gamma_zeroed(zero_beta):
    layer = randomize_norms(nn.Sequential(nn.GroupNorm(4, 8)))[0]
    x = torch.randn(3, 8, 5, 5) * 2 + 1
    clamped = torch.tensor([True, False, False, True, True, False, False, False])
    masked = MaskedNorm(layer)
    masked.clamp(clamped, zero_beta)
    # by hand: each sample's mean and (biased) variance over its group of 2 channels and every position
    groups = x.reshape(3, 4, 2 * 25)
    normed = ((groups - groups.mean(2, keepdim=True)) / torch.sqrt(groups.var(2, unbiased=False, keepdim=True)
                                                                   + layer.eps)).reshape(3, 8, 5, 5)
    gamma = torch.where(clamped, 0.0, layer.weight.detach())
    beta = torch.where(clamped & zero_beta, 0.0, layer.bias.detach())
    expected = normed * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), expected, rtol=1e-5, atol=1e-5)
    masked.clamp(None)
    with torch.no_grad():
        torch.testing.assert_close(masked(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("mode,per_layer", [("threshold", False), ("fraction", True), ("fraction", False)])
def test_clamping_a_gn_net_equals_the_net_with_gamma_zeroed_by_hand(norm, mode, per_layer):
    model = randomize_norms(create_model("resnet8", in_channels=1, norm=norm))
    clampable = ClampableModel(model)
    assert not any(layer.folded for layer in clampable.layers) and len(clampable.layers) == 9  # nothing folds
    x = torch.randn(6, 1, 8, 8)
    assert check_fold(model, clampable, x) == 0.0
    masks = clamp_masks(clampable.gammas, 0.5, mode, per_layer)
    assert 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)
    for zero_beta in (False, True):
        clampable.clamp(masks, zero_beta)
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for (_, m), mask in zip(norm_layers(reference, with_gamma=True), masks):
                m.weight[mask] = 0
                if zero_beta:
                    m.bias[mask] = 0
            torch.testing.assert_close(clampable(x), reference(x), rtol=1e-5, atol=1e-5)


def test_every_gamma_clamped_makes_every_gn_output_its_beta():
    model = randomize_norms(create_model("resnet8", in_channels=1, norm="group"))
    clampable = ClampableModel(model)
    clampable.clamp(clamp_masks(clampable.gammas, 1.0, "fraction", False))
    outputs = {}
    hooks = [layer.module.register_forward_hook(lambda m, a, out, name=layer.name: outputs.__setitem__(name, out.clone()))
             for layer in clampable.layers]
    with torch.no_grad():
        clampable(torch.randn(7, 1, 8, 8) * 3)
    for hook in hooks:
        hook.remove()
    norms = dict(model.named_modules())
    for name, out in outputs.items():  # every image, every position: the channel's β
        beta = norms[name].bias.detach().reshape(1, -1, 1, 1)
        torch.testing.assert_close(out, beta.expand_as(out), rtol=0, atol=1e-6)


FOREIGN_MODELS = '''
import torch.nn as nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of each position (ConvNeXt's)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def gn_ln_net(width=4):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(2, width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), LayerNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.LayerNorm([2 * width, 8, 8]), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
'''


def test_a_foreign_model_with_group_and_layer_norms_is_ablated_like_a_reference(capsys, tmp_path):
    (tmp_path / "theirs.py").write_text(FOREIGN_MODELS)
    factory = f"{tmp_path / 'theirs.py'}:gn_ln_net"
    model = randomize_norms(build_from_factory(factory, []))
    torch.save(model.state_dict(), tmp_path / "theirs.pt")
    code, out, err = run_cli(capsys, "ablate", tmp_path / "theirs.pt", "--model", factory, "--dataset", "digits",
                             "--clamp-gamma", "0.3,0.9", "--zero-beta", "--device", "cpu", "--out", tmp_path / "a.h5")
    assert code == 0, err
    assert "0 of 3 norm layers folded" in " ".join(out.split())
    with h5py.File(tmp_path / "a.h5") as f:
        assert [n.decode() for n in f["layers/names"][:]] == ["1", "4", "7"]
        assert f["layers/channels"][:].tolist() == [4, 8, 8 * 8 * 8]  # a LayerNorm's γ: one per element
        results = {tau: (f["test_acc"][i], f["test_loss"][i], f["clamped"][i]) for i, tau in enumerate(f["values"][:])}
    loaded = load_model(tmp_path / "theirs.pt", LoadOptions(device="cpu", model=factory, dataset="digits"))
    data = load_eval_data(loaded, torch.device("cpu"), test_subset=0)
    for tau, (acc, loss, clamped) in results.items():
        reference = copy.deepcopy(loaded.model)
        with torch.no_grad():
            zeroed = 0
            for _, m in norm_layers(reference, with_gamma=True):
                mask = m.weight.abs() < tau
                m.weight[mask], m.bias[mask] = 0, 0
                zeroed += int(mask.sum())
        ref_loss, ref_acc = evaluate(reference, DeviceLoader(data.test_x, data.test_y, data.mean, data.std, 97))
        assert zeroed == clamped and acc == pytest.approx(ref_acc) and loss == pytest.approx(ref_loss, rel=1e-4)
    code, out, err = run_cli(capsys, "probe", tmp_path / "theirs.pt", "--model", factory, "--dataset", "digits",
                             "--brief", "--device", "cpu", "--out", tmp_path / "p.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "p.h5") as f:
        [group] = f["checkpoints"].values()
        assert group["bn/channels"][:].tolist() == [4, 8, 512]


def test_forward_probe_lists_every_norm_layer():
    model = randomize_norms(build_from_factory_text(FOREIGN_MODELS, "gn_ln_net"))
    stats = bn_statistics(model)
    assert stats.names == ["1", "4", "7"] and stats.channels.tolist() == [4, 8, 512]
    np.testing.assert_array_equal(stats.gamma[0], model[1].weight.detach().double().numpy())
    # GroupNorm keeps no running statistics (NaN, as for every layer without them); its kind says what it is
    assert np.isnan(stats.running_mean[0]).all() and stats.kinds == ["LayerNorm/GroupNorm-like"] * 3


def build_from_factory_text(text: str, name: str) -> nn.Module:
    namespace: dict = {}
    exec(compile(text, "<models>", "exec"), namespace)  # noqa: S102 - the test's own model code
    return namespace[name]()


def test_telemetry_groups_name_the_norm():
    assert parameter_group(create_model("resnet8", norm="group"), "bn1.weight") == "gn_gamma"
    assert parameter_group(create_model("resnet8", norm="layer"), "layer1.0.bn2.bias") == "ln_beta"
    assert parameter_group(create_model("resnet8"), "bn1.weight") == "bn_gamma"
    assert parameter_group(build_from_factory_text(FOREIGN_MODELS, "gn_ln_net"), "4.weight") == "ln_gamma"


# ---- real GN runs: train, probe, ablate, inspect, export, findings, report ----------------------------------


@pytest.fixture(scope="module")
def gn_runs(tmp_path_factory):
    """resnet8 on digits: GN-only (through the CLI, as `--freeze non-bn`) and BN-only, two seeds each."""
    from rich.console import Console

    from bnprobe.training.train import train

    root = tmp_path_factory.mktemp("gn-runs")
    for seed in (0, 1):
        for norm in ("group", "batch"):
            config = tiny_config(freeze="non-bn", lr=0.2, norm=norm, seed=seed).resolved()
            train(config, root / config.run_name(), console=Console(quiet=True))
    return root


def test_train_gn_only_from_the_cli_leaves_every_frozen_tensor_bit_identical(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "resnet20", "--norm", "group", "--freeze", "non-bn", "--dataset",
                             "digits", "--epochs", "1", "--subset", "256", "--test-subset", "100", "--milestones", "",
                             "--train-eval-subset", "100", "--device", "cpu", "--runs-dir", tmp_path)
    assert code == 0, err
    [run] = list(tmp_path.iterdir())
    assert re.fullmatch(r"resnet20-gn16-digits-non-norm-s0-[0-9a-f]{8}", run.name) and "GN16" in out
    config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    initial = from_config(config)
    gn = {f"{n}.{p}" for n, m in initial.named_modules() if isinstance(m, nn.GroupNorm) for p in ("weight", "bias")}
    trained = checkpoints.load_checkpoint(runs.checkpoint_path(run))["model"]
    assert trained["bn1.weight"].shape == (16,) and "bn1.running_mean" not in trained
    for name, tensor in initial.state_dict().items():
        if name in gn:
            assert not torch.equal(trained[name], tensor), f"{name} should have trained"
        else:
            assert torch.equal(trained[name], tensor), f"frozen {name} changed"
    with h5py.File(run / "telemetry.h5") as f:
        groups = set(f["params/group"].asstr()[:])
        assert groups == {"gn_gamma", "gn_beta", "conv_weight", "linear_weight", "bias"}
        assert not f["steps/groups/gn_gamma"].attrs["frozen"] and f["steps/groups/conv_weight"].attrs["frozen"]
        np.testing.assert_array_equal(f["bn/layer3.0.bn2/gamma"][-1], trained["layer3.0.bn2.weight"].numpy())


def test_probe_ablate_inspect_and_export_a_gn_run(capsys, gn_runs, tmp_path):
    [run] = [r for r in gn_runs.iterdir() if "-gn16-" in r.name and "-s0-" in r.name]
    code, out, err = run_cli(capsys, "probe", run, "--brief", "--device", "cpu", "--out", tmp_path / "p.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "p.h5") as f:
        [group] = f["checkpoints"].values()
        assert group["bn/channels"][:].sum() == 2 * 16 + 2 * 32 + 2 * 64 + 32 + 64 + 16  # every GN layer
    code, out, err = run_cli(capsys, "ablate", run, "--clamp-fraction", "0.5", "--per-layer", "--zero-beta",
                             "--device", "cpu")
    assert code == 0, err
    assert "0 of 9 norm layers folded" in " ".join(out.split())
    with h5py.File(run / "ablation-fraction.h5") as f:
        assert f["clamped_per_layer"][0].tolist() == [8, 8, 8, 16, 16, 16, 32, 32, 32]
    code, out, err = run_cli(capsys, "inspect", run)
    assert code == 0 and "gn_gamma" in out and "gn_beta" in out and "non-norm" in out
    code, out, err = run_cli(capsys, "export", run, "-o", tmp_path / "gn.safetensors", "--compact")
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", tmp_path / "gn.safetensors")
    assert code == 0 and "resnet8 (GN16) / digits / non-norm" in out and "SHA-256 matches" in out
    code, out, err = run_cli(capsys, "probe", tmp_path / "gn.safetensors", "--brief", "--device", "cpu",
                             "--out", tmp_path / "p2.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "p.h5") as a, h5py.File(tmp_path / "p2.h5") as b:
        [ga], [gb] = a["checkpoints"].values(), b["checkpoints"].values()
        np.testing.assert_array_equal(ga["bn/gamma"][:], gb["bn/gamma"][:])  # the compact file is the run


def test_findings_compare_gn_only_with_bn_only_at_equal_depth_and_the_report_says_gn(capsys, gn_runs, tmp_path):
    code, out, err = run_cli(capsys, "findings", gn_runs, "--json", tmp_path / "f.json")
    assert code == 0, err
    stored = json.loads((tmp_path / "f.json").read_text())
    [finding] = [f for f in stored["findings"] if f["kind"] == "GN-only vs BN-only"]
    assert finding["title"] == ("resnet8 digits non-norm GN16 vs resnet8 digits non-bn "
                                "(equal depth: both resnet8)")
    by_label = {g["label"]: g for g in stored["groups"]}
    accuracy = {label: [json.loads((gn_runs / name / "metrics.json").read_text())[-1]["test_acc"]
                        for name in by_label[label]["runs"]] for label in by_label}
    gn, bn = accuracy["resnet8 digits non-norm GN16"], accuracy["resnet8 digits non-bn"]
    row = finding["rows"][0]
    assert row["metric"] == "test accuracy" and row["labels"] == ["GN16-only", "BN-only"]
    assert row["difference"]["mean"] == pytest.approx(np.mean(gn) - np.mean(bn))
    assert row["p"] == pytest.approx(stats.ttest_rel(gn, bn).pvalue)
    code, out, err = run_cli(capsys, "report", gn_runs, "-o", tmp_path / "r.html")
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert "GN16&nbsp;full" in html and "freeze-non-norm" in html and "GN-only vs BN-only" in html


def test_synthetic_ln_only_against_bn_only_and_old_bn_runs():
    ln = [fake_run(s, [0.5, a], norm="layer", freeze="non-norm", model="resnet14") for s, a in enumerate((.6, .62, .58))]
    old = [fake_run(s, [0.5, a], freeze="non-bn", model="resnet14") for s, a in enumerate((.7, .75, .72))]
    for run in old:  # config.json of a bnprobe from before --norm
        del run.config["norm"], run.config["norm_groups"]
    other = [fake_run(0, [0.5, 0.8], freeze="non-bn", model="resnet20")]  # another depth: never the counterpart
    [finding] = [f for f in findings_of(ln + old + other).findings if "vs BN" in f.kind]
    assert finding.kind == "LN-only vs BN-only" and finding.title.endswith("(equal depth: both resnet14)")
    row = finding.rows[0]
    assert row.difference.mean == pytest.approx(np.mean([.6, .62, .58]) - np.mean([.7, .75, .72]))
    assert row.p == pytest.approx(stats.ttest_rel([.6, .62, .58], [.7, .75, .72]).pvalue)


def test_gn_gradients_against_the_conv_weights():
    grads = [{"gn_gamma": np.array([4.0, 6.0]), "gn_beta": np.array([2.0, 4.0]), "conv_weight": np.array([1.0, 1.0])},
             {"gn_gamma": np.array([3.0, 3.0]), "gn_beta": np.array([1.0, 3.0]), "conv_weight": np.array([0.5, 1.5])}]
    full = [fake_run(s, [0.5, 0.6], grads=g, norm="group", norm_groups=8) for s, g in enumerate(grads)]
    [finding] = [f for f in findings_of(full).findings if f.kind.startswith("gradient magnitude")]
    assert finding.kind == "gradient magnitude, GN vs conv" and finding.title == "resnet20 digits none GN8"
    gamma, beta = finding.rows
    assert gamma.metric == "mean |grad| of GN γ / conv weights" and gamma.a.mean == pytest.approx((5 + 3) / 2)
    assert beta.metric == "mean |grad| of GN β / conv weights" and beta.a.mean == pytest.approx((3 + 2) / 2)
    assert beta.p == pytest.approx(stats.ttest_1samp([3, 2], 1.0).pvalue)


def test_the_seed_plans_optional_norm_grid(tmp_path):
    text = (REPO / "examples" / "seed-plan.toml").read_text()
    block = text[text.index("# Optional: GroupNorm"):]
    enabled = text.replace(block, "".join(line.removeprefix("# ") + "\n" if line.startswith("# [[grid]]") or
                                          re.match(r"# \w+ = ", line) else line + "\n"
                                          for line in block.splitlines()))
    (tmp_path / "plan.toml").write_text(enabled)
    planned = read_plan(tmp_path / "plan.toml", tmp_path / "runs")
    assert len(planned) == 222 + 7 * 2 * 3
    names = {p.run_dir.name for p in planned}
    others = [p.config for p in planned if p.config.norm != "batch"]
    assert {c.model for c in others} == {f"resnet{d}" for d in (14, 32, 56, 110, 218, 434, 866)}
    for config in others:  # each with the BN-only run of equal depth and seed in the plan
        assert config.freeze == "non-norm"
        bn = TrainConfig(**{**config.to_dict(), "norm": "batch", "freeze": "non-bn"}).resolved()
        assert bn.run_name() in names


def test_the_training_page_quotes_its_norm_comparison_from_the_findings_file(tmp_path):
    """docs/training.md's BN-only vs GN-only section, against docs/norms-cpu.findings.json (bnprobe findings' own)."""
    from bnprobe.analysis.findings_output import show
    from bnprobe.analysis.seed_statistics import Estimate

    findings = json.loads((REPO / "docs" / "norms-cpu.findings.json").read_text())
    section = (REPO / "docs" / "training.md").read_text().split("## BN-only vs GN-only on two CPU cores\n", 1)[1]
    text = " ".join(section.split("\n## ", 1)[0].split())
    planned = read_plan(REPO / "examples" / "norms-cpu.toml", tmp_path)  # the plan those runs came from
    assert sorted(p.run_dir.name for p in planned) == sorted(run for g in findings["groups"] for run in g["runs"])
    compared = [f for f in findings["findings"] if f["kind"] == "GN-only vs BN-only"]
    assert [f["title"].split(" (")[0].split()[0] for f in compared] == ["resnet8", "resnet20"]
    for finding in compared:
        [accuracy] = [row for row in finding["rows"] if row["metric"] == "test accuracy"]
        assert accuracy["sentence"] in text
    differences = [f"{-row['difference']['mean'] * 100:.1f}" for f in compared for row in f["rows"][:1]]
    assert f"({differences[0]} and {differences[1]} points lower" in text
    for group in findings["groups"]:
        summary = {name: Estimate(**value) for name, value in group["summary"].items()}
        row = " ".join(show(summary[name], "pct", n=False) for name in ("test accuracy", "gap (train − test accuracy)"))
        assert row in text, row
    train_loss = {g["label"]: f"{g['summary']['train loss']['mean']:.2f}" for g in findings["groups"]}
    assert (f"ended at {train_loss['resnet8 cifar10 non-norm GN16']} and {train_loss['resnet20 cifar10 non-norm GN16']}"
            in text)
    assert train_loss["resnet8 cifar10 non-bn"] == train_loss["resnet20 cifar10 non-bn"]
    assert f"BN-only's at {train_loss['resnet8 cifar10 non-bn']} for both depths" in text
