"""`bnprobe probe FILE` with no other argument: the checkpoints users meet, built with the real libraries, and
every number checked against numpy on the raw tensors of the file."""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from probe_helpers import (
    assert_one_line_error,
    randomize_bn,
    run_cli,
    single_thread,  # noqa: F401 - autouse: one thread for tiny models
    trained_runs,
    write_model_file,
)

from bnprobe.analysis.static import BN_TENSORS
from bnprobe.files import checkpoints

TAUS = [0.001, 0.01, 0.05, 0.1, 0.3]
OFF = 0.05
AKAMASTER = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "akamaster_resnet32-d509ac18.th"


def resnet(depth: int, seed: int = 0) -> nn.Module:
    model = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](weights=None)
    model = randomize_bn(model, seed)
    with torch.no_grad():  # some γ exactly 0 and tiny, as a trained sparse network has
        model.bn1.weight[:5] = 0.0
        model.layer1[0].bn1.weight[:3] = torch.tensor([1e-4, -2e-3, 0.02])
    return model


def expected(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """γ, β per BN layer of a plain state dict, by the definition: a prefix with running_var and a weight."""
    prefixes = [k[: -len(".running_var")] for k in state if k.endswith(".running_var")]
    return {p: (state[p + ".weight"].double().numpy(), state[p + ".bias"].double().numpy())
            for p in prefixes if p + ".weight" in state}


def probe(capsys, tmp_path, *files, extra=()):
    out = tmp_path / "probe.h5"
    code, stdout, err = run_cli(capsys, "probe", *files, "--taus", ",".join(map(str, TAUS)), "--off-threshold",
                                OFF, "--out", out, "--device", "cpu", *extra)
    assert code == 0, err
    return out, stdout


def check_against(group: h5py.Group, f: h5py.File, layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every number of one checkpoint's group against numpy on the raw tensors."""
    assert list(group["bn/names"].asstr()[:]) == list(layers)
    gammas = [g for g, _ in layers.values()]
    np.testing.assert_array_equal(group["bn/channels"][:], [g.size for g in gammas])
    offsets = group["bn/offsets"][:]
    for index, (gamma, beta) in enumerate(layers.values()):
        np.testing.assert_array_equal(group["bn/gamma"][offsets[index]:offsets[index + 1]], gamma)
        np.testing.assert_array_equal(group["bn/beta"][offsets[index]:offsets[index + 1]], beta)
        np.testing.assert_array_equal(group["bn/frac_below"][index], [np.mean(np.abs(gamma) < t) for t in TAUS])
        assert group["bn/off"][index] == np.sum(np.abs(gamma) < OFF)
        assert group["bn/off_dead"][index] == np.sum((np.abs(gamma) < OFF) & (beta <= 0))
        np.testing.assert_array_equal(group["bn/gamma_hist"][index], np.histogram(gamma, bins=f["gamma_edges"][:])[0])
        np.testing.assert_array_equal(group["bn/beta_hist"][index], np.histogram(beta, bins=f["beta_edges"][:])[0])
    everything = np.abs(np.concatenate(gammas))
    np.testing.assert_array_equal(group["frac_below_all"][:], [np.mean(everything < t) for t in TAUS])
    assert group.attrs["bn_layers"] == len(layers) and group.attrs["bn_channels"] == everything.size
    assert group.attrs["off"] == np.sum(everything < OFF)
    assert group.attrs["mean_abs_gamma"] == pytest.approx(everything.mean())
    # No forward pass: marked as such, and nothing measured on data is in the file.
    assert group.attrs["source"] == "file" and not group.attrs["forward_pass"] and "relu" not in group
    assert not {"accuracy", "loss", "images", "zero_fraction", "dead_channels"} & set(group.attrs)


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


# Each: how the user's file holds the model, its name, the prefix the probe strips, where the state dict sits.
CHECKPOINTS = {
    "bare resnet18 (torchvision)": (lambda m: m.state_dict(), "resnet18.pth", "none", "(top level)"),
    "DataParallel around torch.compile": (
        lambda m: {"epoch": 3, "model_state_dict": nn.DataParallel(torch.compile(m)).state_dict(),
                   "best_acc": 0.9}, "ddp.pt", "module.,_orig_mod.", "model_state_dict"),
    "Lightning-style": (
        lambda m: {"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.4.0",
                   "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                   "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
                   "lr_schedulers": [], "hyper_parameters": {"lr": 0.1}}, "lit.ckpt", "model.", "state_dict"),
    "legacy format with an EMA copy": (
        lambda m: {"ema": m.state_dict(), "step": 10}, "ema.th", "none", "ema"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_checkpoints_users_meet_are_probed_from_the_file_alone(capsys, tmp_path, case):
    make, name, stripped, where = CHECKPOINTS[case]
    model = resnet(18)
    legacy = name.endswith(".th")
    torch.save(make(model), tmp_path / name, _use_new_zipfile_serialization=not legacy)
    out, stdout = probe(capsys, tmp_path, tmp_path / name)
    with h5py.File(out) as f:
        assert f.attrs["version"] == 5 and f.attrs["device"] == "none"  # 5: recurring off dims
        assert "images" not in f.attrs  # no forward pass: --images applied to nothing
        g = f["checkpoints/000"]
        check_against(g, f, expected(model.state_dict()))
        assert g.attrs["stripped_prefixes"] == stripped and g.attrs["state_dict_key"] == where
        assert g.attrs["file_format"] == ("torch legacy" if legacy else "torch zip") and g.attrs["layer_order"] == "file"
    assert "layer4.1.bn2" in stdout and "no forward pass" in stdout and "the file's order" in stdout
    assert "ReLU output sparsity" not in stdout


def test_resnet50_and_its_safetensors_copy_side_by_side(capsys, tmp_path):
    model = resnet(50, seed=1)
    state = model.state_dict()
    torch.save(state, tmp_path / "resnet50.pth")
    save_safetensors(state, tmp_path / "resnet50.safetensors")
    out, stdout = probe(capsys, tmp_path, tmp_path / "resnet50.pth", tmp_path / "resnet50.safetensors")
    layers = expected(state)
    with h5py.File(out) as f:
        assert list(f["labels"].asstr()[:]) == ["resnet50 (1)", "resnet50 (2)"]
        check_against(f["checkpoints/000"], f, layers)
        st = f["checkpoints/001"]
        assert st.attrs["file_format"] == "safetensors" and st.attrs["layer_order"] == "names"
        # safetensors keeps no order; natural order of the names is torchvision's registration order here
        check_against(st, f, layers)
    assert "comparison" in stdout and "natural order of their names" in stdout


def test_the_real_foreign_checkpoint(capsys, tmp_path):
    if not AKAMASTER.is_file():
        pytest.skip(f"{AKAMASTER} not found (see shared/models/README.md)")
    state = torch.load(AKAMASTER, map_location="cpu", weights_only=True)["state_dict"]
    layers = expected({k.removeprefix("module."): v for k, v in state.items()})
    assert len(layers) == 31 and sorted({g.size for g, _ in layers.values()}) == [16, 32, 64]
    out, stdout = probe(capsys, tmp_path, AKAMASTER)
    with h5py.File(out) as f:
        g = f["checkpoints/000"]
        check_against(g, f, layers)
        assert g.attrs["stripped_prefixes"] == "module." and g.attrs["tensors"] == len(state)
    assert "31 / 1,136" in stdout


def test_bn_without_affine_is_reported_as_statistics_only(capsys, tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1),
                                       nn.BatchNorm2d(6, affine=False), nn.Conv2d(6, 5, 1), nn.BatchNorm1d(5)))
    torch.save(model.state_dict(), tmp_path / "mixed.pt")
    out, stdout = probe(capsys, tmp_path, tmp_path / "mixed.pt")
    with h5py.File(out) as f:
        g = f["checkpoints/000"]
        check_against(g, f, expected(model.state_dict()))
        assert list(g["bn/names"].asstr()[:]) == ["1", "5"]
        assert list(g["bn/stats_only_names"].asstr()[:]) == ["3"] and list(g["bn/stats_only_channels"][:]) == [6]
        assert g.attrs["bn_stats_only_layers"] == 1
    assert "1 BN layer(s) without affine (running statistics only" in stdout


@pytest.mark.parametrize("gamma, note", [
    (torch.ones(0), None),  # a layer of no channels: three raw numpy warnings
    (torch.tensor([float("inf"), 1.0, 0.0]), "1 non-finite γ or β value(s) (inf or nan), left out of the histograms"),
])
def test_an_empty_or_infinite_gamma_is_probed_without_numpy_warnings(capsys, tmp_path, gamma, note):
    # issue 21 (14): an inf γ printed "invalid value encountered in multiply" and the caption lost its range
    import warnings

    n = len(gamma)
    torch.save({"bn.weight": gamma, "bn.bias": torch.zeros(n), "bn.running_mean": torch.zeros(n),
                "bn.running_var": torch.ones(n)}, tmp_path / "odd.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the command, shown or not
        out, stdout = probe(capsys, tmp_path, tmp_path / "odd.pt")
    flat = " ".join(stdout.split())
    assert (note in flat) if note else "non-finite" not in flat
    with h5py.File(out) as f:
        edges = f["gamma_edges"][:]
        counted = f["checkpoints/000/bn/gamma_hist"][0].sum()
        assert np.isfinite(edges).all() and counted == int(torch.isfinite(gamma).sum())


HOSTILE = "bn\x1b[31mRED\nnext"  # an escape sequence and a newline in a tensor's name


def test_names_from_a_file_reach_the_terminal_escaped(capsys, tmp_path):
    # issue 21 (13): the name reached the terminal raw, an escape sequence that recoloured it and a line break
    from safetensors.torch import save_file

    bn = {f"{HOSTILE}.{leaf}": torch.ones(4) for leaf in ("weight", "bias", "running_mean", "running_var")}
    save_file(bn, tmp_path / "odd\x1b[2J.safetensors")
    _, stdout = probe(capsys, tmp_path, tmp_path / "odd\x1b[2J.safetensors")
    assert "\x1b" not in stdout and "bn\\x1b[31mRED\\nnext" in stdout and "odd\\x1b[2J" in stdout
    save_file({**bn, f"{HOSTILE}.bias": torch.ones(3)}, tmp_path / "bad.safetensors")
    code, _, err = run_cli(capsys, "probe", tmp_path / "bad.safetensors", "--out", tmp_path / "bad.h5")
    assert_one_line_error(code, err, "inconsistent BatchNorm tensors at bn\\x1b[31mRED\\nnext: bias (3,)")


def test_a_bnprobe_run_beside_foreign_files_keeps_its_forward_pass_and_the_same_numbers(capsys, tmp_path,
                                                                                       tmp_path_factory):
    from bnprobe.files import runs

    run = trained_runs(tmp_path_factory)["full"]
    model = resnet(18)
    torch.save(model.state_dict(), tmp_path / "theirs.pt")
    # The run's own weights as a foreign file: what needs no forward pass must come out the same.
    torch.save(checkpoints.load_checkpoint(runs.checkpoint_path(run))["model"], tmp_path / "copy.pt")
    out, stdout = probe(capsys, tmp_path, run, tmp_path / "theirs.pt", tmp_path / "copy.pt", extra=["--images", "50"])
    with h5py.File(out) as f:
        ours, theirs, copy = f["checkpoints/000"], f["checkpoints/001"], f["checkpoints/002"]
        assert ours.attrs["source"] == "bnprobe" and ours.attrs["forward_pass"] and "relu" in ours
        assert 0 <= ours.attrs["accuracy"] <= 1 and ours.attrs["images"] == 50 == f.attrs["images"]
        check_against(theirs, f, expected(model.state_dict()))
        for name in ours["bn"]:
            np.testing.assert_array_equal(copy["bn"][name][:], ours["bn"][name][:], err_msg=name)
        for name in ours["recurring"]:
            np.testing.assert_array_equal(copy["recurring"][name][:], ours["recurring"][name][:], err_msg=name)
        np.testing.assert_array_equal(copy["frac_below_all"][:], ours["frac_below_all"][:])
        for attr in ("bn_layers", "bn_channels", "mean_abs_gamma", "median_abs_gamma", "off", "off_dead"):
            assert copy.attrs[attr] == ours.attrs[attr], attr
    assert "ReLU output sparsity — full" in stdout and "theirs: read from the file alone" in stdout


def test_safetensors_with_a_model_and_data_gets_the_forward_pass(capsys, tmp_path):
    model_file = write_model_file(tmp_path)
    from bnprobe.analysis.loading import build_from_factory

    model = randomize_bn(build_from_factory(f"{model_file}:small_net", ["width=4"]))
    save_safetensors(model.state_dict(), tmp_path / "small.safetensors")
    out, _ = probe(capsys, tmp_path, tmp_path / "small.safetensors", extra=[
        "--model", f"{model_file}:small_net", "--model-arg", "width=4", "--dataset", "digits", "--images", "40"])
    with h5py.File(out) as f:
        g = f["checkpoints/000"]
        assert g.attrs["source"] == "factory" and g.attrs["forward_pass"] and len(g["relu/sites"]) == 2
        np.testing.assert_array_equal(g["bn/gamma"][:4], model.features[1].weight.detach().double().numpy())


class Payload:
    """Unpickling it would make a folder: the proof that no code in the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("make,pattern", [
    (lambda p: p.write_text("not a checkpoint"), "is not a PyTorch checkpoint"),
    # Read inertly (no torch, nothing run): the pickled call is stood in for, and no state dict is left.
    (lambda p: torch.save({"state_dict": Payload(p.with_name("ran"))}, p),
     "holds no state dict (looked at the top level and under state_dict, model_state_dict, model, net, network, "
     "module, weights, params, ema, model_ema, state_dict_ema; its keys: 'state_dict'); 1 posix object in "
     "state_dict stood in for (their classes neither imported nor run)"),
    (lambda p: torch.save(nn.Linear(2, 2), p), "holds a stand-in for torch.nn.modules.linear.Linear, not a state dict"),
    (lambda p: torch.save({"fc.weight": torch.ones(3, 2), "fc.bias": torch.ones(3), "head.weight": torch.ones(2)}, p),
     "3 tensors (state dict at (top level)), none of them a normalisation layer's (BatchNorm: running_mean"),
    (lambda p: torch.save({"bn.weight": torch.ones(4), "bn.bias": torch.ones(4), "bn.running_mean": torch.ones(4),
                           "bn.running_var": torch.ones(3)}, p),
     "inconsistent BatchNorm tensors at bn: weight (4,), bias (4,), running_mean (4,), running_var (3,)"),
    (lambda p: torch.save({"bn.weight": torch.ones(4), "bn.running_mean": torch.ones(4),
                           "bn.running_var": torch.ones(4)}, p), "inconsistent BatchNorm tensors at bn"),
    (lambda p: torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, p), "holds no state dict"),
    (lambda p: p.with_suffix(".safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
     "is not a safetensors file (no header length in its first 8 bytes)"),
])
def test_bad_files_are_one_line(capsys, tmp_path, make, pattern):
    path = tmp_path / "bad.pt"
    make(path)
    if not path.exists():
        path = path.with_suffix(".safetensors")
    code, out, err = run_cli(capsys, "probe", path, "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "probe.h5").exists()


def _bn_layer(**tensors) -> dict:
    return {"bn.weight": torch.rand(4), "bn.bias": torch.zeros(4), "bn.running_mean": torch.zeros(4),
            "bn.running_var": torch.ones(4), **tensors}


@pytest.mark.parametrize("state, named", [
    # TypeError: can't convert Sparse layout tensor to numpy
    (lambda: _bn_layer(**{"bn.weight": torch.rand(4).to_sparse()}), "state_dict.bn.weight (sparse_coo)"),
    # NotImplementedError: Cannot copy out of meta tensor
    (lambda: _bn_layer(**{"bn.weight": torch.empty(4, device="meta")}), "state_dict.bn.weight (meta, no data)"),
    # an 8 TB allocation: 1e12 elements declared by a 1.5 KB file
    (lambda: {f"bn.{leaf}": torch.empty(10**12, device="meta") for leaf in BN_TENSORS[:4]},
     "state_dict.bn.weight (meta, no data), state_dict.bn.bias (meta, no data), state_dict.bn.running_mean"),
])
def test_sparse_and_meta_tensors_are_refused_naming_them(capsys, tmp_path, state, named):
    torch.save({"state_dict": state()}, tmp_path / "bad.pt")
    started = time.perf_counter()
    code, _, err = run_cli(capsys, "probe", tmp_path / "bad.pt", "--out", tmp_path / "probe.h5")
    assert_one_line_error(code, err, f"bad.pt holds tensors bnprobe cannot read: {named}")
    assert time.perf_counter() - started < 30 and not (tmp_path / "probe.h5").exists()  # a bound, not a speed test


def test_a_checkpoint_holding_a_list_that_holds_itself_is_read_not_walked_forever(capsys, tmp_path):
    import signal

    loop = []
    loop.append(loop)  # weights_only loading rebuilds it as it was
    torch.save({"state_dict": _bn_layer(), "loop": loop}, tmp_path / "loop.pt")
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the walk over the checkpoint did not end"))
    signal.alarm(60)
    try:
        code, _, err = run_cli(capsys, "probe", tmp_path / "loop.pt", "--out", tmp_path / "probe.h5")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 0, err


def test_device_is_checked_even_when_no_checkpoint_needs_one(capsys, tmp_path):
    torch.save(resnet(18).state_dict(), tmp_path / "theirs.pt")
    code, _, err = run_cli(capsys, "probe", tmp_path / "theirs.pt", "--device", "gpu", "--out", tmp_path / "p.h5")
    assert_one_line_error(code, err, "--device must be one of auto, cpu, cuda; got 'gpu'")
    assert not (tmp_path / "p.h5").exists()


def report_section(capsys, results: Path, tmp_path: Path, start: str) -> tuple[str, str, str]:
    """`bnprobe report RESULTS`: its output, the HTML page, and the page's section that begins at `start`."""
    code, out, err = run_cli(capsys, "report", results, "-o", tmp_path / "report.html")
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    section = html[html.index(start):]
    return out, html, section[: section.index("</section>")]


def test_report_shows_files_probed_alone_as_checkpoints_that_are_not_runs(capsys, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    model = resnet(18)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "theirs.pth")
    probe(capsys, tmp_path, tmp_path / "theirs.pth")
    (tmp_path / "probe.h5").rename(results / "probe.h5")
    out, html, section = report_section(capsys, results, tmp_path, "<h2>Checkpoints that are not runs</h2>")
    assert "1 probed checkpoint" in out
    layers = expected(model.state_dict()).values()
    gammas = np.abs(np.concatenate([g for g, _ in layers]))
    off_dead = sum(np.sum((np.abs(g) < OFF) & (b <= 0)) for g, b in layers)
    assert "theirs" in section and "torch zip" in section and "<td>20</td>" in section  # resnet18: 20 BN layers
    assert f"{np.sum(gammas < OFF):,} of {gammas.size:,}" in section
    assert f"τ=0.05: {100 * np.mean(gammas < 0.05):.1f}%" in section and f"<td>{off_dead}</td>" in section
    assert "<h2>Probes</h2>" not in html  # nothing was measured on data
