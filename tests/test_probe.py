"""`bnprobe probe`: every number in probe.h5 against an independent computation from the raw tensors."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from probe_helpers import (
    assert_one_line_error,
    randomize_bn,
    run_cli,
    single_thread,  # noqa: F401 - autouse: one thread for tiny models
    trained_runs,
    write_model_file,
)

from bnprobe.analysis.loading import load_eval_data, load_model
from bnprobe.analysis.probe import run_probe
from bnprobe.analysis.relu import ReluRecorder, relu_inputs, relu_sparsity
from bnprobe.core.errors import BnprobeError
from bnprobe.core.options import LoadOptions, ProbeOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.files import checkpoints, runs
from bnprobe.nets.registry import create_model
from bnprobe.training.evaluate import evaluate

TAUS = [0.001, 0.01, 0.05, 0.1, 0.3]
IMAGES = 150


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Both tiny runs probed together, as `bnprobe probe full bn-only` does."""
    from rich.console import Console

    dirs = trained_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("probe") / "probe.h5"
    console = Console(record=True, width=140)
    settings = ProbeOptions(taus=TAUS, off_threshold=0.05, bins=20, images=IMAGES, batch_size=64)
    results, path = run_probe([dirs["full"], dirs["bn-only"]], LoadOptions(device="cpu"), settings, out=out,
                              console=console)
    return dirs, path, results, console.export_text()


def bn_tensors(run_dir):
    """γ, β per BN layer straight from the checkpoint's state dict (a BN is whatever has running_var)."""
    state = checkpoints.load_checkpoint(runs.checkpoint_path(run_dir))["model"]
    prefixes = [k[: -len(".running_var")] for k in state if k.endswith(".running_var")]
    return prefixes, [state[p + ".weight"].double().numpy() for p in prefixes], [state[p + ".bias"].double().numpy() for p in prefixes]


def test_gamma_beta_statistics_match_the_state_dict(probed):
    dirs, path, _, _ = probed
    with h5py.File(path) as f:
        assert f.attrs["format"] == "bnprobe-probe" and f.attrs["checkpoints"] == 2
        assert list(f["labels"].asstr()[:]) == ["full", "bn-only"]
        np.testing.assert_array_equal(f["taus"][:], TAUS)
        for index, name in enumerate(("full", "bn-only")):
            g = f[f"checkpoints/{index:03d}"]
            names, gammas, betas = bn_tensors(dirs[name])
            assert list(g["bn/names"].asstr()[:]) == names  # module order = state-dict order here
            assert g.attrs["label"] == name and g.attrs["freeze"] == ("none" if name == "full" else "non-bn")
            np.testing.assert_array_equal(g["bn/channels"][:], [len(x) for x in gammas])
            offsets = g["bn/offsets"][:]
            for layer, (gamma, beta) in enumerate(zip(gammas, betas)):
                np.testing.assert_allclose(g["bn/gamma"][offsets[layer]:offsets[layer + 1]], gamma, rtol=0, atol=0)
                np.testing.assert_allclose(g["bn/beta"][offsets[layer]:offsets[layer + 1]], beta, rtol=0, atol=0)
                for t, tau in enumerate(TAUS):
                    assert g["bn/frac_below"][layer, t] == sum(abs(v) < tau for v in gamma) / len(gamma)
                assert g["bn/off"][layer] == sum(abs(v) < 0.05 for v in gamma)
                assert g["bn/off_dead"][layer] == sum(abs(v) < 0.05 and b <= 0 for v, b in zip(gamma, beta))
                assert g["bn/mean_abs_gamma"][layer] == pytest.approx(np.mean(np.abs(gamma)))
                counts, _ = np.histogram(gamma, bins=f["gamma_edges"][:])
                np.testing.assert_array_equal(g["bn/gamma_hist"][layer], counts)
                counts, _ = np.histogram(beta, bins=f["beta_edges"][:])
                np.testing.assert_array_equal(g["bn/beta_hist"][layer], counts)
            everything = np.abs(np.concatenate(gammas))
            np.testing.assert_allclose(g["frac_below_all"][:], [np.mean(everything < t) for t in TAUS])
            assert g.attrs["bn_channels"] == everything.size == g["bn/gamma_hist"][:].sum()
            assert g.attrs["off"] == np.sum(everything < 0.05)
        # Shared edges span every γ of both checkpoints.
        all_gamma = np.concatenate([f[f"checkpoints/{i:03d}/bn/gamma"][:] for i in range(2)])
        assert f["gamma_edges"][0] == all_gamma.min() and f["gamma_edges"][-1] == all_gamma.max()


def manual_resnet8_relus(model, x):
    """Every ReLU output of a CIFAR ResNet, by writing its forward out by hand (BasicBlock: 2 per block)."""
    outputs = []
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(x)))
        outputs.append(h)
        for stage in (model.layer1, model.layer2, model.layer3):
            for block in stage:
                out = F.relu(block.bn1(block.conv1(h)))
                outputs.append(out)
                out = block.bn2(block.conv2(out))
                shortcut = block.downsample(h) if block.downsample is not None else h
                h = F.relu(out + shortcut)
                outputs.append(h)
        logits = model.fc(torch.flatten(model.avgpool(h), 1))
    return outputs, logits


def test_relu_sparsity_and_accuracy_match_a_hand_written_forward(probed):
    dirs, path, _, _ = probed
    for index, name in enumerate(("full", "bn-only")):
        loaded = load_model(dirs[name], LoadOptions(device="cpu"))
        data = load_eval_data(loaded, torch.device("cpu"), test_subset=IMAGES)
        x = (data.test_x.float() - data.mean) / data.std  # normalised independently of DeviceLoader
        acts, logits = manual_resnet8_relus(loaded.model.eval(), x)
        with h5py.File(path) as f:
            relu = f[f"checkpoints/{index:03d}/relu"]
            assert list(relu["sites"].asstr()[:]) == [
                "relu", "layer1.0.relu#1", "layer1.0.relu#2", "layer2.0.relu#1", "layer2.0.relu#2",
                "layer3.0.relu#1", "layer3.0.relu#2",
            ]
            assert list(relu["input"].asstr()[:3]) == ["bn1", "layer1.0.bn1", "add(layer1.0.bn2, relu)"]
            assert relu["input"].asstr()[4] == "add(layer2.0.bn2, layer2.0.downsample.1)"
            for site, a in enumerate(acts):
                zero = (a == 0)
                # float division vs multiplication by 1/std can move a value across 0: allow a hair of slack
                assert relu["zero_fraction"][site] == pytest.approx(zero.double().mean().item(), abs=2e-4)
                assert relu["total"][site] == a.numel() and relu["channels"][site] == a.shape[1]
                dead = int(zero.all(dim=(0, 2, 3)).sum())
                assert abs(relu["dead_channels"][site] - dead) <= 1
            g = f[f"checkpoints/{index:03d}"]
            accuracy = (logits.argmax(1) == data.test_y).double().mean().item()
            assert g.attrs["accuracy"] == pytest.approx(accuracy, abs=1.5 / IMAGES)
            loss, acc = evaluate(loaded.model, DeviceLoader(data.test_x, data.test_y, data.mean, data.std, 1000))
            assert g.attrs["accuracy"] == acc and g.attrs["loss"] == pytest.approx(loss, rel=1e-6)
            assert g.attrs["images"] == IMAGES


def test_terminal_tables_compare_bn_only_and_full(probed):
    """Every number the tables print: γ and β ones against the checkpoints' tensors, accuracy and ReLU ones
    against probe.h5 (which test_relu_sparsity_and_accuracy_match_a_hand_written_forward checks by hand)."""
    import re

    dirs, path, _, text = probed
    lines = text.splitlines()
    assert f"Wrote {path}" in text and "BatchNorm probe — comparison" in text

    def row(label: str) -> list[float]:
        """The numbers of the first table row that starts with `label`, left to right."""
        line = next(line.strip() for line in lines if line.strip().startswith(label))
        return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line[len(label):])]

    tensors = [bn_tensors(dirs[name]) for name in ("full", "bn-only")]
    gammas = [np.abs(np.concatenate(g)) for _, g, _ in tensors]
    dead = [np.sum((np.abs(np.concatenate(g)) < 0.05) & (np.concatenate(b) <= 0)) for _, g, b in tensors]
    assert row("BN layers / channels") == [9, 336, 9, 336] == [len(tensors[0][1]), gammas[0].size] * 2
    assert row("mean |γ|  (median)") == pytest.approx([x for g in gammas for x in (g.mean(), np.median(g))],
                                                      abs=5e-4)
    for tau in TAUS:
        assert row(f"|γ| < {tau:g} ") == pytest.approx([100 * np.mean(g < tau) for g in gammas], abs=0.05)
    assert row("off: |γ| < 0.05") == [np.sum(g < 0.05) for g in gammas]
    assert row("off and β ≤ 0") == dead
    with h5py.File(path) as f:
        relus = [f[f"checkpoints/{i:03d}/relu"] for i in range(2)]
        assert row("accuracy (150 test images)") == pytest.approx(
            [100 * f[f"checkpoints/{i:03d}"].attrs["accuracy"] for i in range(2)], abs=0.05)
        assert row("ReLU outputs = 0") == pytest.approx(
            [100 * r["zeros"][:].sum() / r["total"][:].sum() for r in relus], abs=0.05)
        assert row("dead ReLU channels") == [x for r in relus for x in (r["dead_channels"][:].sum(),
                                                                          r["channels"][:].sum())]
        sites = [r["sites"].asstr()[:] for r in relus]
        for site, name in enumerate(sites[0]):  # zeros % / dead channels per ReLU call, full then bn-only
            line = next(line for line in lines if line.strip().startswith(name + " "))
            shown = [float(x) for pair in re.findall(r"(\d+\.\d)% / (\d+)", line) for x in pair]
            assert shown == pytest.approx(
                [x for r in relus for x in (100 * r["zero_fraction"][site], r["dead_channels"][site])], abs=0.05)
    names = tensors[0][0]
    for layer, name in enumerate(names):  # γ by depth: mean |γ| / channels off, full then bn-only
        numbers = row(f"{layer}   {name} ")
        expected = [len(tensors[0][1][layer])] + [x for _, g, _ in tensors
                                                  for x in (np.abs(g[layer]).mean(), np.sum(np.abs(g[layer]) < 0.05))]
        assert numbers[0] == expected[0] and numbers[1:] == pytest.approx(expected[1:], abs=5e-4), name


def test_one_checkpoint_gets_per_layer_tables_and_a_default_output_in_its_run(capsys, tmp_path_factory):
    run = trained_runs(tmp_path_factory)["full"]
    code, out, err = run_cli(capsys, "probe", run, "--images", "50", "--taus", "0.01,0.1")
    assert code == 0, err
    assert "γ and β by depth — full" in out and "ReLU output sparsity — full (50 test images)" in out
    assert (run / "probe.h5").exists()
    with h5py.File(run / "probe.h5") as f:
        np.testing.assert_array_equal(f["taus"][:], [0.01, 0.1])
        assert f["checkpoints/000"].attrs["images"] == 50


def test_reused_relu_modules_count_per_invocation_in_torchvision_bottlenecks():
    """torchvision's Bottleneck calls its one `relu` three times: three sites, each with its own counts."""
    model = randomize_bn(create_model("resnet50", in_channels=3, num_classes=10))
    x = torch.randn(2, 3, 8, 8)
    with ReluRecorder(model) as recorder:
        with torch.no_grad():
            model(x)
            model(x)  # a second forward pass adds to the same sites instead of creating new ones
    sites = recorder.sites(relu_inputs(model))
    names = [s.name for s in sites]
    assert names[:4] == ["relu", "layer1.0.relu#1", "layer1.0.relu#2", "layer1.0.relu#3"]
    assert len(names) == 1 + 3 * 16 and len(set(names)) == len(names)
    inputs = {s.name: s.input for s in sites}
    assert inputs["layer1.0.relu#1"] == "layer1.0.bn1" and inputs["layer1.0.relu#2"] == "layer1.0.bn2"
    assert inputs["layer1.0.relu#3"] == "add(layer1.0.bn3, layer1.0.downsample.1)"
    assert inputs["layer1.1.relu#3"] == "add(layer1.1.bn3, layer1.0.relu)"  # fx names the block input by its producer

    # Independent: block layer1.0 written out by hand.
    block = model.layer1[0]
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        a1 = F.relu(block.bn1(block.conv1(stem)))
        a2 = F.relu(block.bn2(block.conv2(a1)))
        a3 = F.relu(block.bn3(block.conv3(a2)) + block.downsample(stem))
    by_name = {s.name: s for s in sites}
    for name, a in (("layer1.0.relu#1", a1), ("layer1.0.relu#2", a2), ("layer1.0.relu#3", a3)):
        assert by_name[name].zeros == 2 * int((a == 0).sum()) and by_name[name].total == 2 * a.numel()
        assert by_name[name].dead == int((a == 0).all(dim=(0, 2, 3)).sum())


def test_untraceable_models_still_get_sparsity():
    class Branchy(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 10)

        def forward(self, x):
            h = self.relu(self.bn(self.conv(x)))
            if h.sum() > 0:
                h = self.relu(h - 0.1)
            return self.fc(h.mean((2, 3)))

    model = randomize_bn(Branchy())
    assert relu_inputs(model) == {}
    images = torch.randint(0, 255, (20, 1, 8, 8), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(20, dtype=torch.int64), torch.tensor([[[100.0]]]), torch.tensor([[[50.0]]]), 8)
    sites, _, _, n = relu_sparsity(model, loader)
    assert [s.name for s in sites] == ["relu#1", "relu#2"] and n == 20 and all(s.input == "" for s in sites)


def test_foreign_checkpoint_through_the_cli(capsys, tmp_path):
    model_file = write_model_file(tmp_path)
    from bnprobe.analysis.loading import build_from_factory

    model = randomize_bn(build_from_factory(f"{model_file}:small_net", ["width=4"]))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "theirs.pth")
    code, out, err = run_cli(capsys, "probe", tmp_path / "theirs.pth", "--model", f"{model_file}:small_net",
                             "--model-arg", "width=4", "--dataset", "digits", "--mean", "0.3", "--std", "0.4",
                             "--images", "40", "--device", "cpu", "--out", tmp_path / "p.h5")
    assert code == 0, err
    assert "features.1" in out and "features.2" in out  # a BN layer and a ReLU site of the user's model
    with h5py.File(tmp_path / "p.h5") as f:
        g = f["checkpoints/000"]
        assert g.attrs["source"] == "factory" and "0..1 units" in g.attrs["normalization"]
        np.testing.assert_allclose(g["bn/gamma"][:4], model.features[1].weight.detach().double().numpy())


@pytest.mark.parametrize("argv,pattern", [
    (["probe", "{tmp}/missing.pt"], "no such checkpoint"),
    (["probe", "{tmp}/notes.txt"], "is not a PyTorch checkpoint"),
    (["probe", "{full}", "--taus", "-0.1"], "--taus values must be finite and >= 0; got '-0.1'"),
    (["probe", "{full}", "--taus", "0:1"], "START:STOP:COUNT"),
    (["probe", "{full}", "--off-threshold", "-1"], "--off-threshold must be >= 0"),
    (["probe", "{full}", "--model", "{tmp}/user_models.py:small_net"], "wrong architecture"),
    (["probe", "{full}", "--model", "{tmp}/user_models.py:broken"], "raised ValueError: no such variant"),
    (["probe", "{full}", "--mean", "0.1,0.2", "--std", "0.3"], "--mean needs 1 value for images with 1 channel(s), got 2"),
    (["probe", "{full}", "--dataset", "svhn"], "unknown data set 'svhn'"),
    (["probe"], "Missing argument"),
])
def test_probe_errors_are_one_line(capsys, tmp_path, tmp_path_factory, argv, pattern):
    full = trained_runs(tmp_path_factory)["full"]
    write_model_file(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    code, _, err = run_cli(capsys, *[a.format(tmp=tmp_path, full=full) for a in argv], "--device", "cpu")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "probe.h5").exists()


def test_probe_refuses_bad_numbers_in_the_library(tmp_path_factory):
    with pytest.raises(BnprobeError, match="must be >= 0"):
        run_probe([trained_runs(tmp_path_factory)["full"]], LoadOptions(device="cpu"), ProbeOptions(taus=[-1.0]))


# ---- per-layer tables at 80 columns (piped output) ------------------------------------------------------


def _synthetic_result(label="resnet8-bn-only"):
    from bnprobe.analysis.probe_results import BNStats, ProbeResult

    rng = np.random.default_rng(0)
    names = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1",
             "layer3.0.bn1", "layer3.0.bn2", "layer3.0.downsample.1"]
    gamma = [rng.uniform(-0.4, 0.4, size=c) for c in (16, 16, 16, 32, 32, 32, 64, 64, 64)]
    beta = [rng.normal(0, 0.2, size=g.size) for g in gamma]
    bn = BNStats(names, gamma, beta, [np.zeros(g.size) for g in gamma], [np.ones(g.size) for g in gamma])
    return ProbeResult(label, "x.pt", {"model": "resnet8"}, bn, [], 0.5, 0.9, 100)


def _render(tables, width):
    from io import StringIO

    from rich.console import Console

    console = Console(width=width, file=StringIO(), color_system=None)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def _assert_every_layer_number_shows(text, result, taus):
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for tau in taus:
        assert f"<{tau:g}" in text, (tau, text)
    rows = [line.split() for line in text.splitlines()]
    for i, (name, g, b) in enumerate(zip(result.bn.names, result.bn.gamma, result.bn.beta)):
        mine = [row for row in rows if len(row) > 1 and row[0] == str(i) and row[1] == name]
        assert mine, (name, text)
        cells = {cell for row in mine for cell in row}
        assert {str(g.size), f"{np.abs(g).mean():.3f}", f"{b.mean():+.3f}"} <= cells, (name, mine)
        percents = [cell for row in mine for cell in row if cell.endswith("%")]
        assert len(percents) == len(taus), (name, mine)
        for tau, cell in zip(taus, percents):
            fraction = np.mean(np.abs(g) < tau)
            assert cell == ("<1%" if 0 < fraction < 0.005 else ">99%" if 0.995 <= fraction < 1
                            else f"{100 * fraction:.0f}%"), (name, tau, cell)


@pytest.mark.parametrize("taus", [list(np.linspace(0, 0.3, 7)), list(np.linspace(0, 0.3, 13)), [0.01, 0.1]])
def test_per_layer_tables_fit_80_columns_without_cutting_numbers(taus):
    from bnprobe.analysis.probe_tables import layer_tables
    from bnprobe.core.measures import histogram_edges

    result = _synthetic_result()
    edges = histogram_edges(result.bn.gamma, 12)
    tables = layer_tables(result, taus, 0.01, edges, width=80)
    text = _render(tables, 80)
    _assert_every_layer_number_shows(text, result, taus)
    assert "γ and β by depth — resnet8-bn-only" in text
    if len(taus) == 2:
        assert len(tables) == 1  # fits: one table, as before
    # With no width limit it stays one table.
    assert len(layer_tables(result, taus, 0.01, edges, width=None)) == 1


def test_probe_piped_at_80_columns_prints_full_numbers(capsys, tmp_path_factory, tmp_path):
    """`bnprobe probe RUN --taus 0:0.3:7 | less`: rich falls back to 80 columns; nothing may be cut to '…'."""
    from io import StringIO

    from rich.console import Console

    run = trained_runs(tmp_path_factory)["full"]
    console = Console(width=80, file=StringIO(), color_system=None)
    taus = list(np.linspace(0, 0.3, 7))
    results, _ = run_probe([run], LoadOptions(device="cpu"), ProbeOptions(taus=taus, images=50, batch_size=50),
                           out=tmp_path / "probe.h5", console=console)
    text = console.file.getvalue()
    start = text.index("γ and β by depth")
    end = text.index("ReLU output sparsity")
    _assert_every_layer_number_shows(text[start:end], results[0], taus)


def test_fraction_below_counts_channels_strictly_under_tau():
    from bnprobe.core.measures import fraction_below

    rng = np.random.default_rng(0)
    gammas = [rng.normal(0, 0.1, n) for n in (7, 0, 30, 1)] + [np.array([0.05, -0.05, 0.0])]
    taus = [0.0, 0.01, 0.05, 0.2]
    # Independently: the rank of τ among the sorted |γ| (side="left": ties with τ are not below it).
    ranks = [[np.searchsorted(np.sort(np.abs(g)), t, side="left") for t in taus] for g in gammas]
    expected = np.array([[r / len(g) if len(g) else 0.0 for r in row] for g, row in zip(gammas, ranks)])
    np.testing.assert_allclose(fraction_below(gammas, taus), expected)
    sizes = np.array([len(g) for g in gammas])
    np.testing.assert_allclose(fraction_below(gammas, taus, per_layer=False), (expected * sizes[:, None]).sum(0) / sizes.sum())
    assert fraction_below([], taus).shape == (0, 4) and fraction_below([], taus, per_layer=False).tolist() == [0.0] * 4


def test_probe_h5_records_its_options_and_versions(probed):
    import json

    import bnprobe

    _, path, _, _ = probed
    with h5py.File(path) as f:
        assert f.attrs["version"] == 5
        assert f.attrs["bnprobe_version"] == bnprobe.__version__ and f.attrs["torch_version"] == torch.__version__
        options = json.loads(f.attrs["options_json"])
    assert options["probe"] == dict(taus=TAUS, off_threshold=0.05, bins=20, images=IMAGES, batch_size=64,
                                    norms="all", outlier_factor=10.0, scale_offset=None)
    assert options["load"]["device"] == "cpu" and options["load"]["model"] is None
