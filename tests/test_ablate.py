"""`bnprobe ablate`: sweep syntax, clamp masks, BN folding, and accuracies against an unfolded reference."""

import copy
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from probe_helpers import (
    assert_one_line_error,
    randomize_bn,
    run_cli,
    single_thread,  # noqa: F401 - autouse: one thread for tiny models
    trained_runs,
    write_model_file,
)

from bnprobe.analysis.ablate import clamp_masks, run_ablation, sweep
from bnprobe.analysis.loading import build_from_factory, load_eval_data, load_model
from bnprobe.core.errors import BnprobeError
from bnprobe.core.options import AblateOptions, LoadOptions, parse_sweep
from bnprobe.data.device import DeviceLoader
from bnprobe.nets.fold import (
    ClampableModel,
    FoldedConvBN,
    MaskedNorm,
    _pairs_by_structure,
    check_fold,
    find_conv_bn_pairs,
    fold_conv_bn,
)
from bnprobe.nets.norms import bn_layers
from bnprobe.nets.registry import create_model
from bnprobe.training.evaluate import evaluate

CPU = LoadOptions(device="cpu")


@pytest.fixture(scope="module")
def runs_dirs(tmp_path_factory):
    return trained_runs(tmp_path_factory)


# ---- the value syntax ----------------------------------------------------------------------------------


def test_sweep_syntax():
    assert parse_sweep("0.05", "--clamp-gamma") == [0.05]
    assert parse_sweep("0.1,0.01, 0.05", "--clamp-gamma") == [0.01, 0.05, 0.1]
    values = parse_sweep("0:0.2:20", "--clamp-gamma")
    assert len(values) == 20 and values[0] == 0 and values[-1] == 0.2
    np.testing.assert_allclose(values, np.linspace(0, 0.2, 20), rtol=0, atol=1e-15)
    assert parse_sweep("0,0.05,0:0.1:3", "x") == [0, 0.05, 0.1]  # mixed, de-duplicated, sorted
    assert parse_sweep("0.3:0.3:1", "x") == [0.3]
    for text, message in [("-0.1", ">= 0"), ("0:-1:3", "STOP must be >= START"), ("0:1", "START:STOP:COUNT"),
                          ("0:1:0", "COUNT"), ("a", "must be a number"), ("", "at least one"), ("nan", ">= 0")]:
        with pytest.raises(BnprobeError, match=message):
            parse_sweep(text, "--clamp-gamma")
    with pytest.raises(BnprobeError, match=r"in \[0, 1\]"):
        parse_sweep("0.5,1.5", "--clamp-fraction", upper=1.0)


@pytest.mark.parametrize("text, item", [
    ("inf", "'inf'"), ("nan", "'nan'"), ("0.1,-inf", "'-inf'"), ("Infinity", "'Infinity'"),
    ("0:inf:3", "'0:inf:3'"), ("nan:0.2:3", "'nan:0.2:3'"), ("0:0.2:inf", "'0:0.2:inf'"),
])
def test_sweep_rejects_non_finite_values_naming_the_flag_and_item(text, item):
    with pytest.raises(BnprobeError) as caught:
        parse_sweep(text, "--clamp-gamma")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--clamp-gamma") and item in message, message
    with pytest.raises(BnprobeError, match="--clamp-fraction"):
        parse_sweep(text, "--clamp-fraction", upper=1.0)


@pytest.mark.parametrize("text", ["0.1,,0.2", "0.1,", ",0.1", "0.1, ,0.2", ",", "0:0.2:3,,0.5"])
def test_sweep_rejects_empty_items(text):
    with pytest.raises(BnprobeError, match="--clamp-gamma has an empty item") as caught:
        parse_sweep(text, "--clamp-gamma")
    assert "\n" not in str(caught.value) and repr(text) in str(caught.value)


def test_sweep_errors_name_the_bad_item_not_just_the_text():
    for text, item in [("0.1,abc,0.2", "'abc'"), ("0.1,0:1,0.2", "'0:1'"), ("0.1,0:1:x", "'0:1:x'"),
                       ("0.1,-0.5", "'-0.5'"), ("0.1,0:2:3", "'0:2:3'")]:
        with pytest.raises(BnprobeError) as caught:
            parse_sweep(text, "--clamp-fraction", upper=1.0)
        assert item in str(caught.value), (text, str(caught.value))


@pytest.mark.parametrize("argv, pattern", [
    (["ablate", "--clamp-gamma", "inf"], "--clamp-gamma values must be finite and >= 0; got 'inf'"),
    (["ablate", "--clamp-gamma", "nan"], "--clamp-gamma values must be finite and >= 0; got 'nan'"),
    (["ablate", "--clamp-gamma", "0.1,,0.2"], "--clamp-gamma has an empty item in '0.1,,0.2'"),
    (["ablate", "--clamp-fraction", "0:inf:4"], "--clamp-fraction values must be finite and >= 0; got '0:inf:4'"),
    (["probe", "--taus", "0.01,inf"], "--taus values must be finite and >= 0; got 'inf'"),
    (["probe", "--taus", "0.01,,0.1"], "--taus has an empty item"),
])
def test_cli_rejects_non_finite_and_empty_values_in_one_line(capsys, tmp_path, argv, pattern):
    (tmp_path / "model.pt").write_bytes(b"")  # never read: the values are checked first
    code, _, err = run_cli(capsys, argv[0], tmp_path / "model.pt", *argv[1:], "--device", "cpu")
    assert_one_line_error(code, err, pattern)


def test_clamp_masks_threshold_and_fraction():
    gammas = [torch.tensor([0.5, -0.02, 0.2, 0.01]), torch.tensor([-1.0, 0.03, 0.3])]
    as_lists = lambda masks: [m.tolist() for m in masks]  # noqa: E731
    assert as_lists(clamp_masks(gammas, 0.0, "threshold", False)) == [[False] * 4, [False] * 3]
    assert as_lists(clamp_masks(gammas, 0.05, "threshold", False)) == [[False, True, False, True], [False, True, False]]
    # per layer: |γ| < τ * max|γ| of the layer (0.5 and 1.0 here)
    assert as_lists(clamp_masks(gammas, 0.5, "threshold", True)) == [[False, True, True, True], [False, True, True]]
    # fraction: round(p * N) smallest |γ| overall (N = 7): 0.01, -0.02, 0.03
    assert as_lists(clamp_masks(gammas, 3 / 7, "fraction", False)) == [[False, True, False, True], [False, True, False]]
    assert sum(int(m.sum()) for m in clamp_masks(gammas, 1.0, "fraction", False)) == 7
    # per layer: round(p * C_l) in each layer: p = 0.5 -> 2 of 4, 2 of 3 (1.5 rounds half up)
    assert as_lists(clamp_masks(gammas, 0.5, "fraction", True)) == [[False, True, False, True], [False, True, True]]
    ties = [torch.tensor([0.1, 0.1, 0.1, 0.1])]
    assert clamp_masks(ties, 0.5, "fraction", False)[0].tolist() == [True, True, False, False]  # earlier channel first


# ---- folding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 8, 3, padding=1, bias=False),
    nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=True, groups=2),
    nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True),  # depthwise
    nn.Conv1d(3, 5, 3),
])
def test_folded_conv_bn_equals_the_unfolded_pair(conv):
    bn = (nn.BatchNorm1d if isinstance(conv, nn.Conv1d) else nn.BatchNorm2d)(conv.out_channels)
    randomize_bn(bn)
    conv.eval()
    x = torch.randn(4, conv.in_channels, *((12,) if isinstance(conv, nn.Conv1d) else (10, 10)))
    with torch.no_grad():
        reference = bn(conv(x))
        folded = FoldedConvBN(conv, bn)
        torch.testing.assert_close(folded(x), reference, rtol=1e-5, atol=1e-5)
        # The formula, written out: W' = W γ/sqrt(var+eps), b' = β + (b - μ) γ/sqrt(var+eps)
        s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w, b = fold_conv_bn(conv, bn)
        torch.testing.assert_close(w, conv.weight * s.reshape(-1, *[1] * (conv.weight.dim() - 1)))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(s)
        torch.testing.assert_close(b, bn.bias + (bias - bn.running_mean) * s)
        # Clamping channel c on the folded weights = γ_c := 0 on the BN.
        clamped = torch.zeros(conv.out_channels, dtype=torch.bool)
        clamped[::2] = True
        folded.clamp(clamped)
        bn_clamped = copy.deepcopy(bn)
        bn_clamped.weight[clamped] = 0
        torch.testing.assert_close(folded(x), bn_clamped(conv(x)), rtol=1e-5, atol=1e-5)
        folded.clamp(None)
        torch.testing.assert_close(folded(x), reference, rtol=1e-5, atol=1e-5)


def model_zoo():
    import torchvision

    return [
        ("resnet8-A", create_model("resnet8", in_channels=1, shortcut="A"), (1, 8, 8)),
        ("resnet8-B", create_model("resnet8", in_channels=1), (1, 8, 8)),
        ("vgg14", create_model("vgg14", in_channels=1, width=1), (1, 16, 16)),
        ("resnet50", create_model("resnet50", in_channels=3), (3, 8, 8)),
        ("torchvision-resnet18", torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    ]


def test_every_model_family_folds_exactly_and_pairs_agree_with_the_structure():
    for name, model, shape in model_zoo():
        randomize_bn(model)
        pairs, how = find_conv_bn_pairs(model)
        assert how == "fx", name
        assert set(pairs) == set(_pairs_by_structure(model)), name
        assert len(pairs) == len(bn_layers(model)), name  # every BN of these nets follows a conv
        clampable = ClampableModel(model)
        assert all(layer.folded for layer in clampable.layers) and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in clampable.modules()
        ), name
        x = torch.randn(3, *shape)
        assert check_fold(model, clampable, x, rtol=1e-4) < 1e-4, name


def test_unfoldable_batchnorms_are_masked_directly_and_untraceable_models_use_the_structure():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(1)  # no conv before it
            self.block = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.block(self.bn_in(x))
            c = self.conv(h)
            h = self.bn(c) + c  # the conv output is read twice: folding would change the model
            if h.mean() > -1e9:  # data-dependent: torch.fx cannot trace this
                h = h * 1.0
            return self.fc(h.mean((2, 3)))

    model = randomize_bn(Odd())
    pairs, how = find_conv_bn_pairs(model)
    assert how == "structure" and pairs == [("block.0", "block.1")]
    clampable = ClampableModel(model)
    assert [(layer.name, layer.folded) for layer in clampable.layers] == [
        ("bn_in", False), ("block.1", True), ("bn", False)]
    x = torch.randn(5, 1, 6, 6)
    check_fold(model, clampable, x)
    masks = [torch.tensor([True]), torch.tensor([True, False, True, False]), torch.tensor([False, True, True, False])]
    clampable.clamp(masks)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for bn, mask in zip((reference.bn_in, reference.block[1], reference.bn), masks):
            bn.weight[mask] = 0
        torch.testing.assert_close(clampable(x), reference(x), rtol=1e-5, atol=1e-5)


def test_tau_zero_changes_nothing():
    model = randomize_bn(create_model("resnet8", in_channels=1))
    clampable = ClampableModel(model)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        before = clampable(x).clone()
        clampable.clamp(clamp_masks(clampable.gammas, 0.0, "threshold", False))
        assert torch.equal(clampable(x), before)
        clampable.clamp(clamp_masks(clampable.gammas, 0.0, "fraction", True))
        assert torch.equal(clampable(x), before)
        torch.testing.assert_close(before, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("zero_beta", [True, False])
def test_clamping_every_gamma_makes_every_bn_output_constant(fold, zero_beta):
    model = randomize_bn(create_model("resnet8", in_channels=1))
    clampable = ClampableModel(model, fold=fold)
    clampable.clamp(clamp_masks(clampable.gammas, 1.0, "fraction", False), zero_beta=zero_beta)
    outputs = {}
    # clone: the ReLU after each layer works in place on the very tensor the hook sees
    hooks = [layer.module.register_forward_hook(lambda m, a, out, name=layer.name: outputs.__setitem__(name, out.clone()))
             for layer in clampable.layers]
    with torch.no_grad():
        logits = clampable(torch.randn(7, 1, 8, 8) * 3)
    for hook in hooks:
        hook.remove()
    bns = dict(model.named_modules())
    assert len(outputs) == len(clampable.layers) == 9
    for name, out in outputs.items():
        expected = torch.zeros_like(bns[name].bias) if zero_beta else bns[name].bias.detach()
        # every image, every position: the channel's constant (β_c, or 0 with --zero-beta)
        torch.testing.assert_close(out, expected.reshape(1, -1, 1, 1).expand_as(out), rtol=0, atol=1e-6)
    assert torch.allclose(logits, logits[:1].expand_as(logits), atol=1e-5)  # so are the logits
    if zero_beta:
        torch.testing.assert_close(logits[0], model.fc.bias.detach())  # all zero features: just fc's bias


# ---- sweeps on a trained run -----------------------------------------------------------------------


def reference_metrics(run_dir, tau, zero_beta=False):
    """The naive way: reload the checkpoint, zero γ on the BN modules (no folding), evaluate."""
    loaded = load_model(run_dir, CPU)
    data = load_eval_data(loaded, torch.device("cpu"), test_subset=0, train_subset=10000)
    model = loaded.model
    with torch.no_grad():
        for _, bn in bn_layers(model, with_gamma=True):
            clamped = bn.weight.abs() < tau
            bn.weight[clamped] = 0
            if zero_beta:
                bn.bias[clamped] = 0
    out = {}
    for split, x, y in (("test", data.test_x, data.test_y), ("train", data.train_x, data.train_y)):
        out[f"{split}_loss"], out[f"{split}_acc"] = evaluate(model, DeviceLoader(x, y, data.mean, data.std, 97))
    return out


@pytest.mark.parametrize("zero_beta", [False, True])
def test_sweep_matches_reload_and_clamp_per_threshold(runs_dirs, tmp_path, zero_beta):
    from rich.console import Console

    run = runs_dirs["bn-only"]
    taus = [0.0, 0.05, 0.2, 0.4, 2.0]
    console = Console(record=True, width=120)
    settings = AblateOptions(mode="threshold", values=taus, zero_beta=zero_beta, batch_size=128)
    result, path = run_ablation(run, CPU, settings, out=tmp_path / "a.h5", console=console)
    n_test = 355
    for i, tau in enumerate(taus):
        reference = reference_metrics(run, tau, zero_beta)
        for split, n in (("test", n_test), ("train", 300)):
            # Folding reorders float operations: allow one image to flip on a near-tie.
            assert abs(result.metrics[f"{split}_acc"][i] - reference[f"{split}_acc"]) <= 1.01 / n, (tau, split)
            assert result.metrics[f"{split}_loss"][i] == pytest.approx(reference[f"{split}_loss"], rel=1e-4, abs=1e-5)
    assert result.metrics["test_acc"][0] == result.baseline["test_acc"]  # τ = 0: nothing changes
    assert result.evaluations == 5  # the baseline + 4 distinct clamp sets (τ = 0 is the baseline itself)

    with h5py.File(path) as f:
        assert f.attrs["format"] == "bnprobe-ablation" and f.attrs["mode"] == "threshold"
        assert bool(f.attrs["zero_beta"]) == zero_beta and f.attrs["pairing"] == "fx"
        np.testing.assert_array_equal(f["values"][:], taus)
        layers = bn_layers(load_model(run, CPU).model, with_gamma=True)
        gammas = np.concatenate([bn.weight.detach().numpy() for _, bn in layers])
        for i, tau in enumerate(taus):
            np.testing.assert_array_equal(f["masks"][i], np.abs(gammas) < tau)
            assert f["clamped"][i] == np.sum(np.abs(gammas) < tau)
        assert f["clamped"][-1] == gammas.size == f.attrs["total_channels"]
        np.testing.assert_allclose(f["delta_test_acc"][:], f["test_acc"][:] - f.attrs["baseline_test_acc"])
        assert list(f["layers/names"].asstr()[:]) == [name for name, _ in layers]
        assert f["layers/folded"][:].all() and f.attrs["train_images"] == 300

    text = console.export_text()
    assert "Clamp-to-zero ablation — bn-only: γ := 0 where |γ| < τ" in text
    assert ("zeroed too" if zero_beta else "kept: each clamped channel outputs its constant β") in text


def test_fraction_sweeps_and_no_fold_give_the_same_numbers(runs_dirs, tmp_path):
    from rich.console import Console

    quiet = Console(quiet=True)
    run = runs_dirs["full"]
    kwargs = dict(mode="fraction", values=[0.0, 0.25, 0.5], per_layer=True, measure_train=False, test_subset=200)
    folded, _ = run_ablation(run, CPU, AblateOptions(**kwargs), out=tmp_path / "a.h5", console=quiet)
    direct, _ = run_ablation(run, CPU, AblateOptions(**kwargs, fold=False), out=tmp_path / "b.h5", console=quiet)
    np.testing.assert_array_equal(folded.masks, direct.masks)
    np.testing.assert_allclose(folded.metrics["test_loss"], direct.metrics["test_loss"], rtol=1e-4)
    assert np.abs(folded.metrics["test_acc"] - direct.metrics["test_acc"]).max() <= 1.01 / 200
    assert "train_acc" not in folded.metrics
    channels = np.array(folded.layer_channels)
    np.testing.assert_array_equal(folded.clamped_per_layer[1], np.floor(0.25 * channels + 0.5))
    np.testing.assert_array_equal(folded.clamped_per_layer[2], np.floor(0.5 * channels + 0.5))


def test_sweep_with_an_unfoldable_model_on_random_data():
    model = randomize_bn(create_model("resnet8", in_channels=1, shortcut="A"))
    clampable = ClampableModel(model, fold=False)
    assert all(isinstance(layer.module, MaskedNorm) for layer in clampable.layers) and clampable.pairing == "off"
    x = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    loader = DeviceLoader(x, y, torch.tensor([[[80.0]]]), torch.tensor([[[60.0]]]), 16)
    result = sweep(clampable, [0.0, 0.5], {"test": loader})
    assert result.metrics["test_acc"][0] == result.baseline["test_acc"]
    assert result.evaluations == 2


# ---- the command -----------------------------------------------------------------------------------


def test_ablate_cli_sweep_writes_the_run_directory(capsys, runs_dirs):
    run = runs_dirs["full"]
    code, out, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0:0.3:4", "--test-subset", "100",
                             "--train-subset", "100", "--device", "cpu")
    assert code == 0, err
    assert "Clamp-to-zero ablation — full" in out and "none" in out and "Δ" in out
    assert "β of clamped channels kept" in out and "9 of 9 norm layers folded" in out
    with h5py.File(run / "ablation.h5") as f:
        assert len(f["values"]) == 4 and f.attrs["test_images"] == 100 and f.attrs["train_images"] == 100

    # A fraction sweep of the same run is kept beside the τ sweep, and the report finds both.
    code, _, err = run_cli(capsys, "ablate", run, "--clamp-fraction", "0,0.5", "--test-subset", "100",
                           "--train-subset", "100", "--device", "cpu")
    assert code == 0, err
    with h5py.File(run / "ablation.h5") as f, h5py.File(run / "ablation-fraction.h5") as g:
        assert f.attrs["mode"] == "threshold" and len(f["values"]) == 4
        assert g.attrs["mode"] == "fraction" and len(g["values"]) == 2
    from bnprobe.reporting.collect import collect

    assert sorted(a.mode for a in collect([run.parent]).ablations) == ["fraction", "threshold"]


def test_ablation_h5_records_its_options_and_versions_and_the_report_shows_them(capsys, runs_dirs, tmp_path):
    import json

    import bnprobe
    from bnprobe.reporting.collect import collect

    out = tmp_path / "results" / "ablation.h5"
    out.parent.mkdir()
    code, _, err = run_cli(capsys, "ablate", runs_dirs["full"], "--clamp-fraction", "0,0.5", "--per-layer",
                           "--no-train", "--test-subset", "50", "--device", "cpu", "--out", out)
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["version"] == 3 and f.attrs["evaluation"] == "images"
        assert list(f["labels"].asstr()[:]) == ["p=0", "p=0.5"]
        assert f.attrs["bnprobe_version"] == bnprobe.__version__ and f.attrs["torch_version"] == torch.__version__
        options = json.loads(f.attrs["options_json"])
    assert options["load"] == {**{k: None for k in ("model", "model_arg", "dataset", "data_dir", "mean", "std",
                                                       "download", "verify")}, "norm_units": "auto", "device": "cpu"}
    assert options["ablate"] == dict(mode="fraction", values=[0.0, 0.5], per_layer=True, zero_beta=False,
                                     test_subset=50, train_subset=10000, measure_train=False, batch_size=None,
                                     fold=True, dims=[], seed=0, repeats=1, outlier_factor=10.0, eval=None,
                                     text=None, tokens=20000, context=256)
    # A version-1 file, from before provenance, still reads: it just does not say what wrote it.
    with h5py.File(out, "r+") as f:
        f.attrs["version"] = 1
        for name in ("bnprobe_version", "torch_version", "options_json"):
            del f.attrs[name]
    shutil.copy(out, tmp_path / "results" / "old.h5")
    with h5py.File(out, "r+") as f:
        f.attrs.update({"version": 2, "bnprobe_version": "9.9", "torch_version": "8.8"})
    ablations = {a.name: a for a in collect([tmp_path / "results"]).ablations}
    assert ablations["ablation.h5"].written_by == "bnprobe 9.9, torch 8.8" and ablations["old.h5"].written_by == ""
    np.testing.assert_array_equal(ablations["old.h5"].values, [0.0, 0.5])


def test_foreign_checkpoint_ablation(capsys, tmp_path):
    model_file = write_model_file(tmp_path)
    model = randomize_bn(build_from_factory(f"{model_file}:small_net", ["width=4"]))
    torch.save({"net": model.state_dict()}, tmp_path / "theirs.pt")
    code, out, err = run_cli(capsys, "ablate", tmp_path / "theirs.pt", "--model", f"{model_file}:small_net",
                             "--model-arg", "width=4", "--dataset", "digits", "--clamp-fraction", "0.5",
                             "--zero-beta", "--no-train", "--device", "cpu", "--out", tmp_path / "a.h5")
    assert code == 0, err
    assert "zeroed too" in out and "2 of 2 norm layers folded" in out
    with h5py.File(tmp_path / "a.h5") as f:
        assert f["clamped"][0] == 6 and f["layers/channels"][:].tolist() == [4, 8]  # 12 channels, p = 0.5


@pytest.mark.filterwarnings("ignore:CIFAR10. only 1 of 5 training batches")
def test_cifar_copy_with_torchvision_statistics(capsys, tmp_path, shared_data):
    """The lossy CIFAR-10 copy (md5 check off) with a foreign model and 0..1 normalisation statistics."""
    model_file = write_model_file(tmp_path)
    model = randomize_bn(build_from_factory(f"{model_file}:small_net", ["in_channels=3", "width=4"]))
    torch.save(model.state_dict(), tmp_path / "cifar.pt")
    code, out, err = run_cli(
        capsys, "ablate", tmp_path / "cifar.pt", "--model", f"{model_file}:small_net", "--model-arg", "in_channels=3",
        "--model-arg", "width=4", "--dataset", "cifar10", "--data-dir", shared_data, "--no-verify", "--no-download",
        "--mean", "0.4914,0.4822,0.4465", "--std", "0.247,0.243,0.261", "--clamp-gamma", "0.3",
        "--test-subset", "300", "--no-train", "--device", "cpu", "--out", tmp_path / "c.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["test_images"] == 300 and "0..1 units" in f.attrs["normalization"]


@pytest.mark.parametrize("argv,pattern", [
    (["ablate", "{tmp}/missing.pt", "--clamp-gamma", "0.1"], "no such checkpoint"),
    (["ablate", "{tmp}/notes.txt", "--clamp-gamma", "0.1"], "is not a PyTorch checkpoint"),
    (["ablate", "{full}", "--clamp-gamma", "-0.1"], "--clamp-gamma values must be finite and >= 0; got '-0.1'"),
    (["ablate", "{full}", "--clamp-gamma=0.1,-1"], "--clamp-gamma values must be finite and >= 0; got '-1'"),
    (["ablate", "{full}", "--clamp-fraction", "1.5"], "--clamp-fraction values must be in [0, 1]"),
    (["ablate", "{full}"], "pass exactly one of --clamp-gamma"),
    (["ablate", "{full}", "--clamp-gamma", "0.1", "--clamp-fraction", "0.1"], "pass exactly one"),
    (["ablate", "{full}", "--clamp-gamma", "0.1", "--model", "{tmp}/user_models.py:small_net"], "wrong architecture"),
    (["ablate", "{full}", "--clamp-gamma", "0.1", "--model", "{tmp}/user_models.py:broken"],
     "raised ValueError: no such variant"),
    (["ablate", "{full}", "--clamp-gamma", "0.1", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["ablate", "{tmp}/notes.txt"], "pass exactly one"),
])
def test_ablate_errors_are_one_line(capsys, tmp_path, runs_dirs, argv, pattern):
    write_model_file(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    before = set(runs_dirs["full"].iterdir())
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path, full=runs_dirs["full"]) for a in argv], "--device", "cpu")
    assert_one_line_error(code, err, pattern)
    assert set(runs_dirs["full"].iterdir()) == before and not (tmp_path / "ablation.h5").exists()


def test_bn_variant_checkpoints_rebuild_probe_and_fold(tmp_path):
    """Runs with BN after every 2nd conv and some BN layers without γ/β: the trainer's own builder rebuilds
    them, only BNs with a γ are probed and clamped, and the sweep's folding still matches the model."""
    from probe_helpers import tiny_config
    from rich.console import Console

    from bnprobe.analysis.forward_probe import bn_statistics
    from bnprobe.files import runs
    from bnprobe.nets.registry import from_config

    config = tiny_config(bn="every-k", bn_every=2, bn_affine_off="layer1.*").resolved()
    model = randomize_bn(from_config(config))
    run = tmp_path / "variant"
    runs.save_checkpoint(runs.checkpoint_path(run), {
        "config": config.to_dict(), "epoch": 0, "model": model.state_dict(), "history": [],
        "normalization": {"mean": torch.full((1, 1, 1), 80.0), "std": torch.full((1, 1, 1), 90.0)},
    })
    runs.write_json(runs.config_path(run), config.to_dict())
    loaded = load_model(run, CPU)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    with_gamma = [name for name, _ in bn_layers(model, with_gamma=True)]
    every_bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert with_gamma and len(with_gamma) < len(every_bn)  # some BNs have no γ, some convs no BN
    assert not any(name.startswith("layer1.") for name in with_gamma)
    assert bn_statistics(loaded.model).names == with_gamma
    settings = AblateOptions(mode="threshold", values=[0.0, 0.5], test_subset=100, measure_train=False)
    result, _ = run_ablation(run, CPU, settings, out=tmp_path / "a.h5", console=Console(quiet=True))
    assert result.layer_names == with_gamma and result.metrics["test_acc"][0] == result.baseline["test_acc"]


def test_a_model_without_batchnorm_is_probed_but_not_ablated(capsys, tmp_path):
    from probe_helpers import tiny_config

    from bnprobe.files import runs
    from bnprobe.nets.registry import from_config

    config = tiny_config(bn="none").resolved()
    run = tmp_path / "nobn"
    runs.save_checkpoint(runs.checkpoint_path(run), {
        "config": config.to_dict(), "epoch": 0, "model": from_config(config).state_dict(), "history": [],
        "normalization": {"mean": torch.full((1, 1, 1), 80.0), "std": torch.full((1, 1, 1), 90.0)},
    })
    code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0.1", "--device", "cpu")
    assert_one_line_error(code, err, "has no norm layer (BatchNorm, GroupNorm, LayerNorm) with a γ to clamp")
    code, out, err = run_cli(capsys, "probe", run, "--images", "20", "--device", "cpu", "--out", tmp_path / "p.h5")
    assert code == 0, err
    assert "no BatchNorm layer with a γ" in out and "ReLU output sparsity" in out


@pytest.mark.parametrize("subset", [0, 300])
def test_unclamped_train_accuracy_is_the_runs_last_eval_mode_train_accuracy(tmp_path, subset):
    """Training and ablate measure train accuracy on the same fixed training images (of all, or of the run's
    --subset), so ablate's unclamped number is the history's last eval-mode one (issue 13)."""
    from probe_helpers import tiny_config
    from rich.console import Console

    from bnprobe.training.train import train

    quiet = Console(quiet=True)
    config = tiny_config(epochs=1, subset=subset, test_subset=50, train_eval_subset=150)
    history = train(config, tmp_path / "run", console=quiet)
    result, _ = run_ablation(tmp_path / "run", CPU, AblateOptions(values=[0.1], test_subset=50, train_subset=150),
                             out=tmp_path / "ablation.h5", console=quiet)
    assert result.baseline["train_acc"] == history[-1]["train_eval_acc"]
    assert result.baseline["train_loss"] == pytest.approx(history[-1]["train_eval_loss"], rel=1e-5)
    assert result.baseline["test_acc"] == history[-1]["test_acc"]
