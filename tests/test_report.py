"""bnprobe report: two tiny real runs plus broken copies -> PDF and HTML, checked as a reader meets them
(text per PDF page, the HTML drawn by headless Chromium), and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from cli_helpers import assert_one_line_error, run_cli
from rich.console import Console

import bnprobe
from bnprobe.cli import main
from bnprobe.core.config import TrainConfig
from bnprobe.core.errors import BnprobeError
from bnprobe.core.modelnames import model_depth, model_family
from bnprobe.files import checkpoints
from bnprobe.reporting.collect import collect, parse_taus
from bnprobe.reporting.figures import run_figure
from bnprobe.reporting.read import Run
from bnprobe.reporting.render import (
    INSTALLED_TEMPLATES,
    SOURCE_TEMPLATES,
    TEMPLATE,
    TEMPLATE_FILES,
    find_templates,
    install_prefixes,
    render_html,
    template_environment,
    write_report,
)
from bnprobe.reporting.render import draw_late as report_draw_late

TINY = dict(model="resnet8", dataset="digits", epochs=2, batch_size=64, subset=300, test_subset=150,
            train_eval_subset=200, device="cpu", milestones="")
DEFAULT_TAUS = parse_taus("0.01,0.05,0.1")  # the command's default
BROKEN = {  # run directory -> what the report must say about it
    "broken/garbage-telemetry": "telemetry.h5 is not a readable HDF5 file",
    "broken/no-checkpoint": "no checkpoint.pt",
    "broken/bad-config": "config.json is not readable JSON",
    "broken/unfinished": "unfinished: 2 of 5 epochs",
    "broken/died-before-epoch-1": "no finished epoch",
    "broken/stray.h5": "not a readable HDF5 file",
}


def write_ablation(path: Path, run_dir: Path, mode: str = "threshold") -> None:
    """ablation.h5 as docs/probe-schema.md describes it (what `bnprobe ablate` writes)."""
    values = np.array([0.0, 0.1, 0.2, 0.4])
    clamped = np.array([0, 30, 120, 300])
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "bnprobe-ablation", "version": 1, "mode": mode, "per_layer": False,
                        "zero_beta": False, "total_channels": 336, "checkpoint": str(run_dir / "checkpoint.pt"),
                        "label": run_dir.name, "freeze": "none", "baseline_test_acc": 0.5, "baseline_train_acc": 0.6})
        f["values"] = values
        f["clamped"] = clamped
        f["clamped_fraction"] = clamped / 336
        f["test_acc"] = np.array([0.5, 0.45, 0.3, 0.1])
        f["train_acc"] = np.array([0.6, 0.55, 0.35, 0.1])


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    from bnprobe.training.train import train

    root = tmp_path_factory.mktemp("report") / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is faster, and far faster on a busy machine
    try:
        quiet = Console(file=io.StringIO())
        train(TrainConfig(**TINY), root / "full", console=quiet)
        train(TrainConfig(**{**TINY, "freeze": "non-bn", "lr": 0.2}), root / "bn-only", console=quiet)
    finally:
        torch.set_num_threads(threads)

    def broken_copy(name: str) -> Path:
        return Path(shutil.copytree(root / "full", root / "broken" / name))

    (broken_copy("garbage-telemetry") / "telemetry.h5").write_bytes(b"not an HDF5 file\n" * 64)
    (broken_copy("no-checkpoint") / "checkpoint.pt").unlink()
    (root / "broken" / "no-checkpoint" / "telemetry.h5").unlink()  # with telemetry it is a run copied without it
    (broken_copy("bad-config") / "config.json").write_text("{ not json")
    # A run of 5 epochs stopped after 2: both copies of its config say 5 (one edited alone is refused as such).
    unfinished = broken_copy("unfinished")
    (unfinished / "config.json").write_text(json.dumps({**json.loads((unfinished / "config.json").read_text()),
                                                        "epochs": 5}))
    state = torch.load(unfinished / "checkpoint.pt", weights_only=True)
    state["config"]["epochs"] = 5
    torch.save(state, unfinished / "checkpoint.pt")
    died = root / "broken" / "died-before-epoch-1"
    died.mkdir()
    shutil.copy(root / "full" / "config.json", died)
    (root / "broken" / "stray.h5").write_bytes(b"\0" * 100)
    write_ablation(root / "full" / "ablation.h5", root / "full")
    return root


@pytest.fixture(scope="module")
def report_pdf(runs_root, tmp_path_factory):
    pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint: pip install weasyprint")
    output = tmp_path_factory.mktemp("pdf") / "report.pdf"
    summary = write_report(runs_root, output, jobs=1)
    return output, summary


@pytest.fixture(scope="module")
def report_html(runs_root, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("html") / "report.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(runs_root), "-o", str(output)])
    assert exit_info.value.code == 0
    return output


def pdf_page_texts(path: Path) -> list[str]:
    try:
        from pypdf import PdfReader
    except ImportError:
        if not shutil.which("pdftotext"):
            pytest.skip("reading PDF text needs pypdf (dev extra) or pdftotext (poppler-utils)")
        pages = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True,
                               check=True).stdout.split("\f")
        return [" ".join(page.split()) for page in (pages[:-1] if pages and not pages[-1].strip() else pages)]
    return [" ".join(page.extract_text().split()) for page in PdfReader(path).pages]


# ---- reading runs ------------------------------------------------------------------------------------------


def test_reads_runs_and_skips_broken_ones_with_the_reason(runs_root):
    collection = collect([runs_root])
    assert [run.name for run in collection.runs] == ["full", "bn-only"]  # freeze order: none, then non-bn
    assert {s.name: s.reason for s in collection.skipped}.keys() == BROKEN.keys()
    for skipped in collection.skipped:
        assert BROKEN[skipped.name] in skipped.reason, skipped
    full, bn_only = collection.runs
    assert (full.model, full.depth, full.dataset, full.freeze, full.bn) == ("resnet8", 8, "digits", "none", "full")
    assert full.trainable == full.total == 77_754
    assert bn_only.freeze == "non-bn" and bn_only.trainable == sum(g.size for g in bn_only.gamma_final) * 2
    assert full.epochs_done == 2 and full.history["test_acc"].shape == (2,)
    assert full.gap == pytest.approx(full.history["train_eval_acc"][-1] - full.history["test_acc"][-1])
    with h5py.File(runs_root / "full" / "telemetry.h5") as f:  # γ of the last epoch, in network order
        assert full.gamma_layers[0] == "bn1"
        np.testing.assert_array_equal(full.gamma_final[0], f["bn/bn1/gamma"][-1])
        np.testing.assert_array_equal(full.gamma_init[0], f["bn/bn1/gamma"][0])
    assert set(full.grad_groups) == {"bn_gamma", "bn_beta", "conv_weight", "linear_weight", "bias"}
    assert set(bn_only.grad_groups) == {"bn_gamma", "bn_beta"}  # frozen groups have no curve, not zeros
    assert set(bn_only.frozen_groups) == {"conv_weight", "linear_weight", "bias"}
    [ablation] = collection.ablations
    assert ablation.run is full and ablation.mode == "threshold" and len(ablation.values) == 4


def test_a_read_run_keeps_gamma_numbers_not_arrays(runs_root):
    # collect(taus=...) lets a run's γ arrays go where it was read; what comes back is what the tables show of
    # them (channels, |γ| < τ over every layer) and what its figure shows (histogram counts, fraction per layer),
    # equal to counts from the file itself, and the figure drawn from it is the one drawn from the arrays.
    taus = (0.05, 0.3)
    collection = collect([runs_root], taus=taus, jobs=2)
    for run in collection.runs:
        assert run.figure is None and run.gamma_final == [] and run.gamma_init == []
        with h5py.File(runs_root / run.name / "telemetry.h5") as f:
            layers = [f[f"bn/{layer}/gamma"] for layer in run.gamma_layers]
            final, init = (np.concatenate([g[row] for g in layers]) for row in (-1, 0))
            per_layer = [g[-1] for g in layers]
        assert run.gamma_channels == final.size and run.has_gamma_init
        for tau in taus:
            assert run.fraction_below(tau) == np.count_nonzero(np.abs(final) < tau) / final.size
        with pytest.raises(ValueError, match="summarised"):
            run.fraction_below(0.5)
        with pytest.raises(ValueError, match="summarised"):
            run.gamma_digest((0.5,))
        digest = run.gamma_digest(taus)
        both = np.concatenate([final, init])
        np.testing.assert_allclose(digest.edges[[0, -1]], [both.min(), both.max()])
        assert list(digest.final_counts) == [np.count_nonzero((final >= lo) & ((final < hi) if hi < digest.edges[-1]
                                                                                 else (final <= hi)))
                                             for lo, hi in zip(digest.edges[:-1], digest.edges[1:])]
        assert digest.final_counts.sum() == final.size and digest.init_counts.sum() == init.size
        assert digest.below.tolist() == [[np.count_nonzero(np.abs(g) < tau) / g.size for tau in taus] for g in per_layer]
        [full] = [r for r in collect([runs_root / run.name]).runs]
        assert run_figure(run, taus, "k").svg == run_figure(full, taus, "k").svg


def test_run_without_telemetry_takes_gamma_from_its_checkpoint(runs_root, tmp_path):
    # Runs made before telemetry.h5 existed have config.json, metrics.json and checkpoint.pt only.
    old = Path(shutil.copytree(runs_root / "full", tmp_path / "old", ignore=shutil.ignore_patterns("*.h5")))
    [run] = collect([old]).runs
    [full] = collect([runs_root / "full"]).runs
    assert run.gamma_layers == full.gamma_layers and not run.gamma_init and run.grad_steps is None
    np.testing.assert_array_equal(run.gamma_final[-1], full.gamma_final[-1].astype(np.float32))
    assert (run.trainable, run.total) == (full.trainable, full.total)
    assert any("no telemetry.h5" in note for note in run.notes)


def test_an_unforeseen_error_costs_one_run_not_the_report(runs_root, monkeypatch):
    def read_badly(run, f, checked, use_epochs):
        raise FloatingPointError("something no reader foresaw")

    monkeypatch.setattr("bnprobe.reporting.read._read_telemetry_data", read_badly)
    collection = collect([runs_root / "full"], taus=DEFAULT_TAUS)
    assert not collection.runs
    [skipped] = collection.skipped
    assert skipped.reason == ("could not be read (FloatingPointError: something no reader foresaw); "
                              "left out with it: ablation.h5")
    assert not collection.ablations  # its ablation.h5 goes with it


def test_a_figure_that_cannot_be_drawn_says_so_and_the_run_stays(runs_root, monkeypatch):
    def draw_badly(run, taus, key, hover_values=True):
        raise FloatingPointError("something no drawing foresaw")

    monkeypatch.setattr("bnprobe.reporting.figures.run_figure", draw_badly)
    collection = collect([runs_root / "full"], taus=DEFAULT_TAUS)
    html = render_html(collection, DEFAULT_TAUS)
    assert [run.name for run in collection.runs] == ["full"] and not collection.skipped
    assert "figure could not be drawn (FloatingPointError: something no drawing foresaw)" in html


def test_one_run_directory_and_unfinished_runs(runs_root):
    [run] = collect([runs_root / "full"]).runs
    assert run.name == "full"
    collection = collect([runs_root / "broken"], include_unfinished=True)
    unfinished = [r for r in collection.runs if r.name == "unfinished"]
    assert unfinished and "unfinished: 2 of 5 epochs" in unfinished[0].notes


def test_depth_family_and_bn_variant():
    assert (model_depth("resnet110"), model_depth("vgg38"), model_depth("resnet20"), model_depth("mlp")) == (
        110, 38, 20, None)
    assert model_family("resnet56") == "CIFAR ResNet" and model_family("resnet50") == "Bottleneck ResNet"
    assert model_family("vgg14") == "VGG" and model_family("convs76") == "Bottleneck ResNet by convs"
    assert model_depth("convs76") == 76
    history = {"epoch": np.array([1.0]), "test_acc": np.array([0.5])}
    assert Run("r", Path("r"), {"model": "resnet8"}, history).bn == "full"  # config from before the `bn` field
    assert Run("r", Path("r"), {"model": "resnet8", "bn": "every-k", "bn_every": 2}, history).bn == "every-2"


# ---- the documents -----------------------------------------------------------------------------------------


def test_pdf_pages_and_text(report_pdf):
    path, summary = report_pdf
    pages = pdf_page_texts(path)
    # overview | accuracy vs depth + ablations | one page per run
    assert summary.pages == len(pages) == 4, [p[:80] for p in pages]
    overview, across, *run_pages = pages
    for text in ("Runs", "full", "bn-only", "resnet8", "digits", "non-bn", "77,754", "Skipped"):
        assert text in overview, text
    for name, reason in BROKEN.items():
        assert name in overview and reason.split(":")[0] in overview, name
    # Both runs are resnet8: a chart of one depth says nothing, so it is left out with the reason.
    assert "Accuracy vs depth" in across and "No chart: it needs runs of one architecture" in across
    assert "CIFAR ResNet on digits" not in across
    assert "Clamp-to-zero ablations" in across and "ablation.h5 full" in across  # file, then its run
    for name, page in zip(("full", "bn-only"), run_pages):
        assert page.lstrip().startswith(name), page[:80]
        for text in ("Accuracy per epoch", "Mean |dL/dw| per parameter group", "BN γ, all layers", "τ = 0.05",
                     "|γ| < τ for"):
            assert text in page, (name, text)
    assert "frozen, so without gradient: bias, conv_weight, linear_weight" in run_pages[1]  # the BN-only run
    assert summary.runs == 2 and len(summary.skipped) == len(BROKEN) and summary.ablations == 1


def test_html_is_self_contained_with_inline_svg(report_html):
    html = report_html.read_text(encoding="utf-8")
    assert html.count("<svg ") == 3  # two runs and the ablations (accuracy vs depth: one depth, left out)
    assert "&lt;svg" not in html and "<?xml" not in html
    assert "<link" not in html and "src=\"http" not in html  # nothing to fetch: one file to share
    for name, reason in BROKEN.items():
        assert name in html and reason.split(":")[0] in html


def test_html_is_deterministic_and_ids_unique(runs_root, report_html):
    # Drawn in two worker processes here, in-process by the command: the same bytes.
    collection = collect([runs_root], taus=DEFAULT_TAUS, jobs=2)
    assert render_html(collection, DEFAULT_TAUS) == report_html.read_text(encoding="utf-8")
    ids = re.findall(r' id="([^"]+)"', report_html.read_text(encoding="utf-8"))
    assert len(ids) == len(set(ids)) and len(ids) > 10  # many inline SVGs, one id space


def test_report_of_an_ablation_written_by_bnprobe_ablate(capsys, runs_root, tmp_path, monkeypatch):
    # write_ablation above follows docs/probe-schema.md; this file comes from `bnprobe ablate` itself, so a
    # change in what the command writes that the report does not follow fails here.
    import bnprobe.analysis.ablate

    run = Path(shutil.copytree(runs_root / "bn-only", tmp_path / "runs" / "bn-only"))
    results = []  # what the sweep measured, in memory: the numbers the report must show
    measure = bnprobe.analysis.ablate.run_ablation

    def recorded(*args, **kwargs):
        results.append(measure(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(bnprobe.analysis.ablate, "run_ablation", recorded)
    code, _, err = run_cli(capsys, "ablate", run, "--clamp-gamma", "0,0.05,0.5,5", "--test-subset", "100",
                           "--train-subset", "100", "--device", "cpu")
    assert code == 0, err
    [(result, path)] = results
    assert path == run / "ablation.h5" and result.clamped[-1] == result.total_channels  # τ = 5 clamps every γ

    collection = collect([tmp_path / "runs"])
    assert not collection.skipped, collection.skipped  # e.g. "damaged bnprobe-ablation file (...)"
    [ablation] = collection.ablations
    assert ablation.run is not None and ablation.run.name == "bn-only" and ablation.mode == "threshold"
    np.testing.assert_array_equal(ablation.values, [0, 0.05, 0.5, 5])
    np.testing.assert_array_equal(ablation.test_acc, result.metrics["test_acc"])
    np.testing.assert_array_equal(ablation.train_acc, result.metrics["train_acc"])
    np.testing.assert_array_equal(ablation.clamped_fraction, result.clamped / result.total_channels)
    assert ablation.baseline_test_acc == result.baseline["test_acc"]

    code, _, err = run_cli(capsys, "report", tmp_path / "runs", "-o", tmp_path / "report.html", "--jobs", "1")
    assert code == 0, err
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    section = html[html.index('<section class="ablation" id="ablations">'):]
    section = section[:section.index("</section>")]
    assert "No ablation results" not in section and "<svg " in section and "bn-only (τ)" in section  # the figure
    [row] = re.findall(r"<tr>\s*<td class=\"text name\"><code>ablation.h5</code>.*?</tr>", section, re.S)
    cells = [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
    pct = lambda value: f"{100 * value:.1f}%"  # noqa: E731
    assert cells == ["ablation.h5", "bn-only non-bn", "|γ| &lt; τ", "4: 0 … 5", pct(result.baseline["test_acc"]),
                     pct(result.metrics["test_acc"][-1]), "100.0%"], cells
    assert f"Written by bnprobe {bnprobe.__version__}, torch {torch.__version__} (ablation.h5)." in section


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt when missing (root and apt needed, else skip with the reason)."""
    found = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if not apt or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get is not usable here (needs root): apt-get install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "chromium"]
    result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    if result.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run([apt, "update"], capture_output=True, text=True, env=env, timeout=600)
        result = subprocess.run(install, capture_output=True, text=True, env=env, timeout=1200)
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"chromium could not be installed with apt-get: {last[0]}")
    return found


def test_html_renders_in_headless_chromium(report_html, chromium, tmp_path):
    from PIL import Image

    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,1600",
         report_html.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.exists(), result.stderr[-2000:]
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 200, len(colours)  # text, table stripes, coloured chips and the first figures
    assert (pixels < 200).any(axis=2).mean() > 0.02  # more than a blank page with a title


def in_chromium(chromium: str, html: Path, script: str, tmp_path: Path) -> dict:
    """Open `html` in headless Chromium, run `script` (it leaves JSON in `result`) once the page has loaded,
    and return that JSON: the page is driven as a reader would, by clicks on its own elements."""
    page = tmp_path / "driven.html"
    probe = ("<script>window.addEventListener('load', function () { var result = {};\n" + script +
             "\nvar out = document.createElement('pre'); out.id = 'probe-result';"
             " out.textContent = JSON.stringify(result); document.body.appendChild(out); });</script>")
    page.write_text(html.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,700", "--virtual-time-budget=5000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="probe-result">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    import html as html_module

    return json.loads(html_module.unescape(found.group(1)))


NAMES_IN_TABLE = ("var names = () => Array.from(document.querySelectorAll('table.runs tbody tr'),"
                  " r => r.cells[0].textContent.trim());")


def test_html_run_rows_link_to_their_sections_and_back(report_html, chromium, tmp_path):
    result = in_chromium(chromium, report_html, NAMES_IN_TABLE + """
        var row = document.querySelectorAll('table.runs tbody tr')[1];
        result.name = row.cells[0].textContent.trim();
        row.cells[3].click();  // anywhere on the row, not only its link
        var section = document.getElementById(location.hash.slice(1));
        result.hash = location.hash; result.heading = section.querySelector('h2').textContent;
        result.top = section.getBoundingClientRect().top; result.scrolled = window.scrollY;
        section.querySelector('a.back').click();
        result.back = location.hash; result.rowTop = row.getBoundingClientRect().top;
        document.querySelector('nav.toc a[href="#ablations"]').click();
        result.toc = document.getElementById('ablations').getBoundingClientRect().top;
    """, tmp_path)
    assert result["hash"].startswith("#run-") and result["heading"] == result["name"], result
    assert abs(result["top"]) < 2 and result["scrolled"] > 500, result  # the section's heading at the top
    assert result["back"] == "#row-2" and abs(result["rowTop"]) < 2, result  # back on the row it came from
    assert abs(result["toc"]) < 2, result


def test_html_run_table_sorts_by_any_column(report_html, runs_root, chromium, tmp_path):
    runs = {run.name: run for run in collect([runs_root], taus=DEFAULT_TAUS).runs}
    result = in_chromium(chromium, report_html, NAMES_IN_TABLE + """
        var headings = Array.from(document.querySelectorAll('table.runs thead th'));
        result.before = names();
        for (var text of ['test acc', 'trainable params', 'run']) {
            var heading = headings.find(th => th.textContent.trim() === text);
            heading.click(); result[text + ' up'] = names();
            heading.click(); result[text + ' down'] = names();
        }
    """, tmp_path)
    for column, key in (("test acc", lambda n: runs[n].test_acc), ("trainable params", lambda n: runs[n].trainable),
                        ("run", lambda n: n)):
        assert result[f"{column} up"] == sorted(runs, key=key), (column, result)
        assert result[f"{column} down"] == sorted(runs, key=key, reverse=True), (column, result)
    assert result["test acc up"] != result["test acc down"]  # two runs of different accuracy: sorting moves them


def test_html_figures_show_values_on_hover(report_html):
    html = report_html.read_text(encoding="utf-8")
    # Each epoch's test accuracy on its marker (two runs of two epochs), each layer's fraction |γ| < τ, each
    # ablation point, and a summary on lines without markers.
    assert len(re.findall(r"<title>test accuracy, epoch [12]: \d+\.\d%</title>", html)) == 4
    assert re.search(r"<title>layer1\.0\.bn1: \d+\.\d% with \|γ\| &lt; 0\.05</title>", html)
    assert re.search(r"<title>full \(τ\) test accuracy, τ 0\.2: 30\.0%</title>", html)
    assert "<title>bn_gamma mean |dL/dw|: " in html


def test_run_figures_start_from_the_same_empty_panels_and_grid_each_panel_in_one_path(runs_root):
    from bnprobe.reporting import figures

    full = collect([runs_root / "full"]).runs[0]
    bare = collect([runs_root / "full"]).runs[0]
    bare.grad_steps, bare.gamma_final, bare.gamma_init = None, [], []  # three empty panels: no ticks, no grid
    figures._empty_run_figure.cache_clear()
    first = figures.run_figure(full, DEFAULT_TAUS, "k").svg
    assert figures.run_figure(bare, DEFAULT_TAUS, "k").svg != first
    assert figures.run_figure(full, DEFAULT_TAUS, "k").svg == first  # nothing of one run stays for the next
    with figures.new_figure(figures.RUN_FIGURE_HEIGHT_IN) as fig:  # made the plain way, not from the made panels
        axes = fig.subplots(2, 2)
        fig.subplots_adjust(left=0.08, right=0.985, bottom=0.085, top=0.95, wspace=0.24, hspace=0.42)
        figures._accuracy_curves(axes[0, 0], full)
        figures._gradient_curves(axes[0, 1], full)
        figures._gamma_histogram(axes[1, 0], full.gamma_digest(DEFAULT_TAUS))
        figures._gamma_fraction_by_layer(axes[1, 1], full.gamma_digest(DEFAULT_TAUS))
        assert figures.to_svg(fig, "k").svg == first
    root = ET.fromstring(first)
    grids = [p for p in root.iter(f"{{{figures.SVG_NAMESPACE}}}path") if p.get("stroke") == "#b0b0b0"]
    assert len(grids) == 4  # one per panel, a line per y tick label in each
    labels = [t for t in root.iter(f"{{{figures.SVG_NAMESPACE}}}text") if t.get("text-anchor") == "end"]
    assert sum(p.get("d").count("M") for p in grids) == len(labels)
    white = [p for p in root.iter() if p.get("fill") == "#ffffff"]  # the page is white already: only legends'
    assert len(white) == 4 and all(p.get("fill-opacity") == "0.85" for p in white)
    # `opacity` makes WeasyPrint draw a transparency group: on a path that only fills, it is the fill's opacity
    assert not [p for p in root.iter() if p.get("opacity") is not None]
    svg = ET.fromstring(figures.run_figure(bare, DEFAULT_TAUS, "k").svg)
    assert len([p for p in svg.iter(f"{{{figures.SVG_NAMESPACE}}}path") if p.get("stroke") == "#b0b0b0"]) == 1


def test_figures_for_a_pdf_leave_out_the_hover_values_and_nothing_else(runs_root):
    from bnprobe.reporting import figures

    [run] = collect([runs_root / "full"]).runs
    with_titles, without = (ET.fromstring(figures.run_figure(run, DEFAULT_TAUS, "k", hover).svg)
                             for hover in (True, False))
    def drawn(root):
        return [(e.tag, e.get("d"), e.text) for e in root.iter() if e.tag.split("}")[1] in ("path", "text", "use")]

    assert drawn(with_titles) == drawn(without)
    assert len(list(with_titles.iter(f"{{{figures.SVG_NAMESPACE}}}title"))) > 4
    assert not list(without.iter(f"{{{figures.SVG_NAMESPACE}}}title"))


def test_opacity_becomes_the_fill_or_stroke_opacity_only_where_that_paints_the_same():
    from bnprobe.reporting.figures import SVG_NAMESPACE, _simplify

    root = ET.fromstring(f"""<svg xmlns="{SVG_NAMESPACE}">
      <path id="fill" d="M 0 0 L 1 1" fill="#ffffff" opacity="0.85"/>
      <path id="stroke" d="M 0 0 L 1 1" fill="none" stroke="#000000" stroke-opacity="0.5" opacity="0.5"/>
      <path id="both" d="M 0 0 L 1 1" fill="#ffffff" stroke="#000000" opacity="0.5"/>
      <g stroke="#000000"><path id="inherits-a-stroke" d="M 0 0 L 1 1" fill="#ffffff" opacity="0.5"/></g>
    </svg>""")
    _simplify(root)
    paths = {p.get("id"): p.attrib for p in root.iter(f"{{{SVG_NAMESPACE}}}path")}
    assert paths["fill"]["fill-opacity"] == "0.85" and "opacity" not in paths["fill"]
    assert paths["stroke"]["stroke-opacity"] == "0.25" and "opacity" not in paths["stroke"]
    # fill and stroke overlap: `opacity` (one group) is not the two opacities apart
    assert paths["both"]["opacity"] == "0.5" and paths["inherits-a-stroke"]["opacity"] == "0.5"


def test_figures_without_information_are_left_out():
    from bnprobe.reporting.figures import AblationCurve, DepthPanel, ablation_curves, accuracy_vs_depth

    one_depth = DepthPanel("CIFAR ResNet on digits", {("none", "none"): {8: [0.5, 0.6]}})
    two_depths = DepthPanel("VGG on digits", {("none", "none"): {11: [0.7]}, ("bn", "bn"): {11: [0.6], 16: [0.65]}})
    assert accuracy_vs_depth([one_depth], "depth") is None
    svg = accuracy_vs_depth([one_depth, two_depths], "depth").svg
    assert "VGG on digits" in svg and "CIFAR ResNet" not in svg
    fractions = AblationCurve("run (p)", "none", "fraction", np.linspace(0, 0.5, 3), np.linspace(0, 0.5, 3),
                              np.array([0.9, 0.7, 0.2]), None, 0.9)
    svg = ablation_curves([fractions], "ablation").svg  # no threshold sweep: no accuracy-vs-τ panel
    assert "Accuracy vs fraction clamped" in svg and "Accuracy vs τ" not in svg and "no threshold sweeps" not in svg
    thresholds = AblationCurve("run (τ)", "none", "threshold", np.linspace(0, 0.2, 3), np.linspace(0, 0.5, 3),
                               np.array([0.9, 0.7, 0.2]), None, 0.9)
    assert "Accuracy vs τ" in ablation_curves([fractions, thresholds], "ablation").svg


@pytest.fixture(scope="module")
def four_runs(runs_root, tmp_path_factory) -> Path:
    """Four readable runs: enough for the report to read them in worker processes and draw their figures there
    while it lays out a PDF."""
    root = tmp_path_factory.mktemp("four") / "runs"
    for name in ("full", "bn-only"):
        for copy in ("a", "b"):
            shutil.copytree(runs_root / name, root / f"{name}-{copy}", ignore=shutil.ignore_patterns("ablation.h5"))
    return root


def test_pdf_laid_out_while_its_figures_are_drawn_is_the_pdf_drawn_first(four_runs, tmp_path, monkeypatch):
    # jobs=2: the runs are read, then their figures drawn, in workers while the PDF is laid out around stand-ins
    # of the figures' size, each figure drawn in place when its page is painted. jobs=1: every figure first.
    pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint")
    from bnprobe.reporting import pdf
    from bnprobe.reporting import render as report

    assert pdf.can_draw_late()
    taken = []
    monkeypatch.setattr(report, "draw_late", lambda *args: taken.append(report_draw_late(*args)) or taken[-1])
    late, first = tmp_path / "late.pdf", tmp_path / "first.pdf"
    write_report(four_runs, late, jobs=2)
    assert len(taken[0]) == 4  # every run's figure came late
    assert not any("<title>" in draw() for draw in taken[0].values())  # a PDF shows no hover values
    write_report(four_runs, first, jobs=1)
    assert taken[1] == {}
    late_text, first_text = pdf_page_texts(late), pdf_page_texts(first)
    assert late_text == first_text and len(late_text) > 4
    assert sum("Accuracy per epoch" in page for page in late_text) == 4  # each run's figure, drawn


def test_a_weasyprint_that_cannot_take_figures_late_gets_them_first(four_runs, tmp_path, monkeypatch):
    pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint")
    from bnprobe.reporting import pdf

    monkeypatch.setattr(pdf, "can_draw_late", lambda: False)
    monkeypatch.setattr(pdf, "figures_drawn_late", None)  # would fail if it were used
    write_report(four_runs, tmp_path / "report.pdf", jobs=2)
    assert sum("Accuracy per epoch" in page for page in pdf_page_texts(tmp_path / "report.pdf")) == 4


def test_a_late_figure_that_cannot_be_drawn_says_so_in_the_pdf(four_runs, tmp_path, monkeypatch):
    pytest.importorskip("weasyprint", reason="PDF output needs WeasyPrint")

    def draw_badly(run, taus, key, hover_values=True):
        raise FloatingPointError("something no drawing foresaw")

    monkeypatch.setattr("bnprobe.reporting.figures.run_figure", draw_badly)  # the workers are forked after this
    summary = write_report(four_runs, tmp_path / "report.pdf", jobs=2)
    assert summary.runs == 4
    text = " ".join(pdf_page_texts(tmp_path / "report.pdf"))
    assert text.count("figure could not be drawn (FloatingPointError: something no drawing foresaw)") == 4


def test_pdf_bookmarks_one_per_run_and_contents_with_pages(report_pdf):
    from pypdf import PdfReader

    path, _ = report_pdf
    reader = PdfReader(path)

    def titles(outline) -> list[str]:
        return [t for item in outline for t in (titles(item) if isinstance(item, list) else [item.title])]

    bookmarks = titles(reader.outline)
    assert bookmarks.count("full") == 1 and bookmarks.count("bn-only") == 1, bookmarks
    assert "Contents" not in bookmarks and "Runs" in bookmarks and "Clamp-to-zero ablations" in bookmarks, bookmarks
    def items(outline) -> list:
        return [i for item in outline for i in (items(item) if isinstance(item, list) else [item])]

    runs = [item for item in items(reader.outline) if item.title in ("full", "bn-only")]
    assert {reader.get_destination_page_number(item) for item in runs} == {2, 3}  # each run's bookmark: its page
    overview = " ".join(reader.pages[0].extract_text().split())
    assert re.search(r"full 3 bn-only 4", overview), overview  # the contents give page numbers


# ---- bad input: one line, no traceback ---------------------------------------------------------------------


@pytest.mark.parametrize("case,pattern", [
    ("missing runs dir", "no runs directory at"),
    ("no runs in it", "no runs under"),
    ("output under a file", "is not a directory"),
    ("output is a directory", "is a directory"),
    ("unknown extension", "unknown output extension '.docx'"),
    ("no extension", "unknown output extension none"),
    ("bad taus", "--taus must be a number"),
    ("missing templates", "report templates not found"),
])
def test_bad_input_is_one_line(capsys, tmp_path, runs_root, case, pattern):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "dir.html").mkdir()
    argv = {
        "missing runs dir": [tmp_path / "nope", "-o", tmp_path / "r.html"],
        "no runs in it": [tmp_path / "empty", "-o", tmp_path / "r.html"],
        "output under a file": [runs_root, "-o", blocker / "r.html"],
        "output is a directory": [runs_root, "-o", tmp_path / "dir.html"],
        "unknown extension": [runs_root, "-o", tmp_path / "r.docx"],
        "no extension": [runs_root, "-o", tmp_path / "report"],
        "bad taus": [runs_root, "-o", tmp_path / "r.html", "--taus", "small"],
        "missing templates": [runs_root, "-o", tmp_path / "r.html", "--templates", tmp_path / "empty"],
    }[case]
    code, _, err = run_cli(capsys, "report", *argv)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "r.html").exists() and blocker.read_text() == "not a directory"


def test_the_output_is_checked_once_before_its_lock_and_from_python_too(capsys, tmp_path, runs_root, monkeypatch):
    # The CLI checked it, then write_report again: an existing output's first 64 KB were read twice.
    from bnprobe.files import lock
    from bnprobe.reporting import render as report

    output = tmp_path / "r.html"
    output.write_text('<html><head><meta name="generator" content="bnprobe 0"></head></html>')  # an earlier report
    reads, locks = [], []
    is_report, locked = report._is_report, lock.locked
    monkeypatch.setattr(report, "_is_report", lambda path, kind: reads.append(path) or is_report(path, kind))
    monkeypatch.setattr(report, "locked", lambda target, what: locks.append(reads.copy()) or locked(target, what))
    assert run_cli(capsys, "report", runs_root, "-o", output, "--jobs", "1")[0] == 0
    assert reads == [output] and locks == [[output]]  # read once, and before the lock was taken
    assert "<svg" in output.read_text()  # replaced by the new report
    mine = tmp_path / "mine.html"
    mine.write_text("my notes")
    with pytest.raises(BnprobeError, match="will not replace"):  # write_report from Python checks it as well
        report.write_report(runs_root, mine)
    assert mine.read_text() == "my notes" and reads == [output, mine] and len(locks) == 1


def test_templates_sit_next_to_the_package():
    assert SOURCE_TEMPLATES == Path(bnprobe.__file__).resolve().parents[1] / "templates"
    assert find_templates() == SOURCE_TEMPLATES  # a checkout: its own templates, whatever is installed
    with pytest.raises(BnprobeError, match="report templates not found"):
        template_environment(SOURCE_TEMPLATES / "missing")


def copy_templates(folder: Path, names=TEMPLATE_FILES) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(SOURCE_TEMPLATES / name, folder)
    return folder


def test_templates_lookup_order_with_an_installed_copy(tmp_path, monkeypatch):
    # A wheel install: no templates/ next to the package, the data files under sys.prefix.
    prefix = tmp_path / "prefix"
    installed = copy_templates(prefix / INSTALLED_TEMPLATES)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert install_prefixes()[0] == prefix
    no_checkout = tmp_path / "site-packages" / "templates"
    assert find_templates(source=no_checkout) == installed
    checkout = copy_templates(tmp_path / "checkout" / "templates")
    assert find_templates(source=checkout) == checkout  # edited templates win over a stale installed copy
    assert find_templates(tmp_path / "mine", source=checkout) == tmp_path / "mine"  # --templates, as given
    copy_templates(tmp_path / "half" / INSTALLED_TEMPLATES, names=(TEMPLATE,))  # no stylesheet: not a candidate
    with pytest.raises(BnprobeError, match=r"report templates not found \(looked in .*site-packages/templates, "
                                           r".*half/share/bnprobe/templates\); reinstall bnprobe or pass --templates"):
        find_templates(source=no_checkout, prefixes=[tmp_path / "half"])


def test_report_command_finds_installed_templates(capsys, runs_root, tmp_path, monkeypatch):
    prefix = tmp_path / "prefix"
    copy_templates(prefix / INSTALLED_TEMPLATES)
    monkeypatch.setattr("bnprobe.reporting.render.SOURCE_TEMPLATES", tmp_path / "site-packages" / "templates")
    monkeypatch.setattr("bnprobe.reporting.render.install_prefixes", lambda: [prefix])
    code, out, err = run_cli(capsys, "report", runs_root / "full", "-o", tmp_path / "r.html", "--jobs", "1")
    assert code == 0 and "Wrote" in out, err
    assert "Clamp-to-zero ablations" in (tmp_path / "r.html").read_text(encoding="utf-8")
    shutil.rmtree(prefix)
    code, _, err = run_cli(capsys, "report", runs_root / "full", "-o", tmp_path / "r2.html")
    assert_one_line_error(code, err, "pass --templates DIR")
    assert not (tmp_path / "r2.html").exists()


# ---- checkpoints cut short, and results inside skipped runs ------------------------------------------------


def test_truncated_checkpoint_is_skipped_with_the_reason(runs_root, tmp_path):
    # A copy cut short (a full disk, an interrupted rsync) loses the zip's central directory at the end.
    cut = Path(shutil.copytree(runs_root / "full", tmp_path / "runs" / "cut", ignore=shutil.ignore_patterns("*.h5")))
    shutil.copy(runs_root / "full" / "telemetry.h5", cut)  # with telemetry: the checkpoint's tensors are never read
    checkpoint = cut / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:50_000])
    collection = collect([tmp_path / "runs"])
    assert not collection.runs
    [skipped] = collection.skipped
    assert skipped.name == "cut" and "checkpoint.pt is truncated or damaged" in skipped.reason, skipped


def test_legacy_pickle_checkpoint_is_accepted_without_loading(runs_root, tmp_path):
    legacy = Path(shutil.copytree(runs_root / "full", tmp_path / "legacy"))
    state = torch.load(legacy / "checkpoint.pt", weights_only=True)
    torch.save(state, legacy / "checkpoint.pt", _use_new_zipfile_serialization=False)
    assert (legacy / "checkpoint.pt").read_bytes()[:1] == b"\x80"
    [run] = collect([legacy]).runs
    assert run.name == "legacy"


def test_results_inside_a_skipped_run_are_left_out_with_it(runs_root, tmp_path):
    root = tmp_path / "runs"
    broken = Path(shutil.copytree(runs_root / "full", root / "broken", ignore=shutil.ignore_patterns("*.h5")))
    (broken / "telemetry.h5").write_bytes(b"not an HDF5 file\n" * 64)
    write_ablation(broken / "ablation.h5", broken)
    with h5py.File(broken / "probe.h5", "w") as f:  # docs/probe-schema.md, one checkpoint
        f.attrs.update({"format": "bnprobe-probe", "version": 1})
        f["taus"] = np.array([0.01])
        g = f.create_group("checkpoints/0")
        g.attrs.update({"label": "broken", "accuracy": 0.5, "mean_abs_gamma": 0.3})
        g["frac_below_all"] = np.array([0.1])
    write_ablation(root / "ablation.h5", broken)  # outside any run directory (ablate on a bare checkpoint): kept
    collection = collect([root])
    assert not collection.runs and not collection.probes
    [skipped] = collection.skipped
    assert skipped.name == "broken" and "telemetry.h5 is not a readable HDF5 file" in skipped.reason
    assert skipped.reason.endswith("; left out with it: ablation.h5, probe.h5"), skipped
    [kept] = collection.ablations
    assert kept.name == "ablation.h5" and kept.run is None
    html = render_html(collection, DEFAULT_TAUS)
    assert html.count("ablation.h5") == 2  # the kept file's table row, and the skipped run's reason


def test_random_features_runs_count_only_their_trained_elements(tmp_path):
    """--random-features trains K elements per output channel of whole conv tensors: the report's trainable
    count is training's own (the checkpoint's), not the sum of the tensors the mask lives in."""
    from bnprobe.files import runs
    from bnprobe.training.train import train

    config = TrainConfig(model="resnet8", dataset="digits", epochs=1, batch_size=64, subset=200, test_subset=100,
                         milestones="", device="cpu", freeze="all-but-output", random_features=2)
    train(config, tmp_path / "rf", console=Console(quiet=True))
    state = checkpoints.load_checkpoint(runs.checkpoint_path(tmp_path / "rf"))
    [run] = collect([tmp_path]).runs
    assert (run.trainable, run.total) == (state["trainable"], state["total"])
    with h5py.File(tmp_path / "rf" / "telemetry.h5") as f:  # the whole masked tensors are far more
        assert f["params/numel"][:][f["params/trainable"][:].astype(bool)].sum() > 10 * state["trainable"]


def test_findings_cells_keep_a_value_and_its_interval_on_one_line():
    from bnprobe.reporting.render import _unbroken

    assert str(_unbroken("93.0% [86.1, 100.0] clipped <b>")) == (
        "93.0%&nbsp;[86.1,&nbsp;100.0] clipped &lt;b&gt;")
    assert str(_unbroken("0.00167 (n = 1)")) == "0.00167 (n = 1)"  # no interval: as it was, escaped


def test_workers_start_only_for_enough_tasks_and_never_more_than_the_tasks():
    from bnprobe.reporting.workers import FEW, workers

    with workers(64) as pool:
        assert pool.executor(FEW - 1) is None and pool.started is None  # a few tasks: here, nothing started
        assert pool.map(abs, [-1, -2]) == [1, 2]
        executor = pool.executor(5)
        assert executor is not None and executor._max_workers == 5  # not 64 processes for 5 runs
        assert pool.map(abs, [-1, -2, -3, -4, -5]) == [1, 2, 3, 4, 5]
    with workers(1) as pool:
        assert pool.executor(100) is None


def test_workers_run_below_the_report_only_on_a_quiet_machine(monkeypatch):
    """Issue 21: niced workers starved beside a busy process (2.4x the time of 67b3346 beside two busy loops):
    they are niced only when other processes keep less than half a core busy, read from the machine's ticks."""
    from bnprobe.reporting import workers

    monkeypatch.setattr(workers.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(workers, "default_jobs", lambda: 2)

    def ticks(*readings):
        return iter(readings).__next__

    # 200 ticks over both cores: 190 idle is 0.1 core busy (quiet), 100 idle is one core busy (a neighbour)
    assert workers.worker_niceness(ticks((1000, 5000), (1190, 5200))) == workers.QUIET_NICENESS
    assert workers.worker_niceness(ticks((1000, 5000), (1100, 5200))) == 0
    assert workers.worker_niceness(ticks((1000, 5000), (1160, 5200))) == workers.QUIET_NICENESS  # 0.4 core busy
    assert workers.worker_niceness(ticks((1000, 5000), (1140, 5200))) == 0  # 0.6 core: half a core or more

    def unreadable():
        raise OSError("no /proc/stat")

    assert workers.worker_niceness(unreadable) == 0
    if os.path.exists("/proc/stat"):
        idle, total = workers.cpu_ticks()
        assert 0 <= idle <= total
