"""bnprobe findings: statistics over seeds checked against hand formulas on synthetic runs, and the command and
the report on real ones (resnet8 on digits, two seeds, full vs BN-only)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_one_line_error, run_cli
from probe_helpers import single_thread, tiny_config  # noqa: F401 - autouse: one thread for tiny models
from rich.console import Console
from scipy import stats

from bnprobe.analysis.findings import Finding, Findings, findings_of
from bnprobe.analysis.findings_output import findings_json, json_path, sentence, show, write_json
from bnprobe.analysis.seed_statistics import FRACTION, NON_NEGATIVE, SINGLE, Estimate, Row, compare, estimate
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.core.modelnames import model_depth
from bnprobe.reporting.read import Ablation, Run

DEFAULT = TrainConfig(dataset="digits").to_dict()
REPO = Path(__file__).resolve().parents[1]


def fake_run(seed: int, test: list[float], train_eval: float = 0.9, grads: dict | None = None, trainable=None,
             bn_layers: int = 0, **settings) -> Run:
    """A run as bnprobe.reporting.collect reads it: config.json's settings and per-epoch history, no files."""
    config = {**DEFAULT, "seed": seed, "epochs": len(test), **settings}
    history = {"epoch": np.arange(1, len(test) + 1, dtype=float), "test_acc": np.array(test),
               "train_eval_acc": np.full(len(test), train_eval), "test_loss": np.full(len(test), 1.0 - test[-1]),
               "train_eval_loss": np.full(len(test), 0.1)}
    history["gap"] = history["train_eval_acc"] - history["test_acc"]
    run = Run(name=f"{config['model']}-{config['freeze']}-{seed}-{len(settings)}", path=Path("."), config=config,
              history=history, trainable=trainable, grad_groups=grads or {},
              gamma_layers=[f"bn{i}" for i in range(bn_layers)])
    return run


def hand_interval(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_estimate_is_the_student_t_interval():
    values = [0.61, 0.65, 0.70, 0.58]
    e = estimate(values)
    assert e.n == 4 and e.mean == pytest.approx(np.mean(values))
    assert (e.low, e.high) == pytest.approx(hand_interval(values))
    single = estimate([0.7])
    assert (single.low, single.high, single.n) == (None, None, 1)
    assert show(single, "pct") == "70.0% (n = 1)"
    assert show(estimate([0.5, 0.5]), "pct") == "50.0% [50.0, 50.0] (n = 2)"  # no spread: no NaN


def test_a_bound_that_rounds_to_zero_is_printed_without_a_minus():
    # A difference's interval [-0.0004, 0.077] was printed "[-0.0, 7.7]".
    assert show(Estimate(0.038, -0.0004, 0.077, 3), "pct") == "3.8% [0.0, 7.7] (n = 3)"
    assert show(Estimate(-0.0004, -0.001, 0.0, 3), "pct", signed=True) == "+0.0 points [-0.1, 0.0] (n = 3)"
    assert show(Estimate(-0.4, -0.2, 0.0, 2), "count") == "0 [0, 0] (n = 2)"
    assert show(Estimate(-0.0, -0.0, 0.0, 2), "number") == "0 [0, 0] (n = 2)"
    assert show(Estimate(-0.012, -0.03, 0.004, 2), "pct") == "-1.2% [-3.0, 0.4] (n = 2)"  # real minus signs stay


def test_intervals_of_bounded_quantities_are_clipped_and_say_so(tmp_path):
    # With two seeds an accuracy's t-interval reached below 0% (and the gap's above 100 points).
    runs = [fake_run(0, [0.0], freeze="non-bn"), fake_run(1, [0.02], freeze="non-bn"),
            fake_run(0, [0.5], freeze="none"), fake_run(1, [0.9], freeze="none")]
    result = findings_of(runs)
    bn_only = result.groups[0].summary()
    low, high = hand_interval([0.0, 0.02])
    assert low < 0 and bn_only["test accuracy"] == Estimate(0.01, 0.0, pytest.approx(high), 2, clipped=True)
    assert show(bn_only["test accuracy"], "pct") == f"1.0% [0.0, {100 * high:.1f}] clipped (n = 2)"
    low, high = hand_interval([0.9, 0.88])  # train 0.9 − test
    assert high > 1 and bn_only["gap (train − test accuracy)"] == Estimate(
        pytest.approx(0.89), pytest.approx(low), 1.0, 2, clipped=True)
    loss = bn_only["test loss"]  # 1 − test accuracy: above 1 is a loss like any other
    assert (loss.low, loss.high) == pytest.approx(hand_interval([1.0, 0.98])) and not loss.clipped
    assert estimate([0.1, 0.5], NON_NEGATIVE).low == 0 and estimate([0.4, 0.5, 0.6], FRACTION).clipped is False
    [finding] = result.findings
    accuracy = finding.rows[0]
    assert accuracy.a.clipped and "clipped" in sentence(accuracy)
    d = [0.0 - 0.5, 0.02 - 0.9]  # a difference is not bounded by its sides' range: left as it is
    assert (accuracy.difference.low, accuracy.difference.high) == pytest.approx(hand_interval(d))
    assert accuracy.difference.low < -1 and not accuracy.difference.clipped
    write_json(result, tmp_path / "f.json")
    stored = json.loads((tmp_path / "f.json").read_text())
    assert stored["groups"][0]["summary"]["test accuracy"]["clipped"] is True
    assert stored["groups"][0]["summary"]["test loss"]["clipped"] is False
    assert stored["findings"][0]["rows"][0]["a"]["low"] == 0 and stored["findings"][0]["rows"][0]["a"]["clipped"]


def test_welch_when_seeds_differ_paired_when_they_match():
    a, b = {0: 0.61, 1: 0.65, 2: 0.70}, {3: 0.80, 4: 0.86, 5: 0.83, 6: 0.90}
    row = compare("test accuracy", "pct", a, b, ("A", "B"))
    x, y = np.array(list(a.values())), np.array(list(b.values()))
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    t = (x.mean() - y.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))  # Welch–Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert row.test == "Welch t-test"
    assert row.p == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert row.difference.mean == pytest.approx(x.mean() - y.mean())
    assert (row.difference.low, row.difference.high) == pytest.approx((t * math.sqrt(va + vb) - half,
                                                                       t * math.sqrt(va + vb) + half))

    b = {2: 0.83, 0: 0.80, 1: 0.86}  # the same seeds, in another order: paired by seed
    row = compare("test accuracy", "pct", a, b, ("A", "B"))
    d = np.array([a[s] - b[s] for s in (0, 1, 2)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert row.test == "paired t-test over seeds 0, 1, 2"
    assert row.p == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert (row.difference.low, row.difference.high) == pytest.approx(hand_interval(d))
    assert f"p = {row.p:.2g}" in sentence(row) and "difference -17.7 points [-28.0, -7.3]" in sentence(row)

    row = compare("test accuracy", "pct", {0: 0.6}, b, ("A", "B"))
    assert row.test == "" and row.p is None and row.difference.low is None and SINGLE in sentence(row)


def study() -> list[Run]:
    """Three seeds of: BN-only and full resnet8/14/20, a γ-regularised and a reduced-BN BN-only resnet14, the
    random-features baseline and its BN-only counterpart, with gradient telemetry on the full runs."""
    rng = np.random.default_rng(0)
    runs = []
    for seed in (0, 1, 2):
        for model, base in (("resnet8", 0.50), ("resnet14", 0.60), ("resnet20", 0.66)):
            noise = rng.normal(0, 0.01, 2)
            runs.append(fake_run(seed, [base + noise[0] - 0.02, base + noise[0]], model=model, freeze="non-bn",
                                 bn_layers=model_depth(model) - 1))
            grads = {"bn_gamma": rng.uniform(4, 6, 5), "bn_beta": rng.uniform(2, 3, 5), "conv_weight": np.ones(5)}
            runs.append(fake_run(seed, [0.9 + noise[1], 0.85 + noise[1]], 0.99, grads, model=model, freeze="none"))
        runs.append(fake_run(seed, [0.5, 0.55 + 0.01 * seed], model="resnet14", freeze="non-bn", gamma_l1=1e-4))
        runs.append(fake_run(seed, [0.5, 0.50 + 0.01 * seed], model="resnet14", freeze="non-bn", bn="every-k",
                             bn_every=2, bn_layers=7))  # as many as resnet8 with full BN
        runs.append(fake_run(seed, [0.4, 0.40 + 0.02 * seed], model="resnet8", freeze="all-but-output",
                             random_features=2, trainable=1000))
        runs.append(fake_run(seed, [0.4, 0.45 + 0.01 * seed], model="resnet8", freeze="non-bn-output", trainable=1000))
        # a run of another length is another experiment: never compared with the 2-epoch runs
        runs.append(fake_run(seed, [0.3], model="resnet14", freeze="none"))
    return runs


def test_every_comparison_of_the_plan_with_its_numbers():
    runs = study()
    result = findings_of(runs)
    assert len(result.groups) == 11 and all(g.seeds == [0, 1, 2] for g in result.groups)
    kinds = [f.kind for f in result.findings]
    assert kinds.count("BN-only vs full training") == 3
    by_title = {(f.kind, f.title): f for f in result.findings}

    def seeds_of(model, freeze, **settings):
        chosen = [r for r in runs if r.model == model and r.freeze == freeze and r.epochs_done == 2
                  and all(r.config.get(k) == v for k, v in settings.items())
                  and (settings or (r.config["gamma_l1"] == 0 and r.config["bn"] == "full"))]
        return {r.seed: r for r in chosen}

    bn_only, full = seeds_of("resnet14", "non-bn"), seeds_of("resnet14", "none")
    finding = by_title[("BN-only vs full training", "resnet14 digits non-bn epochs=2 vs resnet14 digits none epochs=2")]
    acc, gap, drop = finding.rows
    d = [bn_only[s].test_acc - full[s].test_acc for s in (0, 1, 2)]
    assert acc.difference.mean == pytest.approx(np.mean(d))
    assert (acc.difference.low, acc.difference.high) == pytest.approx(hand_interval(d))
    assert acc.test.startswith("paired") and acc.p == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    assert gap.a.mean == pytest.approx(np.mean([0.9 - bn_only[s].test_acc for s in (0, 1, 2)]))
    # BN-only's last epoch is its best; full training fell 0.05 from its best epoch
    assert drop.a.mean == pytest.approx(0) and drop.b.mean == pytest.approx(0.05)

    [trend] = [f for f in result.findings
               if f.kind == "depth trend" and f.title == "CIFAR ResNet digits non-bn epochs=2"]
    chosen = [r for r in runs if r.freeze == "non-bn" and r.config["gamma_l1"] == 0 and r.config["bn"] == "full"]
    depths = [model_depth(r.model) for r in chosen]
    accuracy = [r.test_acc for r in chosen]
    ranks_d, ranks_a = stats.rankdata(depths), stats.rankdata(accuracy)  # Spearman = Pearson of average ranks
    rho = np.corrcoef(ranks_d, ranks_a)[0, 1]
    t = rho * math.sqrt((len(chosen) - 2) / (1 - rho ** 2))
    assert trend.rows[0].a.mean == pytest.approx(rho) and trend.rows[0].a.n == 9
    assert trend.rows[0].p == pytest.approx(2 * stats.t.sf(abs(t), len(chosen) - 2))
    assert "3 depths 8–20" in sentence(trend.rows[0])

    [changed] = [f for f in result.findings if f.kind == "changed BN vs plain BN-only"]
    assert changed.title.startswith("resnet14") and changed.rows[0].labels == ("gamma_l1=0.0001", "plain")
    assert changed.rows[0].difference.mean == pytest.approx(np.mean([0.55 + 0.01 * s - bn_only[s].test_acc
                                                                     for s in (0, 1, 2)]))
    [fewer] = [f for f in result.findings if f.kind == "reduced BN vs fewer layers"]
    assert fewer.title.endswith("vs resnet8 digits non-bn epochs=2 (both 7 BN layers)")
    resnet8 = seeds_of("resnet8", "non-bn")
    assert fewer.rows[0].difference.mean == pytest.approx(np.mean([0.5 + 0.01 * s - resnet8[s].test_acc
                                                                   for s in (0, 1, 2)]))
    [reduced] = [f for f in result.findings if f.kind == "reduced BN vs full BN"]
    assert reduced.title == "resnet14 digits non-bn bn=every-2 epochs=2 vs resnet14 digits non-bn epochs=2"

    [baseline] = [f for f in result.findings if f.kind == "random features vs BN-only"]
    params, acc = baseline.rows[:2]
    assert params.note == "equal" and params.a.mean == 1000
    assert acc.difference.mean == pytest.approx(np.mean([-0.05 + 0.01 * s for s in (0, 1, 2)]))

    gradients = [f for f in result.findings if f.kind == "gradient magnitude, BN vs conv"]
    assert len(gradients) == 3  # the full runs: conv weights and BN both trained
    gamma, beta = gradients[0].rows
    ratios = [np.mean(r.grad_groups["bn_gamma"]) / np.mean(r.grad_groups["conv_weight"])
              for r in runs if r.model == "resnet8" and r.freeze == "none"]
    assert gamma.a.mean == pytest.approx(np.mean(ratios)) and gamma.a.n == 3
    assert (gamma.a.low, gamma.a.high) == pytest.approx(hand_interval(ratios))
    assert gamma.p == pytest.approx(stats.ttest_1samp(ratios, 1).pvalue) and gamma.test.endswith("against 1")


def with_gamma(run: Run, gamma: np.ndarray) -> Run:
    run.gamma_layers, run.gamma_final = ["bn1"], [gamma]
    return run


def sweep(run: Run, taus, accuracies, clamped) -> Ablation:
    """A clamp sweep of `run` as bnprobe.reporting.read reads an ablation.h5 (global, β kept)."""
    return Ablation(name="ablation.h5", label=run.name, mode="threshold", per_layer=False, zero_beta=False,
                    values=np.array(taus), clamped_fraction=np.array(clamped), test_acc=np.array(accuracies),
                    train_acc=None, baseline_test_acc=run.test_acc, checkpoint="", freeze=run.freeze, run=run)


def test_clamping_and_channels_off_with_their_numbers():
    """How much accuracy the γ near zero carry (paired over seeds), how many channels are off, BN-only against
    full training, and whether that grows with depth: every number against a hand computation."""
    rng = np.random.default_rng(1)
    runs, ablations = [], []
    for seed in (0, 1, 2):
        for model, base in (("resnet8", 0.5), ("resnet14", 0.6), ("resnet20", 0.65)):
            for freeze, accuracy, small in (("non-bn", base, 0.3 + 0.1 * model_depth(model) / 20), ("none", 0.9, 0.1)):
                gamma = np.where(rng.random(200) < small, rng.uniform(-0.009, 0.009, 200), rng.uniform(0.2, 1, 200))
                run = with_gamma(fake_run(seed, [accuracy + 0.01 * seed], model=model, freeze=freeze), gamma)
                runs.append(run)
                lost = [0.0, 0.02 * (freeze == "non-bn") + 0.005 * seed, 0.1, 0.3]
                ablations.append(sweep(run, [0.0, 0.01, 0.05, 0.1], [run.test_acc - x for x in lost],
                                       [0.0, np.mean(np.abs(gamma) < 0.01), 0.4, 0.5]))
    ablations.append(sweep(runs[0], [0.01], [0.0], [1.0]))  # a second sweep of a run: the first counts
    result = findings_of(runs, ablations)
    by = {(f.kind, f.title): f for f in result.findings}

    def of(model, freeze):
        return {r.seed: r for r in runs if r.model == model and r.freeze == freeze}

    clamp = by[("clamping small γ to 0", "resnet14 digits non-bn")]
    acc01, share01, acc05, share05, acc1, share1 = clamp.rows
    trained = {s: r.test_acc for s, r in of("resnet14", "non-bn").items()}
    clamped = {s: trained[s] - (0.02 + 0.005 * s) for s in trained}
    d = [clamped[s] - trained[s] for s in (0, 1, 2)]
    assert acc01.a.mean == pytest.approx(np.mean(list(clamped.values()))) and acc01.test.startswith("paired")
    assert acc01.difference.mean == pytest.approx(np.mean(d))
    assert (acc01.difference.low, acc01.difference.high) == pytest.approx(hand_interval(d))
    assert acc01.p == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    shares = [np.mean(np.abs(r.gamma_final[0]) < 0.01) for r in of("resnet14", "non-bn").values()]
    assert share01.a.mean == pytest.approx(np.mean(shares)) and share05.a.mean == pytest.approx(0.4)
    assert acc1.difference.mean == pytest.approx(-0.3) and "|γ| < 0.1 set to 0" in sentence(acc1)

    versus = by[("BN-only vs full training", "resnet14 digits non-bn vs resnet14 digits none")]
    rows = {row.metric: row for row in versus.rows}
    off = rows["channels off (|γ| < 0.01)"]
    assert off.a.mean == pytest.approx(np.mean(shares))
    assert off.b.mean == pytest.approx(np.mean([np.mean(np.abs(r.gamma_final[0]) < 0.01)
                                                for r in of("resnet14", "none").values()]))
    cost = rows["test accuracy lost by setting |γ| < 0.01 to 0"]
    assert cost.difference.mean == pytest.approx(0.02) and cost.test.startswith("paired")

    [trend] = [f for f in result.findings if f.kind == "depth trend" and "non-bn" in f.title]
    accuracy, off_trend = trend.rows
    chosen = [r for r in runs if r.freeze == "non-bn"]
    fractions = [np.mean(np.abs(r.gamma_final[0]) < 0.01) for r in chosen]
    rho = stats.spearmanr([model_depth(r.model) for r in chosen], fractions)
    assert off_trend.a.mean == pytest.approx(rho.statistic) and off_trend.p == pytest.approx(rho.pvalue)
    assert "channels off" in sentence(off_trend) and off_trend.a.n == 9


def test_one_seed_claims_nothing(tmp_path):
    runs = [fake_run(0, [0.5], freeze="non-bn"), fake_run(0, [0.9], freeze="none")]
    copy = fake_run(0, [0.5], freeze="non-bn")
    copy.name = "a copy"
    result = findings_of([*runs, copy])
    assert [g.repeats for g in result.groups] == [["a copy"], []]  # one seed, however many copies
    [finding] = result.findings
    assert all(row.p is None and not row.test and SINGLE in sentence(row) for row in finding.rows)
    write_json(result, tmp_path / "f.json")
    stored = json.loads((tmp_path / "f.json").read_text())
    assert stored["format"] == "bnprobe-findings" and stored["findings"][0]["rows"][0]["p"] is None
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    with pytest.raises(BnprobeError, match="will not replace .*mine.json: it is not a findings file"):
        write_json(result, tmp_path / "mine.json")
    assert (tmp_path / "mine.json").read_text() == '{"my": "notes"}'
    os.mkfifo(tmp_path / "fifo.json")  # refused without being opened (opening would block)
    with pytest.raises(BnprobeError, match="will not replace .*fifo.json"):
        write_json(result, tmp_path / "fifo.json")
    write_json(result, tmp_path / "f.json")  # its own earlier file: replaced


TINY = dict(epochs=1, subset=200, test_subset=100, train_eval_subset=100, lr=0.1)  # tiny_config, one short epoch


@pytest.fixture(scope="module")
def seeded_runs(tmp_path_factory) -> Path:
    from bnprobe.training.train import train

    root = tmp_path_factory.mktemp("findings") / "runs"
    for seed in (0, 1):
        for freeze in ("none", "non-bn"):
            config = tiny_config(**TINY, seed=seed, freeze=freeze).resolved()
            train(config, root / config.run_name(), console=Console(file=io.StringIO()))
    return root


def test_findings_command_and_report_on_real_runs(capsys, seeded_runs, tmp_path):
    code, out, err = run_cli(capsys, "findings", str(seeded_runs), "--json", str(tmp_path / "f.json"))
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps at 80 columns
    assert "BN-only vs full training: resnet8 digits non-bn vs resnet8 digits none" in out
    assert "paired t-test over seeds 0, 1, p = " in out and "mean |grad| of BN γ / conv weights" in out
    stored = json.loads((tmp_path / "f.json").read_text())
    [group] = [g for g in stored["groups"] if g["settings"]["freeze"] == "non-bn"]
    accuracies = [json.loads((seeded_runs / name / "metrics.json").read_text())[-1]["test_acc"]
                  for name in group["runs"]]
    assert group["seeds"] == [0, 1] and group["summary"]["test accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    low, high = hand_interval(accuracies)  # two seeds: often past 0% or 100%, then clipped to them
    summary = group["summary"]["test accuracy"]
    assert [summary["low"], summary["high"]] == pytest.approx(np.clip([low, high], 0, 1))
    assert summary["clipped"] == (low < 0 or high > 1)

    code, out, err = run_cli(capsys, "report", str(seeded_runs), "-o", str(tmp_path / "r.html"))
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert html.index("<h2>Findings</h2>") < html.index('<h2 id="runs">Runs</h2>')
    first = stored["findings"][0]["rows"][0]["sentence"]
    assert first.replace("−", "&minus;") in html or first in html
    assert json.loads(json_path(tmp_path / "r.html").read_text()) == stored


def test_clamp_findings_of_real_runs_are_their_ablation_files(capsys, seeded_runs, tmp_path):
    """After `bnprobe ablate` of each run, the findings say what clamping cost, from the files' own numbers."""
    import shutil

    import h5py

    root = tmp_path / "runs"
    shutil.copytree(seeded_runs, root)
    for run in sorted(root.iterdir()):
        code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0,0.05,0.5", "--test-subset", "50",
                               "--train-subset", "20")
        assert code == 0, err
    code, out, err = run_cli(capsys, "findings", root, "--json", tmp_path / "f.json")
    assert code == 0, err
    assert "clamping small γ to 0" in " ".join(out.split())
    stored = json.loads((tmp_path / "f.json").read_text())
    for group in stored["groups"]:
        [finding] = [f for f in stored["findings"] if f["kind"] == "clamping small γ to 0" and f["title"] == group["label"]]
        accuracy, clamped = finding["rows"]  # τ = 0.05 alone: the sweep has neither 0.01 nor 0.1
        files = [h5py.File(root / name / "ablation.h5") for name in group["runs"]]
        at = [int(np.flatnonzero(np.isclose(f["values"][:], 0.05))[0]) for f in files]
        assert accuracy["metric"] == "test accuracy with |γ| < 0.05 set to 0"
        assert accuracy["a"]["mean"] == pytest.approx(np.mean([f["test_acc"][k] for f, k in zip(files, at)]))
        assert accuracy["b"]["mean"] == pytest.approx(np.mean([f.attrs["baseline_test_acc"] for f in files]))
        assert clamped["a"]["mean"] == pytest.approx(np.mean([f["clamped_fraction"][k] for f, k in zip(files, at)]))
        for f in files:
            f.close()


def test_findings_command_bad_input_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "findings", str(tmp_path / "missing"))
    assert_one_line_error(code, err, "no runs directory at")
    (tmp_path / "notes.json").write_text("[1, 2]")
    code, _, err = run_cli(capsys, "findings", str(tmp_path / "missing"), "--json", str(tmp_path / "notes.json"))
    assert_one_line_error(code, err, "notes.json: it is not a findings file bnprobe wrote")
    assert (tmp_path / "notes.json").read_text() == "[1, 2]"


def _estimate(stored: dict | None) -> Estimate | None:
    """An Estimate as the JSON file holds it (a number that was not finite is null there)."""
    if stored is None:
        return None
    return Estimate(**{k: math.nan if k == "mean" and v is None else v for k, v in stored.items()})


def _row(stored: dict) -> Row:
    """A finding's row as the JSON file holds it, without the sentence said from it."""
    fields = {k: v for k, v in stored.items() if k != "sentence"}
    estimates = {k: _estimate(stored[k]) for k in ("a", "b", "difference")}
    return Row(**{**fields, **estimates, "labels": tuple(stored["labels"])})


class _StoredGroup:
    """A group as the findings file holds it: what findings_output reads of a bnprobe.analysis.findings.Group."""

    def __init__(self, stored: dict):
        self.label, self.seeds, self.repeats = stored["label"], stored["seeds"], stored["repeats"]
        self.runs = [type("StoredRun", (), {"name": name}) for name in stored["runs"]]
        self.key = tuple((name, json.dumps(value)) for name, value in stored["settings"].items())
        self._summary = {name: _estimate(e) for name, e in stored["summary"].items()}

    def summary(self) -> dict[str, Estimate]:
        return self._summary


@pytest.mark.parametrize("name", ["docs/cpu-study/report.findings.json", "docs/norms-cpu.findings.json"])
def test_the_committed_findings_files_are_written_again_byte_for_byte_from_their_numbers(name):
    """The study's findings files, read back into results and written again by findings_output: the same bytes,
    every sentence said again from the numbers beside it (the presenter moved out of the computation unchanged)."""
    text = (REPO / name).read_text(encoding="utf-8")
    stored = json.loads(text)
    findings = [Finding(f["kind"], f["title"], [_row(row) for row in f["rows"]]) for f in stored["findings"]]
    result = Findings([_StoredGroup(g) for g in stored["groups"]], findings)
    assert sum(len(f.rows) for f in findings) >= 8 and len(result.groups) >= 4  # not an empty file
    assert json.dumps(findings_json(result), indent=1, allow_nan=False) == text
