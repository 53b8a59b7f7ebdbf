"""The report's figure of one checkpoint's normalisation layers (a probe.h5 of version 4, for a checkpoint with a
norm other than BatchNorm): |γ| by depth, its median and extremes, and the dimensions that are outliers in
several layers, the static signature of an LLM's massive activations. Kept apart from figures.py, whose
figures are of runs and of sweeps across runs."""

from __future__ import annotations

import numpy as np

from bnprobe.reporting.figures import EXTRA_COLORS, SvgFigure, empty_panel, hover, log_axis, new_figure, to_svg
from bnprobe.reporting.read import NormDigest

NORM_FIGURE_HEIGHT_IN = 2.8
LOG_SPAN = 100  # |γ| spanning more than this factor (outliers far above the bulk) is drawn on a log axis


def norm_figure(digest: NormDigest, key: str, hover_values: bool = True) -> SvgFigure:
    levels = [float(level) for level in digest.levels]
    column = {level: levels.index(level) for level in (0.0, 0.01, 0.5, 0.99, 1.0) if level in levels}
    q, depth = digest.quantiles, np.arange(len(digest.names))
    with new_figure(NORM_FIGURE_HEIGHT_IN) as fig:
        left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        fig.subplots_adjust(left=0.08, right=0.985, bottom=0.17, top=0.89, wspace=0.3)
        color = EXTRA_COLORS[0]
        if 0.0 in column and 1.0 in column:
            left.fill_between(depth, q[:, column[0.0]], q[:, column[1.0]], color=color, alpha=0.15, linewidth=0,
                              label="min … max")
        if 0.01 in column and 0.99 in column:
            left.fill_between(depth, q[:, column[0.01]], q[:, column[0.99]], color=color, alpha=0.3, linewidth=0,
                              label="1% … 99%")
        if 0.5 in column:
            [line] = left.plot(depth, q[:, column[0.5]], color=color, marker="o" if len(depth) <= 80 else None,
                               markersize=2.5, label="median")
            hover(line, "median |γ| by depth", [
                f"{name} ({kind}): median |γ| {row[column[0.5]]:.3g}" + (
                    f", range {row[column[0.0]]:.3g} … {row[column[1.0]]:.3g}" if 0.0 in column and 1.0 in column
                    else "") for name, kind, row in zip(digest.names, digest.kinds, q)])
        positive = q[np.isfinite(q) & (q > 0)]
        if positive.size and positive.max() / positive.min() > LOG_SPAN:
            log_axis(left)
        left.set_title("|γ| by depth", loc="left")
        left.set_xlabel("depth (layer)")
        left.set_ylabel("|γ|")
        left.legend(loc="upper left")
        _recurring_panel(right, digest)
        return to_svg(fig, key, hover_values)


def _recurring_panel(ax, digest: NormDigest) -> None:
    title = "Recurring outlier dimensions"
    recurring = digest.recurring
    if not len(recurring["dim"]):
        empty_panel(ax, title, f"none: no dimension has |γ| > {digest.outlier_factor:g}x\nits layer's median in "
                               f"two layers of one width")
        return
    widths = len(set(recurring["width"].tolist())) > 1
    labels = [f"{dim} (of {width})" if widths else str(dim) for dim, width in zip(recurring["dim"], recurring["width"])]
    rows = np.arange(len(labels))[::-1]  # most layers at the top
    bars = ax.barh(rows, recurring["layers"], color=EXTRA_COLORS[1], height=0.7)
    for bar, label, layers, of, peak in zip(bars, labels, recurring["layers"], recurring["of_layers"],
                                            recurring["max_abs_gamma"]):
        hover(bar, f"dimension {label}: an outlier in {layers} of {of} layers, largest |γ| {peak:.3g}")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {peak:.3g}", va="center", fontsize=6)
    ax.set_yticks(rows)
    ax.set_yticklabels(labels)
    ax.set_xlim(0, max(recurring["of_layers"]) * 1.15)
    more = digest.recurring_total - len(labels)
    ax.set_title(title + (f" ({len(labels)} of {digest.recurring_total})" if more > 0 else ""), loc="left")
    ax.set_xlabel(f"layers with |γ| > {digest.outlier_factor:g}x their median")
    ax.set_ylabel("dimension")
