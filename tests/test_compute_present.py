"""`bnprobe probe` and `bnprobe ablate` compute apart from what they print (issue 31): the compute functions
(probe.measure_checkpoints, ablate.sweep_clamps) print nothing and return the numbers that the writer puts in the
file and the presenter (probe_output.present_probe, ablate_output.present_ablation) shows; a presenter fed a
hand-built result prints the rows those numbers give, each checked against numpy on the tensors."""

from __future__ import annotations

from io import StringIO

import h5py
import numpy as np
import torch
from rich.console import Console
from torch import nn

from bnprobe.analysis.ablate import SweepResult, sweep_clamps, value_rows, write_ablation_h5
from bnprobe.analysis.ablate_output import present_ablation
from bnprobe.analysis.probe_results import NormStats, ProbeResult, ProbeRun
from bnprobe.analysis.probe import measure_checkpoints, write_probe
from bnprobe.analysis.probe_output import present_probe
from bnprobe.core.options import AblateOptions, LoadOptions, ProbeOptions
from bnprobe.nets.clamp_inplace import InPlaceNorms, scale_norms


def printed(present, *args) -> str:
    """What a presenter prints on a wide console, whitespace runs made one space."""
    buffer = StringIO()
    present(*args, Console(file=buffer, width=200))
    return " ".join(buffer.getvalue().split())


def bn_state(gamma: list[float]) -> dict[str, torch.Tensor]:
    n = len(gamma)
    return {"bn.weight": torch.tensor(gamma), "bn.bias": torch.linspace(-1, 1, n), "bn.running_mean": torch.zeros(n),
            "bn.running_var": torch.ones(n)}


def test_the_probe_computes_silently_and_its_numbers_reach_the_file_and_the_terminal(capsys, tmp_path):
    gamma = [0.001, -0.02, 0.5, 2.0, -0.004, 1.0]
    torch.save(bn_state(gamma), tmp_path / "small.pt")
    settings = ProbeOptions(taus=[0.01, 0.1], off_threshold=0.01)
    run = measure_checkpoints([tmp_path / "small.pt"], LoadOptions(device="cpu"), settings)
    assert capsys.readouterr() == ("", "")  # compute: nothing printed
    assert run.device is None and run.notes == []  # read from the file alone: no forward pass
    [result] = run.results
    raw = np.array(gamma, dtype=np.float32).astype(np.float64)
    np.testing.assert_array_equal(result.bn.gamma[0], raw)
    summary = result.summary(settings.taus, settings.off_threshold)
    assert summary["off"] == int(np.sum(np.abs(raw) < 0.01)) == 2
    assert summary["mean_abs_gamma"] == np.mean(np.abs(raw))

    out = tmp_path / "probe.h5"
    write_probe(out, run, LoadOptions(device="cpu"), settings)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["checkpoints/000/bn/gamma"][:], raw)
        assert f["checkpoints/000"].attrs["off"] == 2 and f.attrs["device"] == "none" and "images" not in f.attrs
    shown = printed(lambda console: present_probe(run, settings, out, False, console))
    assert f"mean |γ| (median) {np.mean(np.abs(raw)):.3f} ({np.median(np.abs(raw)):.3f})" in shown
    assert f"|γ| < 0.1 {100 * np.mean(np.abs(raw) < 0.1):.1f}%" in shown
    assert "off: |γ| < 0.01 2 " in shown and "read from the file alone (torch" in shown
    assert shown.endswith(f"Wrote {out}")


def test_a_hand_built_probe_run_is_presented_with_its_numbers_and_notes():
    gamma = np.array([0.005, 0.2, np.inf, 0.6])
    beta = np.array([-0.5, 0.1, 0.2, -0.1])
    stats = NormStats(["layer1.bn"], [gamma], [beta], [np.zeros(4)], [np.ones(4)], stats_only=[("plain.bn", 3)])
    result = ProbeResult(label="mine", path="mine.pt", attrs={"model": "resnet8"}, bn=stats, sites=[], loss=1.5,
                         accuracy=0.625, images=40, forward_pass=True)
    run = ProbeRun([result], device="cpu", images=40, notes=[("mine", "a note the measuring found")])
    assert stats.non_finite() == int(np.sum(~np.isfinite(gamma))) == 1
    shown = printed(lambda console: present_probe(run, ProbeOptions(taus=[0.1], off_threshold=0.01), "x.h5",
                                                  True, console))
    assert shown.startswith("mine: a note the measuring found BatchNorm probe")  # the notes first, then the table
    assert "accuracy (40 test images) 62.5%" in shown and "model resnet8" in shown
    assert "BN layers / channels 1 / 4" in shown and "off: |γ| < 0.01 1 " in shown and "off and β ≤ 0 1 " in shown
    assert "|γ| < 0.1 25.0%" in shown
    assert "mine: 1 non-finite γ or β value(s)" in shown
    assert "mine: 1 BN layer(s) without affine (running statistics only, no γ/β, not in the tables): plain.bn" in shown


def tiny_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6, 3)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.01, 0.3, -0.05, 1.0, 0.002, 0.7]))
    return model, torch.randn(4, 2, 8)


def test_the_ablation_computes_silently_and_its_numbers_reach_the_file_and_the_table(capsys, tmp_path):
    model, x = tiny_model()
    gamma = model[1].weight.detach().clone()
    clampable = InPlaceNorms(model, scale_norms(model))

    def measure() -> dict[str, float]:
        with torch.no_grad():
            return {"out": float(model(x).abs().sum())}
    settings = AblateOptions(values=[0.0, 0.1])
    rows = value_rows(clampable.gammas, settings.values, "threshold", False)
    result = sweep_clamps(clampable, rows, measure, settings, evaluation="eval", attrs={"pairing": "none"})
    assert capsys.readouterr() == ("", "")
    assert result.extra == {"pairing": "none"}
    assert result.clamped.tolist() == [0, int((gamma.abs() < 0.1).sum())] == [0, 3]
    with torch.no_grad():  # the clamp by hand: β kept, γ 0 where |γ| < 0.1
        baseline = float(model(x).abs().sum())
        model[1].weight.mul_(gamma.abs() >= 0.1)
        by_hand = float(model(x).abs().sum())
        model[1].weight.copy_(gamma)
    assert result.baseline["out"] == baseline and result.metrics["out"].tolist() == [baseline, by_hand]

    out = tmp_path / "ablation.h5"
    write_ablation_h5(out, result, {"label": "tiny"})
    with h5py.File(out) as f:
        assert f["clamped"][:].tolist() == [0, 3] and f["eval/out"][:].tolist() == [baseline, by_hand]
    shown = printed(lambda console: present_ablation(result, "tiny", "A note.", out, console))
    assert f"0.1 3 (50.0%) {by_hand:.5g} ({by_hand - baseline:+.3g})" in shown
    assert "A note. 2 row(s): 2 evaluation(s) with the baseline" in shown  # τ = 0 is the baseline itself


def test_a_hand_built_sweep_is_presented_row_by_row():
    masks = np.zeros((1, 4), dtype=bool)
    masks[0, :2] = True
    result = SweepResult(
        mode="threshold", per_layer=False, zero_beta=True, values=[0.25], layer_names=["bn1", "bn2"],
        layer_channels=[2, 2], layer_folded=[True, True], clamped=np.array([2]), clamped_per_layer=np.array([[2, 0]]),
        masks=masks, metrics={"test_loss": np.array([1.25]), "test_acc": np.array([0.5])},
        baseline={"test_loss": 0.75, "test_acc": 0.875}, evaluations=2, seconds=0.5, labels=["τ=0.25"])
    shown = printed(lambda console: present_ablation(result, "hand", "Folded.", "a.h5", console))
    assert "none 0 (0.0%) 87.50% 0.7500" in shown
    assert "0.25 2 (50.0%) 50.00% (-37.50) 1.2500" in shown
    assert "β of clamped channels zeroed too (--zero-beta)" in shown and shown.endswith("Wrote a.h5")
