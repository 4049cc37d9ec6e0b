"""Figures of a report: one PNG per model and x axis, one panel per headline metric.

Two x axes: bits per weight (every scheme), and measured decode tokens/s (schemes that
ran on a real kernel). On the speed axis the Pareto front is marked: the schemes no
other scheme beats in both speed and accuracy, the trade-off the seed papers argue.

Labels are placed by :func:`place_labels`, a small greedy search in pixel space, so
schemes that sit on top of each other (FP6 and INT8 near 6 and 8 bits) stay readable
without a plotting dependency beyond matplotlib.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

# Directions tried around a point, nearest first on each ring: right, up, left, down,
# then the diagonals (unit vectors; the box is attached to the point by its near side).
_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1))
LABEL_FONTSIZE = 7
MARKER_PX = 4.0  # half-size of a marker, an obstacle to every label


@dataclass
class Panel:
    """One metric against one x axis: points are (label, x, y)."""

    title: str
    y_label: str
    points: list[tuple[str, float, float]]
    higher_is_better: bool
    baseline: tuple[str, float] | None = None  # (label, y) drawn as a dashed line
    pareto: bool = False  # x is speed: ring the Pareto front, "better" points right too


def _overlaps(a, b) -> bool:
    """Boxes (x0, y0, x1, y1) that share interior area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(anchors, sizes, obstacles=(), bounds=None, gap: float = 3.0, step: float = 6.0,
                 rings: int = 12) -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) for labels of ``sizes`` (w, h) next to ``anchors`` (x, y), all in
    pixels, such that no two boxes overlap; obstacle boxes (markers, the legend) are avoided
    too whenever a spot within ``rings`` is free.

    Greedy: labels are placed left to right; each takes the first free spot on rings of
    growing distance around its anchor (inside ``bounds`` when given). If every ring is
    taken, the label goes above every box placed so far, which cannot overlap any of them.
    """
    order = sorted(range(len(anchors)), key=lambda i: (anchors[i][0], anchors[i][1]))
    placed: list[tuple[float, float, float, float]] = []
    boxes: list = [None] * len(anchors)
    for i in order:
        (x, y), (w, h) = anchors[i], sizes[i]
        chosen = None
        for ring in range(rings):
            distance = gap + ring * step
            for dx, dy in _DIRECTIONS:
                # Attach the box by its side (or corner) facing the anchor.
                x0 = x + dx * distance - (w if dx < 0 else w / 2 if dx == 0 else 0)
                y0 = y + dy * distance - (h if dy < 0 else h / 2 if dy == 0 else 0)
                box = (x0, y0, x0 + w, y0 + h)
                if bounds is not None and not (bounds[0] <= box[0] and box[2] <= bounds[2]
                                                and bounds[1] <= box[1] and box[3] <= bounds[3]):
                    continue
                if not any(_overlaps(box, other) for other in placed) and \
                        not any(_overlaps(box, other) for other in obstacles):
                    chosen = box
                    break
            if chosen:
                break
        if chosen is None:
            top = max([b[3] for b in placed] + [y]) + gap
            chosen = (x + gap, top, x + gap + w, top + h)
        placed.append(chosen)
        boxes[i] = chosen
    return boxes


def pareto_front(xs, ys, higher_is_better: bool) -> list[bool]:
    """For each point: True when no other point is at least as fast (x, higher is better)
    and at least as accurate (y) while strictly better in one of the two."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dominated = any(xj >= x and sign * yj >= sign * y and (xj > x or sign * yj > sign * y)
                        for j, (xj, yj) in enumerate(zip(xs, ys)) if j != i)
        front.append(not dominated)
    return front


def _draw_panel(ax, panel: Panel, x_label: str):
    labels = [p[0] for p in panel.points]
    xs = [p[1] for p in panel.points]
    ys = [p[2] for p in panel.points]
    base_label = panel.baseline[0] if panel.baseline else None
    for label, x, y in panel.points:
        is_base = label == base_label
        ax.scatter([x], [y], s=60 if is_base else 25, marker="*" if is_base else "o",
                   color="black" if is_base else "tab:blue", zorder=3)
    if panel.pareto and len(panel.points) > 1:
        front = pareto_front(xs, ys, panel.higher_is_better)
        on_front = sorted((x, y) for x, y, f in zip(xs, ys, front) if f)
        ax.plot([p[0] for p in on_front], [p[1] for p in on_front], color="tab:red", linewidth=1,
                zorder=2, label="Pareto front")
        ax.scatter([p[0] for p in on_front], [p[1] for p in on_front], s=110, facecolors="none",
                   edgecolors="tab:red", linewidths=1.2, zorder=4)
    if panel.baseline is not None:
        ax.axhline(panel.baseline[1], color="gray", linestyle="--", linewidth=0.8,
                   label=f"baseline {panel.baseline[0]}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(panel.y_label, fontsize=8)
    ax.set_title(panel.title, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.margins(0.12)
    # Where better lies: up (or down) the metric axis, and right too when x is speed.
    better = "better " + ("↑" if panel.higher_is_better else "↓") if not panel.pareto else \
        "better " + ("↗" if panel.higher_is_better else "↘")
    note = ax.text(0.99, 0.99 if panel.higher_is_better else 0.01, better, transform=ax.transAxes,
                   ha="right", va="top" if panel.higher_is_better else "bottom", fontsize=7, color="gray")
    return labels, xs, ys, note


def _label_points(fig, ax, labels, xs, ys, note):
    """Annotate each point with its label at a spot chosen by ``place_labels``."""
    renderer = fig.canvas.get_renderer()
    sizes = []
    for label in labels:  # measured with a throwaway text of the same font
        probe = ax.text(0, 0, label, fontsize=LABEL_FONTSIZE)
        extent = probe.get_window_extent(renderer)
        sizes.append((extent.width, extent.height))
        probe.remove()
    anchors = [tuple(ax.transData.transform((x, y))) for x, y in zip(xs, ys)]
    obstacles = [(px - MARKER_PX, py - MARKER_PX, px + MARKER_PX, py + MARKER_PX) for px, py in anchors]
    for artist in (ax.get_legend(), note):  # the legend and the "better" note are kept clear too
        if artist is not None:
            extent = artist.get_window_extent(renderer)
            obstacles.append((extent.x0, extent.y0, extent.x1, extent.y1))
    frame = ax.get_window_extent(renderer)
    boxes = place_labels(anchors, sizes, obstacles, bounds=(frame.x0, frame.y0, frame.x1, frame.y1))
    points_per_px = 72.0 / fig.dpi
    for label, x, y, (x0, y0, _, _), (px, py) in zip(labels, xs, ys, boxes, anchors):
        far = math.hypot(x0 - px, y0 - py) > 18  # a label pushed away keeps a leader line
        ax.annotate(label, (x, y), xytext=((x0 - px) * points_per_px, (y0 - py) * points_per_px),
                    textcoords="offset points", fontsize=LABEL_FONTSIZE, ha="left", va="bottom",
                    annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.5} if far else None)


def panels_figure(title: str, panels: list[Panel], x_label: str, path: Path) -> Path | None:
    """One PNG with a panel per metric (points with both coordinates only); None if empty."""
    panels = [p for p in panels if p.points]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.8 * rows), squeeze=False, dpi=110,
                             layout="constrained")
    drawn = [(ax, panel, _draw_panel(ax, panel, x_label)) for ax, panel in zip(axes.flat, panels)]
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("\n".join(textwrap.wrap(title, int(13 * fig.get_figwidth()))), fontsize=10)  # ~13 chars/inch
    fig.canvas.draw()
    # Freeze the layout: labels are placed in pixels, so the axes must not move after this.
    fig.set_layout_engine("none")
    for ax, panel, (labels, xs, ys, note) in drawn:
        _label_points(fig, ax, labels, xs, ys, note)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
