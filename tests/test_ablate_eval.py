"""bnprobe ablate on a model with its own evaluation (--eval) and --clamp-dims (issue 34): a small audio-style 1-D
CNN with BatchNorm1d and an evaluation in a file, each ablation checked against editing the weights by hand and
calling the same evaluation; --clamp-dims random:K against its seed; bad user functions one line each; and
--clamp-dims on bnprobe's own image models against the same hand edit with image accuracy."""

from __future__ import annotations

import copy
import importlib.util
import re
import textwrap

import h5py
import numpy as np
import pytest
import torch
from probe_helpers import assert_one_line_error, run_cli, trained_runs

from bnprobe.analysis.ablate import run_ablation
from bnprobe.analysis.loading import load_eval_data, load_model
from bnprobe.core.clamp_dims import DimsSpec, dims_rows, parse_clamp_dims, random_dims
from bnprobe.core.errors import BnprobeError
from bnprobe.core.options import AblateOptions, LoadOptions
from bnprobe.data.device import DeviceLoader
from bnprobe.nets.norms import bn_layers
from bnprobe.training.evaluate import evaluate as image_evaluate

AUDIO = textwrap.dedent('''
    import torch
    import torch.nn as nn

    class PitchNet(nn.Module):
        """Waveform (batch, 1, time) -> 6 pitch classes: three conv/BN/ReLU stages, widths 8, 8, 16."""
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv1d(1, 8, 9, padding=4), nn.BatchNorm1d(8), nn.ReLU(),
                nn.Conv1d(8, 8, 9, padding=4), nn.BatchNorm1d(8), nn.ReLU(),
                nn.Conv1d(8, 16, 9, padding=4), nn.BatchNorm1d(16), nn.ReLU())
            self.head = nn.Linear(16, 6)

        def forward(self, x):
            return self.head(self.net(x).mean(-1))

    def pitch_net():
        return PitchNet()

    def signals(n=96, seed=0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 6, (n,), generator=g)
        t = torch.arange(128) / 128
        x = torch.sin(2 * torch.pi * (2 + 3 * labels[:, None]) * t) + 0.3 * torch.randn(n, 128, generator=g)
        return x[:, None], labels
''')

EVAL = textwrap.dedent('''
    import math
    import torch
    import torch.nn.functional as F
    from audio import signals

    def evaluate(model):
        x, y = signals()
        device = next(model.parameters()).device
        logits = model(x.to(device))
        loss = F.cross_entropy(logits, y.to(device))
        return {"loss": loss, "accuracy": (logits.argmax(1) == y.to(device)).float().mean().item(),
                "margin": float(logits.max(1).values.mean())}

    def raises(model):
        helper = 1
        raise RuntimeError("the pitch tracker lost its tuning fork")

    def a_list(model):
        return [1.0]

    def nan(model):
        return {"loss": math.nan}

    def text(model):
        return {"loss": "low"}

    def empty(model):
        return {}

    def flag(model):
        return {"ok": True}
''')


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """The model file, the eval file beside it, and a trained checkpoint (a few hundred steps, well under 1 s)."""
    root = tmp_path_factory.mktemp("audio")
    (root / "audio.py").write_text(AUDIO)
    (root / "audio_eval.py").write_text(EVAL)
    spec = importlib.util.spec_from_file_location("audio_for_test", root / "audio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only wait for each other on a shared machine
    torch.manual_seed(0)
    model = module.pitch_net()
    x, y = module.signals(128, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save(model.state_dict(), root / "pitch.pt")
    yield root, module
    torch.set_num_threads(threads)


def user_evaluate(root):
    spec = importlib.util.spec_from_file_location("audio_eval_reference", root / "audio_eval.py")
    module = importlib.util.module_from_spec(spec)
    import sys
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return module.evaluate


def hand_edited(root, module, clamp, zero_beta=False):
    """The naive way: a fresh model, its checkpoint loaded, γ (and β) zeroed where clamp(name, γ) says, the same
    evaluation called; numbers as floats."""
    model = module.pitch_net()
    model.load_state_dict(torch.load(root / "pitch.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        for name, bn in bn_layers(model):
            mask = clamp(name, bn.weight)
            bn.weight[mask] = 0
            if zero_beta:
                bn.bias[mask] = 0
        return {k: float(v) for k, v in user_evaluate(root)(model).items()}


def ablate(capsys, root, *flags):
    out = root / f"out-{abs(hash(flags))}.h5"
    code, stdout, err = run_cli(capsys, "ablate", root / "pitch.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                                "--eval", f"{root / 'audio_eval.py'}:evaluate", "--device", "cpu", "--out", out, *flags)
    assert code == 0, err
    return out, stdout


def read_rows(path):
    with h5py.File(path) as f:
        assert f.attrs["version"] == 3 and f.attrs["evaluation"] == "eval" and "test_acc" not in f
        metrics = {name: f["eval"][name][:] for name in f["eval"]}
        baseline = {name: float(f["eval"][name].attrs["baseline"]) for name in f["eval"]}
        masks = f["masks"][:]
        offsets = f["layers/offsets"][:]
        names = list(f["layers/names"].asstr()[:])
        labels = list(f["labels"].asstr()[:])
    return metrics, baseline, masks, offsets, names, labels


def assert_same(measured, expected):
    for name, value in expected.items():
        assert measured[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("zero_beta", [False, True])
def test_threshold_clamps_through_eval_equal_the_hand_edit(capsys, audio, zero_beta):
    root, module = audio
    taus = [0.0, 0.3, 0.6, 1.0]
    out, stdout = ablate(capsys, root, "--clamp-gamma", ",".join(map(str, taus)),
                         *(["--zero-beta"] if zero_beta else []))
    metrics, baseline, masks, *_ = read_rows(out)
    assert set(metrics) == {"loss", "accuracy", "margin"}
    assert_same(baseline, hand_edited(root, module, lambda name, g: torch.zeros_like(g, dtype=torch.bool)))
    for i, tau in enumerate(taus):
        expected = hand_edited(root, module, lambda name, g: g.abs() < tau, zero_beta)
        assert_same({k: v[i] for k, v in metrics.items()}, expected)
    # clamping nothing changes nothing; the clamps moved the numbers
    assert {k: v[0] for k, v in metrics.items()} == baseline and masks[0].sum() == 0
    assert metrics["loss"][-1] != baseline["loss"] and masks[-1].sum() > 0
    assert "loss (Δ)" in stdout and "accuracy (Δ)" in stdout and "metrics from --eval" in stdout


def test_clamp_dims_rows_equal_the_hand_edit_and_random_follows_its_seed(capsys, audio):
    root, module = audio
    out, stdout = ablate(capsys, root, "--clamp-dims", "1,3", "--clamp-dims", "2,15@16", "--clamp-dims", "random:2",
                         "--repeats", "3", "--seed", "7", "--zero-beta")
    metrics, baseline, masks, offsets, names, labels = read_rows(out)
    assert names == ["net.1", "net.4", "net.7"] and offsets.tolist() == [0, 8, 16, 32]
    assert len(labels) == 5 and labels[0] == "dims 1,3 @8" and labels[1] == "dims 2,15 @16"
    # 1,3 in every layer of the most common width that has them (8: net.1 and net.4), not in net.7
    expected_masks = np.zeros(32, dtype=bool)
    expected_masks[[1, 3, 9, 11]] = True
    np.testing.assert_array_equal(masks[0], expected_masks)
    expected_masks[:] = False
    expected_masks[[18, 31]] = True
    np.testing.assert_array_equal(masks[1], expected_masks)
    # random:2 draws in the width of the named dimensions (8), in both layers of that width, 3 different draws
    draws = []
    for row in range(2, 5):
        first, second, third = masks[row][:8], masks[row][8:16], masks[row][16:]
        assert first.sum() == 2 and (first == second).all() and not third.any()
        draws.append(tuple(np.flatnonzero(first)))
        assert labels[row].startswith(f"random:2 @8 #{row - 1} (seed 7): {','.join(map(str, draws[-1]))}")
    assert len(set(draws)) > 1
    for row in range(5):
        by_layer = {name: torch.from_numpy(masks[row][offsets[i]:offsets[i + 1]]) for i, name in enumerate(names)}
        expected = hand_edited(root, module, lambda name, g: by_layer[name], zero_beta=True)
        assert_same({k: v[row] for k, v in metrics.items()}, expected)
    assert "--clamp-dims clamped 3 of 3 norm layers" in stdout.replace("\n", " ")
    # the same seed draws the same dimensions again; another seed others
    again, _ = ablate(capsys, root, "--clamp-dims", "1,3", "--clamp-dims", "random:2", "--repeats", "3", "--seed", "7")
    other, _ = ablate(capsys, root, "--clamp-dims", "1,3", "--clamp-dims", "random:2", "--repeats", "3", "--seed", "8")
    np.testing.assert_array_equal(read_rows(again)[2][1:], masks[2:])
    assert not np.array_equal(read_rows(other)[2][1:], masks[2:])


def test_random_dims_are_seeded_and_distinct():
    a = random_dims(768, 2, seed=0, repeat=0)
    assert a.tolist() == random_dims(768, 2, seed=0, repeat=0).tolist() and len(set(a.tolist())) == 2
    assert a.tolist() != random_dims(768, 2, seed=1, repeat=0).tolist()
    assert a.tolist() != random_dims(768, 2, seed=0, repeat=1).tolist()
    assert sorted(random_dims(5, 5, 3, 0).tolist()) == [0, 1, 2, 3, 4]


def test_clamp_dims_syntax_and_width_choice():
    assert parse_clamp_dims("381, 308") == DimsSpec("dims", dims=(308, 381))
    assert parse_clamp_dims("308,381@768") == DimsSpec("dims", dims=(308, 381), width=768)
    assert parse_clamp_dims("random:4") == DimsSpec("random", count=4)
    assert parse_clamp_dims("recurring") == DimsSpec("recurring")
    widths = [768] * 25 + [3072] * 12 + [64]
    [row] = dims_rows(["308,381"], widths, None, 0, 1)
    assert list(row.dims) == [768] and row.dims[768].tolist() == [308, 381]
    [row] = dims_rows(["1000"], widths, None, 0, 1)  # only the 3072-wide layers have dimension 1000
    assert list(row.dims) == [3072]
    rows = dims_rows(["recurring", "random:2"], widths, {768: np.array([308, 381]), 64: np.array([3])}, 0, 2)
    assert rows[0].dims[768].tolist() == [308, 381] and rows[0].dims[64].tolist() == [3]
    assert [list(r.dims) for r in rows[1:]] == [[768], [768]]  # the width with most recurring dimensions
    for bad, pattern in (("308;381", "--clamp-dims must be"), ("random:0", "K must be"), ("5000", "no norm layer has"),
                         ("3@100", "no norm layer has width 100"), ("70@64", "outside width 64"),
                         ("random:65@64", "cannot draw 65")):
        with pytest.raises(BnprobeError, match=pattern):
            dims_rows([bad], widths, None, 0, 1)
    with pytest.raises(BnprobeError, match="no dimension is an outlier"):
        dims_rows(["recurring"], widths, {}, 0, 1)
    with pytest.raises(BnprobeError, match="--repeats"):
        dims_rows(["random:1"], widths, None, 0, 0)


def test_recurring_takes_the_outliers_the_probe_finds(capsys, audio, tmp_path):
    root, module = audio
    model = module.pitch_net()
    model.load_state_dict(torch.load(root / "pitch.pt", weights_only=True))
    with torch.no_grad():  # dimension 5 an outlier of both width-8 layers, 2 of net.1 alone (not recurring)
        for bn in (model.net[1], model.net[4]):
            bn.weight.copy_(torch.linspace(0.5, 1.0, 8))
            bn.weight[5] = 40.0
        model.net[1].weight[2] = -30.0
    torch.save(model.state_dict(), tmp_path / "outliers.pt")
    out = tmp_path / "r.h5"
    code, stdout, err = run_cli(capsys, "ablate", tmp_path / "outliers.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                                "--eval", f"{root / 'audio_eval.py'}:evaluate", "--device", "cpu", "--out", out,
                                "--clamp-dims", "recurring")
    assert code == 0, err
    _, _, masks, _, _, labels = read_rows(out)
    assert labels == ["recurring 5 @8"] and np.flatnonzero(masks[0]).tolist() == [5, 13]


BAD = [
    ("raises", r"--eval: .*:raises raised RuntimeError: the pitch tracker lost its tuning fork \(at .*audio_eval\.py:17\)"),
    ("a_list", "returned a list, not a dict of named numbers"),
    ("nan", "returned loss=nan, not a finite number"),
    ("text", "returned loss='low', not a finite number"),
    ("empty", "returned an empty dict"),
    ("flag", "returned ok=True, not a finite number"),
    ("missing", "has no callable 'missing'"),
]


@pytest.mark.parametrize("name,pattern", BAD)
def test_bad_user_functions_are_one_line(capsys, audio, name, pattern):
    root, _ = audio
    code, _, err = run_cli(capsys, "ablate", root / "pitch.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                           "--eval", f"{root / 'audio_eval.py'}:{name}", "--device", "cpu", "--clamp-gamma", "0.5",
                           "--out", root / "bad.h5")
    assert_one_line_error(code, err, "--eval")
    assert re.search(pattern, err), err
    assert not (root / "bad.h5").exists()


def test_an_eval_file_that_fails_to_import_names_its_line(capsys, audio, tmp_path):
    root, _ = audio
    (tmp_path / "broken.py").write_text("import math\n\ndef evaluate(model)\n    return {}\n")
    code, _, err = run_cli(capsys, "ablate", root / "pitch.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                           "--eval", f"{tmp_path / 'broken.py'}:evaluate", "--device", "cpu", "--clamp-dims", "1")
    assert_one_line_error(code, err, "--eval: importing")
    assert "broken.py:3)" in err


def test_clamp_dims_on_an_image_model_equals_the_hand_edit(tmp_path_factory, tmp_path):
    """bnprobe's own resnet8 (BN folded into its convs), --clamp-dims on its 16-wide BNs, image accuracy and loss
    against the checkpoint reloaded, γ zeroed on the BN modules by hand, evaluated on the same images."""
    run = trained_runs(tmp_path_factory)["bn-only"]
    cpu = LoadOptions(device="cpu")
    settings = AblateOptions(mode="dims", dims=["0,5", "random:3"], repeats=2, measure_train=False, batch_size=128)
    result, path = run_ablation(run, cpu, settings, out=tmp_path / "d.h5")
    assert result.evaluation == "images" and result.extra["folded_layers"] > 0
    widths = result.layer_channels
    width = max(set(widths), key=lambda w: (widths.count(w), w))
    offsets = np.concatenate([[0], np.cumsum(widths)])
    assert result.labels[0] == f"dims 0,5 @{width}"
    for row in range(3):
        loaded = load_model(run, cpu)
        data = load_eval_data(loaded, torch.device("cpu"))
        with torch.no_grad():
            for i, (name, bn) in enumerate(bn_layers(loaded.model, with_gamma=True)):
                mask = torch.from_numpy(result.masks[row][offsets[i]:offsets[i + 1]].copy())
                if row == 0:
                    assert mask.nonzero().flatten().tolist() == ([0, 5] if widths[i] == width else [])
                bn.weight[mask] = 0
        loss, acc = image_evaluate(loaded.model, DeviceLoader(data.test_x, data.test_y, data.mean, data.std, 97))
        # Folding reorders float operations: allow one image to flip on a near-tie.
        assert abs(result.metrics["test_acc"][row] - acc) <= 1.01 / len(data.test_y)
        assert result.metrics["test_loss"][row] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    with h5py.File(path) as f:
        assert f.attrs["mode"] == "dims" and f["test_acc"].shape == (3,)


def test_eval_needs_no_dataset(audio):
    root, module = audio
    settings = AblateOptions(mode="threshold", values=[10.0], eval=f"{root / 'audio_eval.py'}:evaluate")
    options = LoadOptions(model=f"{root / 'audio.py'}:pitch_net", device="cpu")
    result, _ = run_ablation(root / "pitch.pt", options, settings, out=root / "restored.h5")
    assert result.clamped[0] == 32  # every γ is below 10
    reference = copy.deepcopy(result.baseline)
    assert_same(reference, hand_edited(root, module, lambda name, g: torch.zeros_like(g, dtype=torch.bool)))


def test_the_report_shows_eval_metrics_where_image_accuracy_is_absent(capsys, audio, tmp_path):
    from bnprobe.reporting.collect import collect
    from bnprobe.reporting.render import render_html

    root, _ = audio
    out = tmp_path / "results" / "ablation-dims.h5"
    out.parent.mkdir()
    code, _, err = run_cli(capsys, "ablate", root / "pitch.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                           "--eval", f"{root / 'audio_eval.py'}:evaluate", "--device", "cpu", "--out", out,
                           "--clamp-dims", "1,3")
    assert code == 0, err
    [ablation] = collect([tmp_path / "results"]).ablations
    assert ablation.test_acc is None and ablation.mode == "dims" and ablation.labels == ["dims 1,3 @8"]
    with h5py.File(out) as f:
        assert ablation.metrics["loss"][0] == f["eval/loss"][0]
        assert ablation.baseline_metrics["loss"] == f["eval/loss"].attrs["baseline"]
    html = render_html(collect([tmp_path / "results"]), [0.01])
    assert "named dimensions" in html and "last row: dims 1,3 @8" in html
    assert re.search(r"accuracy [0-9.]+ → [0-9.]+; loss [0-9.]+ → [0-9.]+; margin", html)


def test_in_place_clamps_write_minus_offset_and_restore_bit_for_bit():
    from bnprobe.nets.clamp_inplace import InPlaceNorms

    torch.manual_seed(0)
    ln, bn = torch.nn.LayerNorm(6), torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        for p in (ln.weight, ln.bias, bn.weight, bn.bias):
            p.copy_(torch.randn(p.shape))
    before = [t.detach().clone() for t in (ln.weight, ln.bias, bn.weight, bn.bias)]
    norms = InPlaceNorms(torch.nn.Sequential(ln, bn), [("ln", ln, 1.0), ("bn", bn, 0.0)])
    torch.testing.assert_close(norms.gammas[0], before[0] + 1, rtol=0, atol=0)  # the effective scale 1 + w
    masks = [torch.tensor([True, False, False, True, False, False]), torch.tensor([False, True, False, False])]
    norms.clamp(masks, zero_beta=True)
    assert ln.weight[0] == -1 and ln.weight[3] == -1 and ln.bias[0] == 0 and bn.weight[1] == 0 and bn.bias[1] == 0
    assert ln.weight[1] == before[0][1] and bn.bias[0] == before[3][0]
    norms.clamp(None)
    for tensor, original in zip((ln.weight, ln.bias, bn.weight, bn.bias), before):
        assert torch.equal(tensor, original)


def test_a_damaged_eval_group_is_skipped_by_the_report_in_one_line(capsys, audio, tmp_path):
    from bnprobe.reporting.collect import collect

    root, _ = audio
    out = tmp_path / "results" / "a.h5"
    out.parent.mkdir()
    code, _, err = run_cli(capsys, "ablate", root / "pitch.pt", "--model", f"{root / 'audio.py'}:pitch_net",
                           "--eval", f"{root / 'audio_eval.py'}:evaluate", "--device", "cpu", "--out", out,
                           "--clamp-gamma", "0.5,1")
    assert code == 0, err
    with h5py.File(out, "r+") as f:
        del f["eval/loss"]
        f["eval/loss"] = np.zeros(3)  # 3 rows where the file has 2
    collection = collect([tmp_path / "results"])
    assert not collection.ablations and len(collection.skipped) == 1
    assert "/eval/loss has shape (3,), expected (2,)" in str(collection.skipped[0])


def test_eval_models_clamp_rmsnorm_and_their_own_norm_classes(capsys, tmp_path):
    """A user's torch model with nn.RMSNorm and its own (1 + w) norm class: found, each convention measured, and
    the --clamp-dims row equals writing w := 0 / w := -1 by hand."""
    (tmp_path / "tiny_lm.py").write_text(textwrap.dedent('''
        import torch
        import torch.nn as nn

        class OnePlusRMSNorm(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.weight = nn.Parameter(torch.zeros(width))
            def forward(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Linear(4, 6)
                self.norm1 = nn.RMSNorm(6)
                self.b = nn.Linear(6, 6)
                self.norm2 = OnePlusRMSNorm(6)
                self.c = nn.Linear(6, 2)
            def forward(self, x):
                return self.c(self.norm2(self.b(self.norm1(self.a(x)))))

        def tiny():
            torch.manual_seed(0)
            model = Tiny()
            with torch.no_grad():
                model.norm1.weight.copy_(torch.linspace(0.5, 2, 6))
                model.norm2.weight.copy_(torch.linspace(-0.5, 0.5, 6))
            return model

        def evaluate(model):
            x = torch.linspace(-1, 1, 40).reshape(10, 4)
            return {"out": model(x).abs().sum()}
    '''))
    spec = importlib.util.spec_from_file_location("tiny_lm_ref", tmp_path / "tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.tiny().state_dict(), tmp_path / "tiny.pt")
    out = tmp_path / "t.h5"
    code, _, err = run_cli(capsys, "ablate", tmp_path / "tiny.pt", "--model", f"{tmp_path / 'tiny_lm.py'}:tiny",
                           "--eval", f"{tmp_path / 'tiny_lm.py'}:evaluate", "--clamp-dims", "1,4", "--device", "cpu",
                           "--out", out)
    assert code == 0, err
    with h5py.File(out) as f:
        assert list(f["layers/names"].asstr()[:]) == ["norm1", "norm2"]
        row = float(f["eval/out"][0])
    model = module.tiny().eval()
    with torch.no_grad():
        model.norm1.weight[[1, 4]] = 0
        model.norm2.weight[[1, 4]] = -1
        assert row == pytest.approx(float(module.evaluate(model)["out"]), rel=1e-6)
