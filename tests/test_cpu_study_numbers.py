"""docs/cpu-study.md ("A study on two CPU cores") quotes docs/cpu-study/report.findings.json by hand: every
number it quotes is read back here from the page's own text and checked against the JSON (the setup against the
JSON's settings and the plan), so the two cannot drift."""

import json
import math
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = json.loads((ROOT / "docs/cpu-study/report.findings.json").read_text())
PLAN = tomllib.loads((ROOT / "examples/cpu-study.toml").read_text())
STUDY_PAGE = ROOT / "docs/cpu-study.md"
NUMBER = re.compile(r"(p < )?(?<![A-Za-z])([−+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
THRESHOLD = re.compile(r"\|γ\| < ([\d.]+)")
DEPTHS = ("resnet8", "resnet14", "resnet20")


def page_sections() -> list[str]:
    """The page's text under its title, split at its `## ` sections."""
    return STUDY_PAGE.read_text().split("# A study on two CPU cores\n", 1)[1].split("\n## ")


def bullets() -> dict[str, str]:
    """The first section's bullets by their first word, lines joined."""
    items = re.findall(r"^- (.*?)(?=^- |^$)", page_sections()[0], re.S | re.M)
    return {item.split()[0].rstrip(":"): " ".join(item.split()) for item in items}


def threshold(text: str) -> float:
    """The one |γ| < τ a bullet speaks of."""
    (tau,) = set(THRESHOLD.findall(text))
    return float(tau)


def quoted(text: str) -> list[tuple[str, float, float]]:
    """(relation, value, half a unit of its last digit) of each number in `text`; model names, the
    initialisation U[0, 1] and the threshold |γ| < τ (see `threshold`) aside."""
    text = THRESHOLD.sub("", re.sub(r"ResNet-\d+(/\d+)*|U\[0, 1\]", "", text))
    found = []
    for bound, token in NUMBER.findall(text):
        digits = token.replace(",", "").replace("−", "-")
        decimals = len(digits.partition(".")[2])
        found.append(("<" if bound else "=", float(digits), 0.5 * 10.0 ** -decimals + 1e-12))
    return found


def finding(kind: str, title: str) -> dict:
    matches = [f for f in FINDINGS["findings"] if f["kind"] == kind and f["title"] == title]
    assert len(matches) == 1, (kind, title)
    return matches[0]


def row(found: dict, metric: str) -> dict:
    """The row named `metric`, or the one row whose name starts with it."""
    exact = [r for r in found["rows"] if r["metric"] == metric]
    (match,) = exact or [r for r in found["rows"] if r["metric"].startswith(metric)]
    return match


def estimate(value: dict, scale: float = 100.0) -> list[float]:
    return [value["mean"] * scale, value["low"] * scale, value["high"] * scale]


def compared(r: dict) -> list[float]:
    """A vs B in points: A's estimate, B's, their difference, and p."""
    return estimate(r["a"]) + estimate(r["b"]) + difference(r)


def difference(r: dict) -> list[float]:
    return estimate(r["difference"]) + [r["p"]]


def same(values) -> list[tuple[str, float]]:
    return [("=", v) for v in values]


def expected(texts: dict[str, str]) -> dict[str, list[tuple[str, float]]]:
    """What each bullet quotes, in its order, from the JSON: ("=", value) or ("<", a bound every value is under)."""
    full = {d: finding("BN-only vs full training", f"{d} cifar10 non-bn vs {d} cifar10 none") for d in DEPTHS}
    gradient = {d: finding("gradient magnitude, BN vs conv", f"{d} cifar10 none") for d in DEPTHS}
    depth = {f: finding("depth trend", f"CIFAR ResNet cifar10 {f}") for f in ("none", "non-bn")}
    accuracy = {d: row(full[d], "test accuracy") for d in DEPTHS}
    rank = {f: row(depth[f], "rank correlation of depth with test accuracy") for f in depth}
    off_rank = row(depth["non-bn"], "rank correlation of depth with the fraction of channels off")
    features = finding("random features vs BN-only",
                       "resnet8 cifar10 all-but-output random_features=2 vs resnet8 cifar10 non-bn-output")
    best = [row(full[d], "best-epoch")[side]["mean"] * 100 for d in DEPTHS for side in "ab"]
    l1 = [g for g in FINDINGS["groups"] if g["settings"]["gamma_l1"]]
    assert len(l1) == 1
    gamma_l1 = l1[0]["settings"]["gamma_l1"]
    regularised = finding("changed BN vs plain BN-only",
                          f"resnet20 cifar10 non-bn gamma_l1={gamma_l1:g} vs resnet20 cifar10 non-bn")
    off = threshold(texts["Regularising"])
    assert off == threshold(texts["Channels"])
    tau = threshold(texts["Clamping"])

    def clamped(freeze: str) -> list[float]:
        c = {d: finding("clamping small γ to 0", f"{d} cifar10 {freeze}") for d in DEPTHS}
        return ([x for d in DEPTHS for x in estimate(row(c[d], f"channels clamped at |γ| < {tau:g}")["a"])]
                + [x for d in DEPTHS for x in difference(row(c[d], f"test accuracy with |γ| < {tau:g} set to 0"))])

    gammas = [row(gradient[d], "mean |grad| of BN γ") for d in DEPTHS]
    betas = [row(gradient[d], "mean |grad| of BN β") for d in DEPTHS]
    against = {float(re.search(r"against (\S+)", r["test"]).group(1)) for r in gammas + betas}
    assert len(against) == 1
    off_rows = [row(full[d], f"channels off (|γ| < {off:g})") for d in DEPTHS]
    return {
        "Depth": same([x for d in DEPTHS for x in estimate(accuracy[d]["a"])]
                      + [rank["non-bn"]["a"]["mean"], rank["non-bn"]["a"]["n"], rank["non-bn"]["p"]]
                      + [x for d in DEPTHS for x in estimate(accuracy[d]["b"])]
                      + [rank["none"]["a"]["mean"], rank["none"]["p"]]),
        "BN-only": same(x for d in DEPTHS for x in difference(accuracy[d])),
        "Overfitting": same([x for d in DEPTHS for x in difference(row(full[d], "gap"))] + [min(best), max(best)]),
        "Regularising": same([gamma_l1] + compared(row(regularised, "test accuracy"))
                             + difference(row(regularised, "gap"))
                             + estimate(row(regularised, f"channels off (|γ| < {off:g})")["a"])
                             + estimate(row(regularised, f"channels off (|γ| < {off:g})")["b"])),
        "Random": same(compared(row(features, "test accuracy"))),
        "Clamping": same(clamped("non-bn") + clamped("none") + [tau * 100]),  # U[0, 1] puts τ below τ
        "Channels": same([off * 100] + [r["a"]["mean"] * 100 for r in off_rows] + [r["b"]["mean"] * 100 for r in off_rows]
                         + [off_rank["a"]["mean"], off_rank["a"]["n"], off_rank["p"]]),
        "Gradients": same([x for r in gammas for x in estimate(r["a"], 1)] + [r["a"]["mean"] for r in betas]
                          + list(against)) + [("<", max(r["p"] for r in gammas + betas))],
    }


BULLETS = ["Depth", "BN-only", "Overfitting", "Regularising", "Random", "Clamping", "Channels", "Gradients"]


def test_the_page_has_each_bullet_this_test_checks():
    assert list(bullets()) == BULLETS


@pytest.mark.parametrize("bullet", BULLETS)
def test_each_number_a_study_bullet_quotes_is_the_findings_json(bullet):
    texts = bullets()
    numbers = quoted(texts[bullet])
    wanted = expected(texts)[bullet]
    assert len(numbers) == len(wanted), (bullet, numbers)
    for (relation, value, half_unit), (kind, truth) in zip(numbers, wanted):
        assert relation == kind, (bullet, value)
        if kind == "=":
            assert abs(value - truth) <= half_unit, f"{bullet}: the page says {value}, the JSON {truth}"
        else:
            assert truth < value, f"{bullet}: the page says every p < {value}; the largest is {truth}"


def test_the_study_setup_the_page_states_is_the_findings_json():
    text = " ".join(page_sections()[0].split())
    settings = [g["settings"] for g in FINDINGS["groups"]]
    shared = {key: settings[0][key] for key in settings[0] if all(s[key] == settings[0][key] for s in settings)}
    features = finding("random features vs BN-only",
                       "resnet8 cifar10 all-but-output random_features=2 vs resnet8 cifar10 non-bn-output")
    trainable = row(features, "trainable parameters")
    stated = {
        r"on the same ([\d,]+) training images": shared["subset"],
        r"for (\d+) epochs": shared["epochs"],
        r"batch (\d+)": shared["batch_size"],
        r"lr ([\d.]+),": shared["lr"],
        r"×([\d.]+) after": shared["lr_drop"],
        r"momentum ([\d.]+)": shared["momentum"],
        r"weight decay ([\d.]+)": shared["weight_decay"],
        r"translations by up to (\d+) pixels": shared["translate"],
        r"tested on ([\d,]+) test images": shared["test_subset"],
        r"(\d+) random conv weights per channel": max(s["random_features"] for s in settings),
        r"\(both ([\d,]+) trainable parameters": trainable["a"]["mean"],
        r"seeds 0, 1, 2: (\d+) runs": sum(len(g["runs"]) for g in FINDINGS["groups"]),
        r"mean \[(\d+)% Student-t interval\]": FINDINGS["confidence"] * 100,
        r"n = (\d+) per side": trainable["a"]["n"],
    }
    assert trainable["b"]["mean"] == trainable["a"]["mean"]
    assert all(g["seeds"] == [0, 1, 2] for g in FINDINGS["groups"])
    assert shared["dataset"] == "cifar10" and shared["flip"] and shared["normalize"] == "per-pixel"
    for pattern, truth in stated.items():
        found = re.search(pattern, text)
        assert found, f"docs/cpu-study.md no longer says {pattern!r}"
        assert float(found.group(1).replace(",", "")) == pytest.approx(truth), (pattern, truth)
    milestones = re.search(r"after epochs (\d+) and (\d+)", text)
    assert milestones and ",".join(milestones.groups()) == shared["milestones"]
    taus = re.search(r"each clamped at \|γ\| < ([\d., ]+[\d])", text).group(1)
    assert [float(t) for t in taus.split(", ")] == [float(t) for t in PLAN["ablate"]["clamp_gamma"].split(",")]


def test_the_budget_the_page_states_is_the_plan():
    text = " ".join(page_sections()[1].split())
    settings = FINDINGS["groups"][0]["settings"]
    steps = math.ceil(settings["subset"] / settings["batch_size"]) * settings["epochs"]  # the last batch is partial
    assert set(re.findall(r"(\d+) steps", text)) == {str(steps)}
    assert f"({settings['subset']:,} images, {settings['epochs']} epochs)" in text
