"""docs/cpu-study.md ("A study on two CPU cores") quotes docs/cpu-study/report.findings.json by hand: every
number it quotes is read back here from the page's own text and checked against the JSON, so the two cannot
drift."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = json.loads((ROOT / "docs/cpu-study/report.findings.json").read_text())
STUDY_PAGE = ROOT / "docs/cpu-study.md"
NUMBER = re.compile(r"(p < )?([−+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


def study_section() -> str:
    """The page's text under its title, up to a next section if it has one."""
    text = STUDY_PAGE.read_text()
    return text.split("# A study on two CPU cores\n", 1)[1].split("\n## ", 1)[0]


def bullets() -> dict[str, str]:
    """The section's bullets by their first word, lines joined."""
    items = re.findall(r"^- (.*?)(?=^- |^$)", study_section(), re.S | re.M)
    return {item.split()[0].rstrip(":"): " ".join(item.split()) for item in items}


def quoted(text: str) -> list[tuple[str, float, float]]:
    """(relation, value, half a unit of its last digit) of each number in `text`, model names aside."""
    text = re.sub(r"ResNet-\d+(/\d+)*", "", text)
    found = []
    for bound, token in NUMBER.findall(text):
        digits = token.replace(",", "").replace("−", "-")
        decimals = len(digits.partition(".")[2])
        found.append(("<" if bound else "=", float(digits), 0.5 * 10.0 ** -decimals + 1e-12))
    return found


def finding(kind: str, model: str = "", title: str = "") -> dict:
    matches = [f for f in FINDINGS["findings"] if f["kind"] == kind and f["title"].startswith(model)
               and title in f["title"]]
    assert len(matches) == 1, (kind, model, title)
    return matches[0]


def row(found: dict, metric: str) -> dict:
    return next(r for r in found["rows"] if r["metric"].startswith(metric))


def estimate(value: dict, scale: float = 1.0) -> list[float]:
    return [value["mean"] * scale, value["low"] * scale, value["high"] * scale]


def compared(r: dict) -> list[float]:
    """A vs B in points: A's estimate, B's, their difference, and p."""
    return estimate(r["a"], 100) + estimate(r["b"], 100) + estimate(r["difference"], 100) + [r["p"]]


DEPTHS = ("resnet8", "resnet14", "resnet20")


def same(values) -> list[tuple[str, float]]:
    return [("=", v) for v in values]


def expected() -> dict[str, list[tuple[str, float]]]:
    """What each bullet quotes, in its order, from the JSON: ("=", value) or ("<", a bound every value is under)."""
    full = {d: finding("BN-only vs full training", d) for d in DEPTHS}
    gradient = {d: finding("gradient magnitude, BN vs conv", d) for d in DEPTHS}
    depth = {f: finding("depth trend", title=f" {f}") for f in ("none", "non-bn")}
    features = finding("random features vs BN-only")
    best = [row(full[d], "best-epoch")[side]["mean"] * 100 for d in DEPTHS for side in "ab"]  # either side
    gap = [x for d in DEPTHS for x in estimate(row(full[d], "gap")["difference"], 100) + [row(full[d], "gap")["p"]]]
    gammas = [row(gradient[d], "mean |grad| of BN γ") for d in DEPTHS]
    betas = [row(gradient[d], "mean |grad| of BN β") for d in DEPTHS]
    against = {float(re.search(r"against (\S+)", r["test"]).group(1)) for r in gammas + betas}
    assert len(against) == 1
    return {
        "BN-only": same(x for d in DEPTHS for x in compared(row(full[d], "test accuracy"))),
        "Overfitting": same(gap + [min(best), max(best), FINDINGS["groups"][0]["settings"]["epochs"]]),
        "Depth": same([row(depth["none"], "rank")["a"]["mean"], row(depth["none"], "rank")["a"]["n"],
                       row(depth["none"], "rank")["p"], row(depth["non-bn"], "rank")["a"]["mean"],
                       row(depth["non-bn"], "rank")["p"]]),
        "Random": same(compared(row(features, "test accuracy"))),
        "Gradients": same([x for r in gammas for x in estimate(r["a"])] + [r["a"]["mean"] for r in betas]
                          + list(against)) + [("<", max(r["p"] for r in gammas + betas))],
    }


@pytest.mark.parametrize("bullet", ["BN-only", "Overfitting", "Depth", "Random", "Gradients"])
def test_each_number_a_study_bullet_quotes_is_the_findings_json(bullet):
    numbers = quoted(bullets()[bullet])
    wanted = expected()[bullet]
    assert len(numbers) == len(wanted), (bullet, numbers)
    for (relation, value, half_unit), (kind, truth) in zip(numbers, wanted):
        assert relation == kind, (bullet, value)
        if kind == "=":
            assert abs(value - truth) <= half_unit, f"{bullet}: the page says {value}, the JSON {truth}"
        else:
            assert truth < value, f"{bullet}: the page says every p < {value}; the largest is {truth}"


def test_the_study_setup_the_page_states_is_the_findings_json():
    text = " ".join(study_section().split())
    settings = [g["settings"] for g in FINDINGS["groups"]]
    shared = {key: settings[0][key] for key in settings[0] if all(s[key] == settings[0][key] for s in settings)}
    features = row(finding("random features vs BN-only"), "trainable parameters")
    stated = {
        r"on the same ([\d,]+) training images": shared["subset"],
        r"for (\d+) epochs": shared["epochs"],
        r"batch (\d+)": shared["batch_size"],
        r"lr ([\d.]+),": shared["lr"],
        r"×([\d.]+) after epoch": shared["lr_drop"],
        r"after epoch (\d+)": int(shared["milestones"]),
        r"tested on ([\d,]+) test images": shared["test_subset"],
        r"\(both ([\d,]+) trainable parameters": features["a"]["mean"],
        r"seeds 0, 1, 2: (\d+) runs": sum(len(g["runs"]) for g in FINDINGS["groups"]),
        r"mean \[(\d+)% Student-t interval\]": FINDINGS["confidence"] * 100,
        r"n = (\d+) per side": features["a"]["n"],
    }
    assert features["b"]["mean"] == features["a"]["mean"]
    assert all(g["seeds"] == [0, 1, 2] for g in FINDINGS["groups"])
    for pattern, truth in stated.items():
        found = re.search(pattern, text)
        assert found, f"docs/cpu-study.md no longer says {pattern!r}"
        assert float(found.group(1).replace(",", "")) == pytest.approx(truth), (pattern, truth)
