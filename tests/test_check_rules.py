"""Every rule of `bnprobe check` (issue 33) on a checkpoint built to trigger exactly it, and on a near miss that
triggers nothing; each finding's measured value against a direct computation on the saved tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from bnprobe.analysis.check import CheckConfig, check_stats, run_check
from bnprobe.analysis.probe_results import NormStats
from bnprobe.analysis.rules import RULES, binomial_tail
from bnprobe.core.formats import SCALE_ONLY

C, H = 16, 32  # BatchNorm width; the RMS model's width


def bn_state(layers: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A small conv net's BatchNorm layers, trained-looking: γ around 1, β small, running statistics away from
    their initial values."""
    rng = np.random.default_rng(seed)
    state = {}
    for k in range(layers):
        p = f"features.{k}"
        state[f"{p}.conv.weight"] = rng.normal(size=(C, C, 3, 3)).astype(np.float32)
        state[f"{p}.bn.weight"] = rng.uniform(0.5, 1.5, C).astype(np.float32)
        state[f"{p}.bn.bias"] = rng.normal(0, 0.1, C).astype(np.float32)
        state[f"{p}.bn.running_mean"] = rng.normal(0, 0.5, C).astype(np.float32)
        state[f"{p}.bn.running_var"] = rng.uniform(0.5, 2.0, C).astype(np.float32)
        state[f"{p}.bn.num_batches_tracked"] = np.array(100, dtype=np.int64)
    return state


def rms_state(layers: int = 10, seed: int = 0, scale=None) -> dict[str, np.ndarray]:
    """A llama-like model's RMSNorm scales (`scale(rng)` draws each, default around 1)."""
    rng = np.random.default_rng(seed)
    draw = scale or (lambda r: r.uniform(0.5, 1.5, H))
    state = {f"model.layers.{k // 2}.{('input_layernorm', 'post_attention_layernorm')[k % 2]}.weight":
             draw(rng).astype(np.float32) for k in range(layers)}
    state["model.layers.0.mlp.up_proj.weight"] = rng.normal(size=(2 * H, H)).astype(np.float32)
    return state


def bn(k: int, leaf: str = "weight") -> str:
    return f"features.{k}.bn.{leaf}"


def set_values(state, name, dims, value):
    state[name] = state[name].copy()
    state[name][list(dims)] = value
    return state


def _101(miss):  # 10 (or 6) of a layer's 16 channels off
    return set_values(bn_state(), bn(1), range(6 if miss else 10), 0.0)


def _102(miss):  # 5 (or 3) channels off in every layer, at different indices
    state = bn_state()
    for k in range(4):
        set_values(state, bn(k), [(5 * k + i) % C for i in range(3 if miss else 5)], 0.001)
    return state


def _103(miss):  # a whole layer off (or just above the threshold)
    state = bn_state(layers=6)
    state[bn(2)] = np.full(C, 0.02 if miss else 0.001, dtype=np.float32)
    return state


def _201(miss):
    return set_values(bn_state(), bn(2), [3], 5.0 if miss else 20.0)


def _202(miss):  # dimension 5 blown up in three layers (or only 9x the median)
    state = bn_state()
    for k in (0, 1, 3):
        set_values(state, bn(k), [5], 9.0 * np.median(np.abs(state[bn(k)])) if miss else 20.0)
    return state


def _203(miss):  # dimension 7 off in four layers (or one)
    state = rms_state()
    for name in list(state)[:1 if miss else 4]:
        if "layernorm" in name:
            set_values(state, name, [7], 0.0)
    return state


def _301(miss):
    state = set_values(bn_state(), bn(1), [2], -0.9 if miss else np.nan)
    return set_values(state, bn(3, "bias"), [3], -1e4 if miss else np.inf)


def _302(miss):
    return set_values(bn_state(), bn(1, "running_var"), [4], 1e-3 if miss else -0.5)


def _303(miss):
    return set_values(bn_state(), bn(1, "running_var"), [4, 9], 2e-5 if miss else 0.0)


def _304(miss):
    return set_values(bn_state(), bn(2, "bias"), [1], 6e4 if miss else 1e5)


def _401(miss):
    state = bn_state()
    state[bn(1, "running_mean")] = np.zeros(C, np.float32)
    state[bn(1, "running_var")] = np.ones(C, np.float32)
    return set_values(state, bn(1, "running_var"), [0], 1.01) if miss else state


def _402(miss):
    state = bn_state()
    state[bn(2)], state[bn(2, "bias")] = np.ones(C, np.float32), np.zeros(C, np.float32)
    return set_values(state, bn(2, "bias"), [5], 0.01) if miss else state


def _501(miss):  # Gemma-style stored scales (w around 0) read as the scale itself; or spread too wide to tell
    return rms_state(seed=3, scale=lambda r: r.normal(0, 0.15 if miss else 0.05, H))


BUILDERS = {"BNP101": _101, "BNP102": _102, "BNP103": _103, "BNP201": _201, "BNP202": _202, "BNP203": _203,
            "BNP301": _301, "BNP302": _302, "BNP303": _303, "BNP304": _304, "BNP401": _401, "BNP402": _402,
            "BNP501": _501}


def codes_of(path: Path) -> list[str]:
    result = run_check([path], CheckConfig())
    return [finding.code for f in result.files for finding in f.findings]


def test_every_rule_has_its_checkpoints():
    assert set(BUILDERS) == set(RULES)


@pytest.mark.parametrize("build", [bn_state, rms_state])
def test_a_healthy_checkpoint_has_no_finding(tmp_path, build):
    save_file(build(), str(tmp_path / "m.safetensors"))
    assert codes_of(tmp_path / "m.safetensors") == []


@pytest.mark.parametrize("code", sorted(BUILDERS))
def test_each_rule_fires_alone_on_its_checkpoint_and_not_on_the_near_miss(tmp_path, code):
    save_file(BUILDERS[code](False), str(tmp_path / "hit.safetensors"))
    save_file(BUILDERS[code](True), str(tmp_path / "miss.safetensors"))
    found = codes_of(tmp_path / "hit.safetensors")
    assert found and set(found) == {code}, found
    assert codes_of(tmp_path / "miss.safetensors") == []


def findings(state: dict, tmp_path: Path, code: str):
    save_file(state, str(tmp_path / "m.safetensors"))
    result = run_check([tmp_path / "m.safetensors"], CheckConfig(select=(code,)))
    return result.files[0].findings


def test_values_are_those_of_the_tensors(tmp_path):
    state = _101(False)
    [x] = findings(state, tmp_path, "BNP101")
    g = state[bn(1)]
    assert x.layer == "features.1.bn" and x.value == np.mean(np.abs(g) < 0.01) and x.threshold == 0.5
    assert x.dims == list(np.nonzero(np.abs(g) < 0.01)[0]) and x.dims_total == 10
    state = _102(False)
    [x] = findings(state, tmp_path, "BNP102")
    every = np.concatenate([state[bn(k)] for k in range(4)])
    assert x.layer is None and x.value == pytest.approx(np.mean(np.abs(every) < 0.01))
    state = _202(False)
    [x] = findings(state, tmp_path, "BNP202")
    assert x.dims == [5] and x.value == 3 and x.layer == "features.0.bn"
    state = _201(False)
    [x] = findings(state, tmp_path, "BNP201")
    g = np.abs(state[bn(2)].astype(np.float64))
    assert x.dims == [3] and x.value == pytest.approx(g[3] / np.median(g))
    [x] = findings(_303(False), tmp_path, "BNP303")
    assert x.dims == [4, 9] and x.value == 0.0 and x.threshold == 1e-5
    [x] = findings(_302(False), tmp_path, "BNP302")
    assert x.dims == [4] and x.value == -0.5
    [x] = findings(_304(False), tmp_path, "BNP304")
    assert x.dims == [1] and x.value == 1e5
    x, y = findings(_301(False), tmp_path, "BNP301")
    assert (x.layer, x.dims, y.layer, y.dims) == ("features.1.bn", [2], "features.3.bn", [3])
    assert "γ 1" in x.message and "β 1" in y.message


def test_recurring_off_dims_are_named_with_their_layers_and_their_chance(tmp_path):
    state = _203(False)
    [x] = findings(state, tmp_path, "BNP203")
    names = sorted((n for n in state if "layernorm" in n), key=lambda n: (int(n.split(".")[2]), n))
    gammas = [np.abs(state[n].astype(np.float64)) for n in names]
    off = [np.nonzero(g < 0.01)[0] for g in gammas]
    layers = [k for k, dims in enumerate(off) if 7 in dims]
    rate = sum(len(d) for d in off) / (H * len(gammas))
    assert x.dims == [7] and x.value == len(layers) == 4 and x.depth == layers[0]
    assert f"p = {binomial_tail(4, len(gammas), rate):.2g}" in x.message


def test_binomial_tail_against_a_direct_sum():
    from math import comb

    for k, n, p in ((0, 5, 0.3), (2, 10, 0.1), (10, 10, 0.5), (3, 4, 0.0), (1, 3, 1.0)):
        assert binomial_tail(k, n, p) == pytest.approx(sum(comb(n, i) * p ** i * (1 - p) ** (n - i)
                                                           for i in range(k, n + 1)))


def rms_stats(gammas: list[np.ndarray]) -> NormStats:
    nan = [np.full(g.size, np.nan) for g in gammas]
    return NormStats([f"layers.{k}.norm" for k in range(len(gammas))], gammas, nan, nan, nan,
                     kinds=[SCALE_ONLY] * len(gammas))


def test_scale_convention_with_the_offset_applied():
    """A 1 + w offset applied to scales stored already shifted (around 1): effective ≈ 2, flagged; the same offset
    on w around 0 is Gemma read right."""
    rng = np.random.default_rng(0)
    shifted = rms_stats([1 + rng.normal(1, 0.03, H) for _ in range(6)])
    config = CheckConfig()
    assert [f.code for f in check_stats(shifted, {"scale_offset": 1.0}, config)] == ["BNP501"]
    assert check_stats(shifted, {}, config) == []  # read as stored: scales around 2, a fine model
    gemma = rms_stats([1 + rng.normal(0, 0.05, H) for _ in range(6)])
    assert check_stats(gemma, {"scale_offset": 1.0, "scale_convention": "gemma: 1 + w"}, config) == []


def test_torch_files_and_bnprobe_runs_are_checked_too(tmp_path):
    import torch

    state = {k: torch.from_numpy(v) for k, v in _401(False).items()}
    torch.save({"state_dict": state}, tmp_path / "m.pt")
    assert codes_of(tmp_path / "m.pt") == ["BNP401"]


KINDS = ("BatchNorm", "LayerNorm/GroupNorm-like", "RMSNorm-like")
SPECIALS = [0.0, -0.0, 1.0, np.nan, np.inf, -np.inf, 1e-30, 7e4, -1.0]


def test_no_layers_no_finding():
    assert check_stats(NormStats([], [], [], [], []), {}, CheckConfig()) == []


def test_rules_never_fail_on_any_values():
    """Whatever a file holds (NaN, inf, zeros, empty layers, any kind, widths shared or not), every rule returns
    findings of the documented shape and the JSON is valid."""
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from bnprobe.analysis.check import CheckResult, FileResult
    from bnprobe.reporting.check_output import json_document, sarif_document

    value = st.one_of(st.sampled_from(SPECIALS), st.floats(-3, 3))
    layer = st.tuples(st.sampled_from(KINDS), st.integers(0, 6)).flatmap(
        lambda kc: st.tuples(st.just(kc[0]), *(st.lists(value, min_size=kc[1], max_size=kc[1]) for _ in range(4))))

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(layer, max_size=6), st.sampled_from([{}, {"scale_offset": 1.0}, {"scale_offset": 0.0}]))
    def check(layers, attrs):
        arrays = [[np.array(column, dtype=np.float64) for column in columns] for _, *columns in layers]
        stats = NormStats([f"l{k}" for k in range(len(layers))], *(list(c) for c in zip(*arrays)) if arrays else
                          ([], [], [], []), kinds=[kind for kind, *_ in layers])
        findings = check_stats(stats, attrs, CheckConfig())
        for x in findings:
            assert x.code in RULES and x.severity == RULES[x.code].severity
            assert x.layer is None or x.layer == stats.names[x.depth]
            assert len(x.dims) <= 64 and x.dims_total >= len(x.dims)
            assert all(0 <= d < max(g.size for g in stats.gamma) for d in x.dims)
        result = CheckResult(CheckConfig(), list(RULES.values()), [FileResult("f", "f", "f", len(layers), {}, findings)])
        json.dumps(json_document(result), allow_nan=False)
        json.dumps(sarif_document(result), allow_nan=False)

    check()


def test_a_layer_mostly_off_is_not_full_of_outliers(tmp_path):
    """Where most channels are off (0.001, not 0), the median |γ| is an off channel: the live ones would all be
    "outliers" of 10x it, in both layers; they are BNP101's alone."""
    state = bn_state(layers=6)
    for k in (1, 2):
        set_values(state, bn(k), range(10), 0.001)
    save_file(state, str(tmp_path / "m.safetensors"))
    assert codes_of(tmp_path / "m.safetensors") == ["BNP101", "BNP101"]


def test_the_rules_and_presenters_import_no_torch():
    """`bnprobe rules`, `check --list-rules` and the presenters start without torch; the check of a file waits for
    it only through the static probe's reader (torch-free once issue 32's point 6 lands)."""
    import subprocess
    import sys

    code = ("import sys; import bnprobe.analysis.rules, bnprobe.reporting.check_output, bnprobe.reporting.diff_output;"
            " print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)
