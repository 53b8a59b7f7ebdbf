"""`bnprobe report RUNS -o report.html|.pdf`: every run under the given directories, their probe and ablation
results and the findings, in one document.

The runs are collected (bnprobe.reporting.collect) and their page figures drawn (bnprobe.reporting.figures, as
SVG text) in worker processes; a PDF is laid out while those figures are drawn (bnprobe.reporting.pdf). The
Jinja2 template and its CSS live in the repository's top-level `templates/` folder; a wheel ships them as data
files under PREFIX/share/bnprobe/templates (see find_templates).
"""

from __future__ import annotations

import math
import os
import re
import site
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import bnprobe
from bnprobe.analysis import findings as statistics
from bnprobe.analysis import findings_output
from bnprobe.analysis.seed_statistics import CONFIDENCE
from bnprobe.core.errors import BnprobeError, first_line
from bnprobe.core.options import REPORT_TAUS
from bnprobe.files import schema
from bnprobe.files.atomic import atomic_write
from bnprobe.files.lock import locked
from bnprobe.reporting import figures, pdf
from bnprobe.reporting.collect import FREEZE_ORDER, Collection, collect, parse_taus
from bnprobe.reporting.norm_figure import norm_figure
from bnprobe.reporting.read import Ablation, Run, Skipped
from bnprobe.reporting.workers import Workers, default_jobs, stop_on_sigterm, workers

SOURCE_TEMPLATES = Path(bnprobe.__file__).resolve().parents[1] / "templates"  # a checkout or an editable install
INSTALLED_TEMPLATES = Path("share", "bnprobe", "templates")  # under an install prefix: pyproject.toml's data-files
TEMPLATE = "report.html.j2"
STYLESHEET = "report.css"
TEMPLATE_FILES = (TEMPLATE, "findings.html.j2", STYLESHEET)  # every file the report reads from its templates folder
OUTPUT_FORMATS = {".html": "html", ".htm": "html", ".pdf": "pdf"}


# ---- the figures -------------------------------------------------------------------------------------------


def _draw(task: tuple[Run, Sequence[float], bool]) -> Any:
    """A run's page figure (an SvgFigure), with hover values if asked. Never raises for the data: a figure that
    cannot be drawn is replaced by one that says why, so that a run already in the report's tables keeps its page."""
    run, taus, hover_values = task
    try:
        return figures.run_figure(run, taus, run.figure_key, hover_values)
    except Exception as exc:  # noqa: BLE001 -- data no reader foresaw (the run was read, its numbers are shown)
        return _failed(run.figure_key, exc)


def _failed(key: str, exc: Exception) -> Any:
    return figures.failed_figure(key, f"This run's figure could not be drawn ({first_line(exc, typed=True)}).")


def draw_run_figures(runs: Sequence[Run], taus: Sequence[float], pool: Optional[Workers] = None,
                     hover_values: bool = True) -> None:
    """Each run's page figure that is not drawn yet, in `pool` when there is one, with hover values if asked."""
    missing = [run for run in runs if run.figure is None]
    tasks = [(run, tuple(taus), hover_values) for run in missing]
    for run, figure in zip(missing, (pool or Workers(1)).map(_draw, tasks)):
        run.figure = figure


def draw_late(runs: Sequence[Run], taus: Sequence[float], pool: Workers) -> dict[str, Callable[[], str]]:
    """Start drawing each run's figure in `pool`, in page order, and give each run a stand-in of its size
    (figures.late_figure) for the PDF's layout; returns what bnprobe.reporting.pdf.write needs to draw each figure in its
    stand-in's place. Nothing (the figures are drawn before the layout) without worker processes for so many
    runs, or where this WeasyPrint cannot take figures late. A PDF shows no hover values: none are drawn."""
    executor = pool.executor(len(runs))
    if executor is None or not pdf.can_draw_late():
        return {}
    late = {}
    for index, run in enumerate(runs):
        drawing = executor.submit(_draw, (run, tuple(taus), False))
        run.figure = figures.late_figure(run.figure_key, index, figures.RUN_FIGURE_HEIGHT_IN)

        def finished(drawing=drawing, key=run.figure_key) -> str:
            try:
                return drawing.result().svg
            except Exception as exc:  # noqa: BLE001 -- a worker that died: the figure says so, the report goes on
                return _failed(key, exc).svg

        late[run.figure.data_uri] = finished
    return late


def depth_panels(runs: Sequence[Run]) -> list:
    panels: dict[tuple, Any] = {}
    for run in runs:
        if run.depth is None:
            continue
        width = f", width ×{run.width}" if run.width != 1 else ""
        key = (run.dataset, run.family, run.width)
        panel = panels.setdefault(key, figures.DepthPanel(f"{run.family}{width} on {run.dataset}", {}))
        variant = ([] if run.norm == "BN" else [run.norm]) + ([] if run.bn == "full" else [f"bn={run.bn}"])
        label = ", ".join([run.freeze, *variant])  # one line per freeze mode and norm variant
        panel.lines.setdefault((label, run.freeze), {}).setdefault(run.depth, []).append(run.test_acc)
    for panel in panels.values():  # legend in the canonical freeze-mode order
        panel.lines = dict(sorted(panel.lines.items(), key=lambda item: (
            FREEZE_ORDER.index(item[0][1]) if item[0][1] in FREEZE_ORDER else 99, item[0][0])))
    return list(panels.values())


def ablation_curves(ablations: Sequence[Ablation]) -> list:
    curves = []
    for a in ablations:
        if a.test_acc is None or a.mode == "dims":  # named metrics, or sets of dimensions rather than a sweep:
            continue  # in the table, not on the curves
        owner = a.run.name if a.run else a.label
        what = ("τ×layer max" if a.per_layer else "τ") if a.mode == "threshold" else (
            "p per layer" if a.per_layer else "p")
        curves.append(figures.AblationCurve(
            label=f"{owner} ({what}{', β:=0' if a.zero_beta else ''})", freeze=a.run.freeze if a.run else a.freeze,
            mode="threshold" if a.mode == "threshold" and not a.per_layer else "fraction",
            values=a.values, clamped_fraction=a.clamped_fraction, test_acc=a.test_acc, train_acc=a.train_acc,
            baseline_test_acc=a.baseline_test_acc,
        ))
    return curves


def build_figures(collection: Collection, taus: Sequence[float], pool: Optional[Workers] = None,
                  hover_values: bool = True) -> dict[str, Any]:
    """The figures across runs, and each run's own that is not drawn yet (in `pool` when there is one); with
    hover values (for HTML) if `hover_values`."""
    draw_run_figures(collection.runs, taus, pool, hover_values)
    return {
        "depth": figures.accuracy_vs_depth(depth_panels(collection.runs), "accuracy-vs-depth", hover_values),
        "ablation": figures.ablation_curves(ablation_curves(collection.ablations), "ablation", hover_values),
        "norms": [(p, norm_figure(p.norms, p.figure_key, hover_values)) for p in collection.probes if p.norms],
    }


# ---- the document ------------------------------------------------------------------------------------------


def install_prefixes() -> list[Path]:
    """Where an installer may have put bnprobe's data files: this environment's prefix (a virtualenv, conda,
    a plain install), the platform scheme's data folder where it differs (Debian's /usr/local for pip with
    the system Python), and the user base when user site-packages are importable (pip install --user)."""
    prefixes = [sys.prefix, sysconfig.get_path("data")]
    if site.ENABLE_USER_SITE and site.USER_BASE:
        prefixes.append(site.USER_BASE)
    return list(dict.fromkeys(Path(p) for p in prefixes if p))


def find_templates(explicit: Optional[Path] = None, *, source: Optional[Path] = None,
                   prefixes: Optional[Sequence[Path]] = None) -> Path:
    """The folder with the report's template and stylesheet: `explicit` (--templates) as given, else the
    repository's templates/ next to the package, else the copy a wheel installed under a prefix.

    The checkout comes first: templates being edited win over a copy left by an earlier `pip install .`.
    """
    if explicit is not None:
        return Path(explicit)  # template_environment names it if it lacks a file
    candidates = [SOURCE_TEMPLATES if source is None else source] + [
        Path(p) / INSTALLED_TEMPLATES for p in (install_prefixes() if prefixes is None else prefixes)]
    for candidate in candidates:
        if _has_templates(candidate):
            return candidate
    raise BnprobeError(f"report templates not found (looked in {', '.join(str(c) for c in candidates)}); "
                       f"reinstall bnprobe or pass --templates DIR")


def _has_templates(folder: Path) -> bool:
    return all((folder / name).is_file() for name in TEMPLATE_FILES)


def template_environment(templates: Path):
    import jinja2

    if not _has_templates(templates):
        raise BnprobeError(f"report templates not found in {templates} (expected {', '.join(TEMPLATE_FILES)})")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, signed_pct=_signed_pct, count=_count, number=_number, unbroken=_unbroken,
                       words=_words)
    return env


def _words(text: str) -> Any:
    """`text` (escaped) with no-break spaces: a line may break around it, not inside it. (No-break spaces, not
    a nowrap span: each inline box costs WeasyPrint about a millisecond of layout.)"""
    from markupsafe import Markup, escape

    return Markup(str(escape(text)).replace(" ", "&nbsp;"))


INTERVAL = re.compile(r"(\S+ \[[^\]]*\])")  # "93.0% [86.1, 100.0]": a value and its interval


def _unbroken(text: str) -> Any:
    """`text` (escaped) with each value-and-interval kept on one line: a narrow table column breaks around them,
    not inside the brackets."""
    from markupsafe import Markup, escape

    return Markup(INTERVAL.sub(lambda match: match.group(1).replace(" ", "&nbsp;"), str(escape(text))))


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}%"


def _signed_pct(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:+.{digits}f}%"


def _count(value: Optional[int]) -> str:
    return "–" if value is None else f"{value:,}"


def _number(value: Optional[float]) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"


def render_html(collection: Collection, taus: Sequence[float], *, embed: str = "inline", title: Optional[str] = None,
                templates: Optional[Path] = None, figures: Optional[dict[str, Any]] = None, findings=None) -> str:
    """The report as one self-contained HTML page. `embed`: "inline" <svg> elements, or "img" data URIs
    (what the PDF uses: WeasyPrint parses an SVG image with a fast XML parser, inline SVG with its slow
    HTML one and styles every node). `templates`: see find_templates."""
    templates = find_templates(templates)
    env = template_environment(templates)
    figures = figures if figures is not None else build_figures(collection, taus, hover_values=embed == "inline")
    findings = findings if findings is not None else statistics.findings_of(collection.runs, collection.ablations)
    runs_with_depth = [r for r in collection.runs if r.depth is not None]
    return env.get_template(TEMPLATE).render(
        title=title or "bnprobe report: " + ", ".join(r.resolve().name or str(r) for r in collection.roots),
        source=", ".join(str(r) for r in collection.roots),
        version=bnprobe.__version__,
        css=(templates / STYLESHEET).read_text(encoding="utf-8"),
        embed=embed,
        taus=list(taus),
        runs=collection.runs,
        skipped=collection.skipped,
        ablations=collection.ablations,
        probes=collection.probes,
        exports=collection.exports,
        diffs=collection.diffs,
        depth_figure=figures["depth"],
        depth_missing=[r.name for r in collection.runs if r.depth is None],
        depth_points=len(runs_with_depth),
        ablation_figure=figures["ablation"],
        norm_figures=figures.get("norms", []),
        any_running_train_acc=any(r.train_acc_is_running for r in collection.runs),
        findings=findings, show=findings_output.show, sentence=findings_output.sentence,
        confidence=CONFIDENCE,
    )


@dataclass
class ReportSummary:
    output: Path
    runs: int
    skipped: list[Skipped]
    ablations: int
    probes: int
    pages: Optional[int]
    seconds: float
    exports: int = 0
    findings: Optional[Path] = None  # the findings' JSON file, beside the report


def check_output(output: Path) -> str:
    """The output format, after making sure the file can be written (before any slow work)."""
    kind = OUTPUT_FORMATS.get(output.suffix.lower())
    if kind is None:
        shown = f"'{output.suffix}'" if output.suffix else "none"
        raise BnprobeError(f"unknown output extension {shown} for {output}: use .html or .pdf")
    try:
        os.stat(output)  # a name too long for the file system, or a symlink loop, is an OSError here
    except (FileNotFoundError, NotADirectoryError):  # told apart below
        pass
    except OSError as exc:
        raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
    if output.is_dir():
        raise BnprobeError(f"cannot write {output}: it is a directory")
    schema.check_outside_runs(output)
    if os.path.lexists(output) and not _is_report(output, kind):
        raise BnprobeError(f"will not replace {output}: it is not a report bnprobe wrote; "
                           f"name another output file")
    parent = output.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise BnprobeError(f"cannot write {output}: {existing} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
    if not os.access(parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise BnprobeError(f"cannot write {output} (permission denied)")
    if kind == "pdf":
        pdf.weasyprint()
    return kind


def _is_report(path: Path, kind: str) -> bool:
    """Whether `report -o` may replace this file: an HTML page with bnprobe's generator tag, or a PDF (whose
    metadata naming bnprobe WeasyPrint compresses). A FIFO or device is never opened."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"%PDF-") if kind == "pdf" else b'<meta name="generator" content="bnprobe' in head


@stop_on_sigterm()
def write_report(
    runs_dirs: Path | Sequence[Path],
    output: Path,
    *,
    taus: Sequence[float] = tuple(parse_taus(REPORT_TAUS)),
    include_unfinished: bool = False,
    title: Optional[str] = None,
    templates: Optional[Path] = None,
    jobs: Optional[int] = None,
    on_progress: Optional[Callable[[str], None]] = None,
) -> ReportSummary:
    """Walk `runs_dirs` (a directory of runs, a run directory, or several), render the report, write `output`
    (.html or .pdf) atomically, holding the lock beside it (one report writer per output)."""
    started = time.perf_counter()
    kind = check_output(output)  # a bad name or place is answered as such, before the lock beside it is taken
    with locked(output, str(output)):
        findings_json = findings_output.json_path(output)
        findings_output.check_json_output(findings_json)
        templates = find_templates(templates)
        template_environment(templates)  # fail on missing templates before reading anything
        say = on_progress or (lambda message: None)
        roots = [Path(runs_dirs)] if isinstance(runs_dirs, (str, Path)) else [Path(r) for r in runs_dirs]
        with workers(jobs or default_jobs()) as pool:
            collection = collect(roots, include_unfinished, taus=taus, pool=pool)
            say(f"read {len(collection.runs)} runs, {len(collection.ablations)} ablations and "
                f"{len(collection.probes)} probes")
            # A PDF is laid out while the run figures are drawn (each is needed only when its page is painted);
            # an HTML page needs them all first.
            late = draw_late(collection.runs, taus, pool) if kind == "pdf" else {}
            embed = "inline" if kind == "html" else "img"
            figures = build_figures(collection, taus, pool, hover_values=embed == "inline")
            say("drew the figures across runs" + ("" if late else " and each run's figure"))
            findings = statistics.findings_of(collection.runs, collection.ablations)
            html = render_html(collection, taus, embed=embed, title=title, templates=templates, figures=figures,
                               findings=findings)
            pages = None
            try:
                if kind == "html":
                    atomic_write(output, lambda f: f.write(html.encode("utf-8")))
                else:
                    document = pdf.render(html, str(templates))
                    pages = len(document.pages)
                    say("laid out the PDF")
                    atomic_write(output, lambda f: pdf.write(document, f, late=late))
            except OSError as exc:
                raise BnprobeError(f"cannot write {output} ({exc.strerror or first_line(exc)})")
        findings_output.write_json(findings, findings_json)
        return ReportSummary(output, len(collection.runs), collection.skipped, len(collection.ablations),
                             len(collection.probes), pages, time.perf_counter() - started, len(collection.exports),
                             findings_json)


