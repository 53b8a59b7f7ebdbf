"""The report's matplotlib figures, returned as SVG text.

Output is deterministic: ids inside each SVG come from a hash salted with the figure's own key (fixed
across runs, different between figures, so many SVGs inline in one HTML page never share an id by
accident), and the date is left out of the metadata. Figures are built with `matplotlib.figure.Figure`,
never pyplot, so no GUI backend or global figure state is involved. Text stays text (`svg.fonttype
none`): the files are smaller, the words searchable, and WeasyPrint draws them faster than glyph
outlines.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import pickle
import re
import sys
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # headless by default; never switch a live session's backend
    matplotlib.use("Agg")
import matplotlib as mpl  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import Formatter, FuncFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from bnprobe.core.measures import GammaDigest, window_means  # noqa: E402

SVG_NAMESPACE, XLINK_NAMESPACE = "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
SVG_STYLE, SVG_GROUP, SVG_METADATA, SVG_TITLE, SVG_USE, SVG_PATH = (
    f"{{{SVG_NAMESPACE}}}{tag}" for tag in ("style", "g", "metadata", "title", "use", "path"))
NO_ROTATION = re.compile(r"rotate\(-?0 [-\d.e]+ [-\d.e]+\)")
FINE_NUMBER = re.compile(r"-?\d+\.\d{3,}")  # matplotlib writes positions in points with 6 decimals
POSITIONS = ("d", "x", "y", "width", "height")

PAGE_WIDTH_IN = 7.0  # A4 minus 15 mm margins is 7.09 in: figures print at 100 %, fonts at their size
STYLE = {
    "svg.fonttype": "none",
    "font.family": "DejaVu Sans",
    "font.size": 7.5,
    "axes.titlesize": 8.5,
    "axes.titleweight": "bold",
    "axes.titley": 1.0,  # a fixed title position: finding one clear of the ticks measures every label (slow)
    "axes.titlepad": 4.0,
    "axes.labelsize": 7.5,
    "legend.fontsize": 6.5,
    "legend.frameon": True,  # white, borderless: lines under a legend are dimmed, not tangled with it
    "legend.framealpha": 0.85,
    "legend.edgecolor": "none",
    "legend.borderpad": 0.3,
    "xtick.labelsize": 6.5,
    "ytick.labelsize": 6.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,  # a y grid, drawn by to_svg as one path per panel (matplotlib draws a path per line)
    # No tick marks (grid lines and labels say it all): each is one more SVG node for WeasyPrint to draw.
    "xtick.major.size": 0,
    "ytick.major.size": 0,
    "xtick.minor.size": 0,
    "ytick.minor.size": 0,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "path.simplify": True,
}

# One colour per freeze mode and per parameter group, the same in every figure of a report.
FREEZE_COLORS = {
    "none": "#1f77b4",
    "non-bn": "#d62728",
    "non-bn-output": "#ff7f0e",
    "all-but-output": "#7f7f7f",
    "bn": "#2ca02c",
}
GROUP_COLORS = {
    "bn_gamma": "#d62728",
    "bn_beta": "#ff7f0e",
    "conv_weight": "#1f77b4",
    "linear_weight": "#2ca02c",
    "bias": "#9467bd",
}
EXTRA_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                "#7f7f7f")  # matplotlib's tab10, for curves that have no colour of their own
TAU_STYLES = ("-", "--", ":", "-.")


@dataclass
class SvgFigure:
    key: str
    svg: str  # the <svg> element alone, ready to inline in HTML

    @property
    def data_uri(self) -> str:
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode()).decode("ascii")


def late_figure(key: str, index: int, height_in: float, width_in: float = PAGE_WIDTH_IN) -> SvgFigure:
    """A stand-in for the figure `key` while it is still being drawn: an empty SVG of the size new_figure(height_in)
    draws (matplotlib writes a figure's size in points, 72 to the inch), unique by `index` in one document. The
    PDF is laid out around it; bnprobe.reporting.pdf.write draws the real figure in its place (see `late` there)."""
    width, height = 72 * width_in, 72 * height_in
    return SvgFigure(key, f'<svg xmlns="{SVG_NAMESPACE}" width="{width:g}pt" height="{height:g}pt" '
                          f'viewBox="0 0 {width:g} {height:g}"><desc>late figure {index}</desc></svg>')


def color_for(key: str, palette: dict[str, str], fallback_index: int) -> str:
    return palette.get(key) or EXTRA_COLORS[fallback_index % len(EXTRA_COLORS)]


@contextmanager
def new_figure(height_in: float, width_in: float = PAGE_WIDTH_IN) -> Iterator[Figure]:
    with mpl.rc_context(STYLE):
        yield Figure(figsize=(width_in, height_in))


def hover(artist, title: str, points: Optional[Sequence[str]] = None) -> None:
    """Values shown on hover in a browser: `title` on the whole line (or patch), and `points`, one per data
    point, on its markers. They become SVG <title> elements in to_svg."""
    titles = artist.figure.__dict__.setdefault("hover_titles", {})
    gid = f"hover-{len(titles)}"
    artist.set_gid(gid)
    titles[gid] = (title, list(points or ()))


def _add_titles(root: ET.Element, titles: dict[str, tuple[str, list[str]]]) -> None:
    for group in root.iter(SVG_GROUP):
        if group.get("id") not in titles:
            continue
        title, points = titles[group.attrib.pop("id")]
        group.set("class", "hover")  # an attribute keeps the group (and its title) through _unwrap_plain_groups
        group.insert(0, _title(title))
        markers = list(group.iter(SVG_USE))
        if len(markers) == len(points):  # a marker clipped away would shift the rest: then the line's title only
            for marker, text in zip(markers, points):
                marker.append(_title(text))


def _title(text: str) -> ET.Element:
    element = ET.Element(SVG_TITLE)
    element.text = text
    return element


def to_svg(fig: Figure, key: str, hover_values: bool = True) -> SvgFigure:
    """`fig` as SVG, with the values to show on hover (see `hover`) if `hover_values`: a PDF shows none, and
    WeasyPrint walks each <title> as it draws (a tenth of drawing a run's figure)."""
    _fewer_paths(fig)
    buffer = io.StringIO()
    with mpl.rc_context({**STYLE, "svg.hashsalt": f"bnprobe-report:{key}"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    root = ET.fromstring(buffer.getvalue())  # parsing drops the XML prolog and DOCTYPE, invalid inside HTML
    if hover_values:
        _add_titles(root, fig.__dict__.get("hover_titles", {}))
    _simplify(root)
    root.set("class", "plot")
    root.set("role", "img")
    # <svg xmlns=...> and xlink:href, never ns0:svg. ElementTree's prefix map is global and other libraries
    # register prefixes too, so ours are restated right before each use.
    ET.register_namespace("", SVG_NAMESPACE)
    ET.register_namespace("xlink", XLINK_NAMESPACE)
    return SvgFigure(key, ET.tostring(root, encoding="unicode"))


def _fewer_paths(fig: Figure) -> None:
    """Each panel's horizontal grid as one path, and no white backgrounds (the page is white): the same
    picture in about a third fewer SVG paths, each of which WeasyPrint parses and draws on its own."""
    fig.patch.set_visible(False)
    for ax in fig.axes:
        ax.patch.set_visible(False)
        if not ax.get_visible():
            continue
        low, high = sorted(ax.get_ylim())  # final: every artist is in, and the view is computed from them
        levels = [y for y in ax.get_yticks() if low - 1e-9 * (high - low) <= y <= high + 1e-9 * (high - low)]
        if not levels:  # a panel without y ticks (empty_panel) has no grid
            continue
        ax.set_ylim(ax.get_ylim())  # the grid is placed at these ticks: the view must not move any more
        xs = [value for _ in levels for value in (0.0, 1.0, np.nan)]
        ys = [value for y in levels for value in (y, y, np.nan)]
        # Butt caps and no clipping: the lines end at the panel's edges, where matplotlib's clipped square caps
        # ended them. A figure's artist, drawn before every panel (zorder -1): under the data as matplotlib's grid
        # is, and no line of the panel for its legend's loc="best" to avoid.
        fig.add_artist(Line2D(xs, ys, transform=ax.get_yaxis_transform(), color=mpl.rcParams["grid.color"],
                              alpha=mpl.rcParams["grid.alpha"], linewidth=mpl.rcParams["grid.linewidth"],
                              solid_capstyle="butt", zorder=-1, clip_on=False))


def _simplify(root: ET.Element) -> None:
    """Make the SVG cheaper to draw and safe to inline many times in one page, looking the same.

    - Artist groups are numbered per figure (figure_1, text_1, ...), so several figures in one page would
      repeat ids; nothing refers to them. (The ids that are referred to, clip paths and markers, are salted
      by the figure's key.) Empty ones, the zero-length tick marks, go altogether.
    - The RDF metadata goes (matplotlib's credits; the date is already left out for determinism).
    - CSS becomes presentation attributes: the same rendering, and WeasyPrint (whose SVG drawing is most
      of a PDF's time) skips a CSS parse per element and a selector match of the `*{...}` rule per node.
    - Groups left without attributes are unwrapped, and every text's `rotate(-0 x y)` (the identity) goes.
    - Positions are written to 0.01 pt (3.5 µm), not 0.000001 pt: a quarter of the bytes, and WeasyPrint runs
      three regular expressions over each path's text before reading it.
    - A path that only fills (or only strokes) takes its `opacity` as its fill's (stroke's): the same colours,
      without the transparency group WeasyPrint makes for each `opacity` (a legend's frame, a filled histogram).
    """
    for parent in list(root.iter()):  # a list: children are removed on the way
        for child in list(parent):
            if child.tag == SVG_STYLE:  # `*{stroke-linejoin: round; ...}`: inherited from the root instead
                for name, value in _declarations(child.text or "", strip="*{} \n"):
                    root.set(name, value)
                parent.remove(child)
            elif child.tag == SVG_GROUP and set(child.attrib) == {"id"} and not len(child):
                parent.remove(child)
            elif child.tag == SVG_METADATA:  # matplotlib's RDF credits: bytes and namespaces, shown nowhere
                parent.remove(child)
    for element in root.iter():
        if element.tag == SVG_GROUP and "id" in element.attrib:
            del element.attrib["id"]
        style = element.attrib.pop("style", None)
        if style:
            for name, value in _declarations(style):
                element.attrib.setdefault(name, value)
        if NO_ROTATION.fullmatch(element.attrib.get("transform", "")):
            del element.attrib["transform"]
        for name in POSITIONS:
            if name in element.attrib:
                element.set(name, FINE_NUMBER.sub(_hundredths, element.attrib[name]))
    _unwrap_plain_groups(root)
    _opacity_as_paint_opacity(root)


def _hundredths(match: re.Match) -> str:
    text = f"{float(match.group()):.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _opacity_as_paint_opacity(element: ET.Element, fill: str = "black", stroke: str = "none") -> None:
    """See _simplify. `fill` and `stroke`: what the element's parent paints, which it inherits (SVG's defaults)."""
    fill, stroke = element.get("fill", fill), element.get("stroke", stroke)
    if element.tag == SVG_PATH and "opacity" in element.attrib and (fill == "none") != (stroke == "none"):
        paint = "fill-opacity" if stroke == "none" else "stroke-opacity"
        element.set(paint, f"{float(element.attrib.pop('opacity')) * float(element.get(paint, 1)):g}")
    for child in element:
        _opacity_as_paint_opacity(child, fill, stroke)


def _unwrap_plain_groups(parent: ET.Element) -> None:
    """Replace each <g> without attributes by its children: it changes nothing drawn, and every node
    costs WeasyPrint time (matplotlib nests three or four per tick label)."""
    children = []
    for child in parent:
        _unwrap_plain_groups(child)
        if child.tag == SVG_GROUP and not child.attrib:
            children.extend(child)
        else:
            children.append(child)
    parent[:] = children


def _declarations(css: str, strip: str = " ") -> list[tuple[str, str]]:
    pairs = (item.split(":", 1) for item in css.strip(strip).split(";") if ":" in item)
    return [(name.strip(), value.strip()) for name, value in pairs]


class PercentTicks(Formatter):
    """Fractions as percentages with the decimals the tick spacing needs: 10%, 20% but 92.5%, 95%."""

    ticks: Sequence[float] = ()

    def set_locs(self, locs: Sequence[float]) -> None:  # the axis passes every tick before labelling them
        self.ticks = locs

    def __call__(self, value: float, position=None) -> str:
        steps = np.diff(np.sort(np.asarray(self.ticks, dtype=float))) * 100
        step = float(steps.min()) if len(steps) else 1.0
        decimals = next((d for d in range(4) if abs(step * 10**d - round(step * 10**d)) < 1e-6 * 10**d), 4)
        return f"{100 * value:.{decimals}f}%"


def percent_axis(ax, which: str = "y") -> None:
    (ax.yaxis if which == "y" else ax.xaxis).set_major_formatter(PercentTicks())


def short_number(value: float, _position=None) -> str:
    """Tick label 15k for 15000: fewer characters, and WeasyPrint lays out SVG text letter by letter."""
    if abs(value) >= 1000 and value % 1000 == 0:
        return f"{value / 1000:.0f}k"
    return f"{value:g}"


def log_axis(ax) -> None:
    """Log y axis labelled 1e-3, 1e-2, ...: matplotlib's default 10^x labels go through mathtext, which
    costs more than the rest of a figure."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    # Within two decades label 1, 2, 5 x 10^k too, within one every k x 10^k: a lone "1e-2" says little.
    subs = tuple(range(1, 10)) if high / low < 10 else (1.0, 2.0, 5.0) if high / low < 100 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(subs=subs, numticks=8))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")))
    ax.yaxis.set_minor_locator(NullLocator())  # invisible anyway (no tick marks), and each tick costs time


def empty_panel(ax, title: str, message: str) -> None:
    ax.set_title(title, loc="left")
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_frame_on(False)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def hover_curve(line, name: str, xs: Sequence[float], ys: Sequence[float], x_name: str, fmt=_percent,
                x_fmt=lambda x: f"{x:.4g}") -> None:
    """Hover values of a curve: each point's on its markers; on the line, where it starts, ends and peaks."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if not len(xs):
        return
    at = lambda i: f"{fmt(ys[i])} at {x_name} {x_fmt(xs[i])}"  # noqa: E731
    title = f"{name}: {at(0)}" if len(xs) == 1 else f"{name}: {at(0)} → {at(-1)}"
    finite = np.flatnonzero(np.isfinite(ys))
    if len(xs) > 2 and len(finite):
        title += f"; highest {at(int(finite[np.argmax(ys[finite])]))}"
    hover(line, title, [f"{name}, {x_name} {x_fmt(x)}: {fmt(y)}" for x, y in zip(xs, ys)])


# ---- the per-run page: accuracy curves, gradient magnitudes, γ histogram, fraction |γ| < τ by layer ----


RUN_FIGURE_HEIGHT_IN = 5.0
RUN_FIGURE_TICKS = 7  # per axis, what most runs' panels label


@functools.lru_cache(maxsize=1)
def _empty_run_figure() -> bytes:
    """The run figure's four empty panels with their tick labels made, pickled. A report draws this figure for
    every run, and making matplotlib's axes and ticks was over a third of drawing one; unpickling a made
    one costs half of making it. Bytes made here, in this process, never read from anywhere."""
    with new_figure(RUN_FIGURE_HEIGHT_IN) as fig:
        axes = fig.subplots(2, 2)
        fig.subplots_adjust(left=0.08, right=0.985, bottom=0.085, top=0.95, wspace=0.24, hspace=0.42)
        for ax in axes.flat:
            ax.xaxis.get_major_ticks(RUN_FIGURE_TICKS)
            ax.yaxis.get_major_ticks(RUN_FIGURE_TICKS)
        return pickle.dumps(fig)


def run_figure(run, taus: Sequence[float], key: str, hover_values: bool = True) -> SvgFigure:
    """Four panels of one run (a `bnprobe.reporting.collect.Run`); `hover_values`: see to_svg."""
    with mpl.rc_context(STYLE):
        fig = pickle.loads(_empty_run_figure())
        axes = np.reshape(fig.axes, (2, 2))
        _accuracy_curves(axes[0, 0], run)
        _gradient_curves(axes[0, 1], run)
        gamma = run.gamma_digest(taus)
        _gamma_histogram(axes[1, 0], gamma)
        _gamma_fraction_by_layer(axes[1, 1], gamma)
        return to_svg(fig, key, hover_values)


def failed_figure(key: str, message: str, height_in: float = RUN_FIGURE_HEIGHT_IN) -> SvgFigure:
    """A figure of `height_in` that says `message` where a figure could not be drawn."""
    with new_figure(height_in) as fig:
        empty_panel(fig.subplots(), "", message)
        return to_svg(fig, key)


def _accuracy_curves(ax, run) -> None:
    h = run.history
    epochs = h["epoch"]
    marker = "o" if len(epochs) <= 12 else None
    ax.set_title("Accuracy per epoch", loc="left")
    [line] = ax.plot(epochs, h["test_acc"], color="#d62728", label="test", marker=marker, markersize=3)
    hover_curve(line, "test accuracy", epochs, h["test_acc"], "epoch")
    if "train_eval_acc" in h:
        [line] = ax.plot(epochs, h["train_eval_acc"], color="#1f77b4", label="train (eval)", marker=marker,
                         markersize=3)
        hover_curve(line, "train accuracy (eval)", epochs, h["train_eval_acc"], "epoch")
    if "train_acc" in h:
        [line] = ax.plot(epochs, h["train_acc"], color="#1f77b4", alpha=0.45, linestyle=":", label="train (running)")
        hover_curve(line, "train accuracy (running)", epochs, h["train_acc"], "epoch")
    ax.set_xlabel("epoch")
    percent_axis(ax)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.legend(loc="best")


def _gradient_curves(ax, run) -> None:
    title = "Mean |dL/dw| per parameter group"
    if run.grad_steps is None or not run.grad_groups:
        reason = "no gradient telemetry" if run.grad_steps is None else "every group is frozen"
        empty_panel(ax, title, reason)
        return
    ax.set_title(title, loc="left")
    for i, (group, values) in enumerate(run.grad_groups.items()):
        steps, means = window_means(run.grad_steps, values)
        [line] = ax.plot(steps, means, color=color_for(group, GROUP_COLORS, i), label=group)
        hover_curve(line, f"{group} mean |dL/dw|", steps, means, "step", fmt=lambda v: f"{v:.3g}")
    log_axis(ax)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(short_number))
    ax.set_xlabel("optimizer step")
    ax.legend(loc="best", ncol=2)  # frozen groups are named in the caption: SVG text is slow in WeasyPrint


def _gamma_histogram(ax, gamma: Optional[GammaDigest]) -> None:
    title = "BN γ, all layers"
    if gamma is None:
        empty_panel(ax, title, "no BatchNorm γ")
        return
    ax.set_title(title, loc="left")
    if gamma.init_counts is not None:
        patch = ax.stairs(gamma.init_counts, gamma.edges, color="#7f7f7f", linewidth=1.0, label="initialisation")
        hover(patch, gamma.init_summary)
    # filled: one path, not one rectangle per bin (fewer SVG nodes for WeasyPrint to draw)
    patch = ax.stairs(gamma.final_counts, gamma.edges, fill=True, color="#d62728", alpha=0.7,
                      label=f"epoch {gamma.final_epoch}")
    hover(patch, gamma.final_summary)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.set_xlabel("γ")
    ax.set_ylabel("channels")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.legend(loc="best")


def _gamma_fraction_by_layer(ax, gamma: Optional[GammaDigest]) -> None:
    title = "Fraction |γ| < τ by BN layer"
    if gamma is None:
        empty_panel(ax, title, "no BatchNorm γ")
        return
    ax.set_title(title, loc="left")
    fractions, taus = gamma.below, gamma.taus  # (L, T); over all layers: in the caption
    layers = np.arange(len(fractions))
    for i, tau in enumerate(taus):
        [line] = ax.plot(layers, fractions[:, i], color="#d62728", linestyle=TAU_STYLES[i % len(TAU_STYLES)],
                         marker="o" if len(layers) <= 12 else None, markersize=2.5,
                         alpha=1.0 - 0.2 * (i % 3), label=f"τ = {tau:g}")
        top = int(np.argmax(fractions[:, i]))
        hover(line, f"|γ| < {tau:g}: highest in {gamma.layers[top]} ({_percent(fractions[top, i])})",
              [f"{name}: {_percent(f)} with |γ| < {tau:g}" for name, f in zip(gamma.layers, fractions[:, i])])
    ax.set_xlabel("BN layer (input → output)")
    # Zoomed to the data (at least 0-10%): a curve at 2% is invisible on a 0-100% axis.
    highest = float(fractions[:, int(np.argmax(taus))].max()) if len(layers) else 0.0
    ax.set_ylim(-0.02 * max(0.1, highest), min(1.0, max(0.1, highest * 1.15)) * 1.03)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    percent_axis(ax)
    ax.legend(loc="upper left")


# ---- across runs: accuracy vs depth (Frankle et al.'s main figure) and clamp ablations ----------------


@dataclass
class DepthPanel:
    title: str
    # (line label, freeze mode) -> depth -> test accuracies of every seed
    lines: dict[tuple[str, str], dict[int, list[float]]]


def accuracy_vs_depth(panels: Sequence[DepthPanel], key: str, hover_values: bool = True) -> Optional[SvgFigure]:
    """One panel per architecture run at two depths or more (a single depth would be an almost empty chart);
    None when there is none."""
    panels = [p for p in panels if len({d for points in p.lines.values() for d in points}) > 1]
    if not panels:
        return None
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    with new_figure(2.7 * rows + 0.3) as fig:
        axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
        fig.subplots_adjust(left=0.08 if columns == 2 else 0.07, right=0.985, bottom=0.35 / (2.7 * rows + 0.3) + 0.06,
                            top=1 - 0.25 / (2.7 * rows + 0.3) - 0.03, wspace=0.22, hspace=0.45)
        for ax, panel in zip(axes, panels):
            depths = sorted({d for points in panel.lines.values() for d in points})
            for i, ((label, freeze), points) in enumerate(panel.lines.items()):
                xs = sorted(points)
                means = np.array([np.mean(points[d]) for d in xs])
                lows = means - np.array([np.min(points[d]) for d in xs])
                highs = np.array([np.max(points[d]) for d in xs]) - means
                color = color_for(freeze, FREEZE_COLORS, i)
                dashed = "bn=" in label  # another BN variant of the same freeze mode
                bars = ax.errorbar(xs, means, yerr=[lows, highs] if (lows + highs).any() else None, color=color,
                                   marker="o", linestyle="--" if dashed else "-", capsize=2, label=label)
                hover(bars.lines[0], f"freeze {label}", [
                    f"{label}, depth {d}: {_percent(m)}" + (
                        f" (mean of {len(points[d])} runs, {_percent(min(points[d]))} … {_percent(max(points[d]))})"
                        if len(points[d]) > 1 else "") for d, m in zip(xs, means)])
            if len(depths) > 1 and depths[-1] / max(1, depths[0]) >= 4:
                ax.set_xscale("log")
            ax.set_xticks(depths)
            ax.set_xticklabels([str(d) for d in depths])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_title(panel.title, loc="left")
            ax.set_xlabel("depth")
            ax.set_ylabel("test accuracy")
            percent_axis(ax)
            ax.legend(loc="best", title="freeze mode", title_fontsize=6.5)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        return to_svg(fig, key, hover_values)


@dataclass
class AblationCurve:
    label: str
    freeze: str
    mode: str  # "threshold" or "fraction"
    values: np.ndarray  # τ or p
    clamped_fraction: np.ndarray
    test_acc: np.ndarray
    train_acc: Optional[np.ndarray]
    baseline_test_acc: Optional[float]


def ablation_curves(curves: Sequence[AblationCurve], key: str, hover_values: bool = True) -> Optional[SvgFigure]:
    """Accuracy vs τ (threshold sweeps) and vs the fraction of channels clamped (every sweep)."""
    if not curves:
        return None
    by_freeze = len(curves) > len(EXTRA_COLORS)  # too many for one colour and legend entry each
    thresholds = any(c.mode == "threshold" for c in curves)
    with new_figure(3.1) as fig:
        # Accuracy vs τ only when some sweep has τ: an empty panel says nothing.
        left, right = fig.subplots(1, 2) if thresholds else (None, fig.subplots())
        fig.subplots_adjust(left=0.08, right=0.985, bottom=0.15, top=0.91, wspace=0.22)
        shown_freeze: set[str] = set()
        for i, curve in enumerate(curves):
            color = color_for(curve.freeze, FREEZE_COLORS, i) if by_freeze else EXTRA_COLORS[i % len(EXTRA_COLORS)]
            if by_freeze:
                label = None if curve.freeze in shown_freeze else f"freeze {curve.freeze}"
                shown_freeze.add(curve.freeze)
            else:
                label = curve.label
            marker = "o" if len(curve.values) <= 25 else None
            order = np.argsort(curve.clamped_fraction, kind="stable")
            [line] = right.plot(curve.clamped_fraction[order], curve.test_acc[order], color=color, marker=marker,
                                markersize=2.5, label=label)
            hover_curve(line, f"{curve.label} test accuracy", curve.clamped_fraction[order], curve.test_acc[order],
                        "clamped", x_fmt=_percent)
            if curve.train_acc is not None and not by_freeze:
                right.plot(curve.clamped_fraction[order], curve.train_acc[order], color=color, linestyle=":",
                           alpha=0.7)
            if curve.mode == "threshold":
                [line] = left.plot(curve.values, curve.test_acc, color=color, marker=marker, markersize=2.5,
                                   label=label)
                hover_curve(line, f"{curve.label} test accuracy", curve.values, curve.test_acc, "τ")
                if curve.train_acc is not None and not by_freeze:
                    left.plot(curve.values, curve.train_acc, color=color, linestyle=":", alpha=0.7)
        if thresholds:
            left.set_title("Accuracy vs τ (γ := 0 where |γ| < τ)", loc="left")
            left.set_xlabel("τ")
            left.set_ylabel("accuracy")
            percent_axis(left)
            left.legend(loc="lower left")
        right.set_title("Accuracy vs fraction clamped", loc="left")
        right.set_xlabel("fraction of channels with γ := 0")
        right.set_ylabel("accuracy")
        percent_axis(right)
        percent_axis(right, "x")
        right.legend(loc="lower left")
        return to_svg(fig, key, hover_values)
