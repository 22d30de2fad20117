"""Figure helpers: one colour per group in every figure, labels placed where they do not collide, captions.

Lines are labelled at their right end (legends only where a label cannot sit by its line); point labels
(the Pareto front) are tried at several offsets around their point and kept at the first that overlaps no
other label, no point and stays inside the axes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.transforms import Bbox, blended_transform_factory  # noqa: E402

__all__ = ["plt", "color", "save_figure", "caption", "label_line_ends", "label_points", "bars", "shared_legend",
           "MAX_DIRECT_LABELS"]

MAX_DIRECT_LABELS = 10        # more lines than this: a legend beside the axes instead


def color(number: int, total: int) -> str:
    """The colour of group `number` (1-based) among `total` groups, the same in every figure."""
    cmap = plt.get_cmap("tab10" if total <= 10 else "tab20")
    return matplotlib.colors.to_hex(cmap((number - 1) % cmap.N))


def save_figure(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def caption(fig, text: str) -> None:
    """A line of small grey text under the figure (what the lines, bands and bars are)."""
    fig.text(0.01, -0.01, text, ha="left", va="top", fontsize=8, color="0.35", wrap=True)


def _overlaps(box: Bbox, others: list[Bbox]) -> bool:
    return any(box.overlaps(o) for o in others)


def label_line_ends(ax, ends: list[tuple[float, float, str, str]], fontsize: float = 8) -> None:
    """Labels right of the axes, at the height where each line ends, pushed apart so none overlap;
    a thin leader joins a label that had to move to its line. `ends`: (x, y, text, colour) in data units.
    More than MAX_DIRECT_LABELS lines: a legend beside the axes."""
    if len(ends) > MAX_DIRECT_LABELS:
        handles = [plt.Line2D([], [], color=c) for _, _, _, c in ends]
        ax.legend(handles, [t for _, _, t, _ in ends], fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.01, 1),
                  frameon=False)
        return
    fig = ax.figure
    fig.canvas.draw()
    to_px = ax.transData
    height = fontsize * 1.5 * fig.dpi / 72            # a text line and a little, in pixels
    order = sorted(range(len(ends)), key=lambda i: to_px.transform((ends[i][0], ends[i][1]))[1])
    wanted = [to_px.transform((ends[i][0], ends[i][1]))[1] for i in order]
    placed = list(wanted)
    for k in range(1, len(placed)):                   # upward pass: at least one line apart
        placed[k] = max(placed[k], placed[k - 1] + height)
    top = ax.bbox.y1
    overflow = placed[-1] - top if placed else 0
    if overflow > 0:                                  # shift down, then keep apart again going down
        placed = [p - overflow for p in placed]
        for k in range(len(placed) - 2, -1, -1):
            placed[k] = min(placed[k], placed[k + 1] - height)
    to_data_y = ax.transData.inverted()
    blend = blended_transform_factory(ax.transAxes, ax.transData)
    for i, y_px in zip(order, placed):
        x, y, text, c = ends[i]
        y_label = to_data_y.transform((0, y_px))[1]
        ax.annotate(text, xy=(x, y), xycoords="data", xytext=(1.02, y_label), textcoords=blend,
                    fontsize=fontsize, color=c, va="center", ha="left", annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color=c, lw=0.6, alpha=0.6, shrinkA=1, shrinkB=2, relpos=(0, 0.5)))


_OFFSETS = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"), (-7, -5, "right", "top"),
            (0, 9, "center", "bottom"), (0, -9, "center", "top"), (9, 0, "left", "center"), (-9, 0, "right", "center")]


def label_points(ax, xs, ys, texts: list[str], fontsize: float = 7.5, colors: list[str] | None = None) -> int:
    """Label points without overprinting: each label at the first offset (growing outwards, with a leader
    once away from its point) where it overlaps no label or point already there and stays in the axes; a
    label with no such place is left out. Returns how many were left out."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    r = 5.0                                             # a marker's half-size, in pixels
    occupied = []
    for x, y in zip(xs, ys):
        px, py = ax.transData.transform((x, y))
        occupied.append(Bbox.from_extents(px - r, py - r, px + r, py + r))
    inside = ax.bbox
    left_out = 0
    for x, y, text, c in zip(xs, ys, texts, colors or ["black"] * len(texts)):
        chosen = None
        for scale in (1, 2.5, 4.5, 7, 10):
            for dx, dy, ha, va in _OFFSETS:
                arrow = dict(arrowstyle="-", lw=0.5, color="0.4") if scale > 1 else None
                ann = ax.annotate(text, (x, y), xytext=(dx * scale, dy * scale), textcoords="offset points",
                                  ha=ha, va=va, fontsize=fontsize, arrowprops=arrow, color=c)
                box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
                if not _overlaps(box, occupied) and inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1):
                    chosen = (ann, box)
                    break
                ann.remove()
            if chosen:
                break
        if chosen is None:       # nowhere free: left out rather than printed over another
            left_out += 1
            continue
        occupied.append(chosen[1])
    return left_out


def bars(ax, groups, values, xs, total: int | None = None) -> None:
    """Grouped bars: at each x one bar per group (its colour among `total` groups), `values` (mean, std) per
    group, std as error bars where defined."""
    import numpy as np

    width = 0.8 / max(len(groups), 1)
    for k, (g, (mean, std)) in enumerate(zip(groups, values)):
        pos = np.asarray(xs) - 0.4 + (k + 0.5) * width
        err = None if np.all(np.isnan(std)) else np.nan_to_num(std)
        ax.bar(pos, mean, width, color=color(g.number, total or len(groups)), yerr=err, capsize=2,
               error_kw=dict(lw=0.8, ecolor="0.25"))


def shared_legend(fig, groups, handles=None, labels=None, total: int | None = None) -> None:
    """One legend for a figure's panels, above them (the figure has layout="constrained"), only when there
    is more than one entry. Default entries: a colour patch per group."""
    if handles is None:
        handles = [plt.Rectangle((0, 0), 1, 1, color=color(g.number, total or len(groups))) for g in groups]
        labels = [g.label for g in groups]
    if len(handles) < 2:
        return
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
