"""A line chart drawn with Braille dots (2 x 4 dots a cell), for loss and reward curves.

`plot` is plain Python (lists of styled cells), so it can be tested without a terminal;
`Curve` is the Textual widget around it. The widget draws only when asked (`refresh`):
the app redraws curves from a timer, so a fast run cannot flood the screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rich.text import Text
from textual.widget import Widget

from mlxtune.tui.history import smooth

# Dot bits of a Braille cell, indexed [row][column] (Unicode's numbering).
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
MARKER = "●"
TRAIN_COLOR, VAL_COLOR = "#4fc3f7", "#ffd54f"
OTHER_TRAIN_COLOR, OTHER_VAL_COLOR = "#f06292", "#aed581"
REWARD_COLOR = "#81c784"  # grpo: the reward beside the loss


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str = TRAIN_COLOR
    smoothable: bool = True   # training loss is smoothed; validation points are not
    markers: bool = False     # a marker per point, no lines (validation: few points)


@dataclass
class Chart:
    """The styled cells of a chart: rows of (text, style) pieces."""

    rows: list[list[tuple[str, str]]] = field(default_factory=list)

    def text(self) -> Text:
        out = Text(no_wrap=True, overflow="crop")
        for i, row in enumerate(self.rows):
            if i:
                out.append("\n")
            for piece, style in row:
                out.append(piece, style or None)
        return out

    def plain(self) -> str:
        return "\n".join("".join(p for p, _ in row) for row in self.rows)


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if 0.01 <= abs(v) < 10000:
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{v:.1e}"


def _transform(series: list[Series], log_y: bool, smoothing: float) -> list[list[tuple]]:
    out = []
    for s in series:
        pts = sorted(s.points)
        ys = [y for _, y in pts]
        if s.smoothable and smoothing > 0:
            ys = smooth(ys, smoothing)
        pairs = [(x, y) for (x, _), y in zip(pts, ys) if math.isfinite(y)]
        if log_y:
            pairs = [(x, math.log10(y)) for x, y in pairs if y > 0]
        out.append(pairs)
    return out


def plot(series: list[Series], width: int, height: int, log_y: bool = False,
         smoothing: float = 0.0, x_max: float | None = None, empty: str = "no data yet"
         ) -> Chart:
    """A chart `width` x `height` cells: y labels on the left, step labels underneath.

    `x_max` fixes the right end (e.g. the run's last step) so that a curve grows across
    the chart as the run goes.
    """
    data = _transform(series, log_y, smoothing)
    points = [p for pts in data for p in pts]
    if width < 12 or height < 3 or not points:
        msg = empty if points == [] else ""
        return Chart([[(msg[:max(width, 0)], "dim")]] + [[("", "")]] * max(height - 1, 0))

    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(min(xs), 0.0), max(max(xs), x_max or 0.0)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        pad = abs(y0) * 0.05 or 0.5
        y0, y1 = y0 - pad, y1 + pad
    if x1 <= x0:
        x1 = x0 + 1

    def shown(v: float) -> float:
        return 10 ** v if log_y else v

    labels = [_label(shown(y1)), _label(shown((y0 + y1) / 2)), _label(shown(y0))]
    lw = max(len(s) for s in labels)
    plot_w, plot_h = width - lw - 1, height - 1
    px_w, px_h = plot_w * 2, plot_h * 4
    cells = [[0] * plot_w for _ in range(plot_h)]
    color = [[""] * plot_w for _ in range(plot_h)]

    def to_px(x: float, y: float) -> tuple[int, int]:
        cx = round((x - x0) / (x1 - x0) * (px_w - 1))
        cy = round((y1 - y) / (y1 - y0) * (px_h - 1))
        return cx, cy

    def dot(cx: int, cy: int, style: str) -> None:
        if 0 <= cx < px_w and 0 <= cy < px_h:
            r, c = cy // 4, cx // 2
            cells[r][c] |= _DOTS[cy % 4][cx % 2]
            color[r][c] = style

    marks: dict[tuple[int, int], str] = {}
    for s, pts in zip(series, data):
        prev = None
        for x, y in pts:
            cur = to_px(x, y)
            if s.markers:  # a few points that each count (validation): no lines between
                marks[(cur[1] // 4, cur[0] // 2)] = s.color
            elif prev is None:
                dot(*cur, s.color)
            else:  # a straight line of dots from the previous point
                (ax, ay), (bx, by) = prev, cur
                n = max(abs(bx - ax), abs(by - ay), 1)
                for i in range(n + 1):
                    dot(round(ax + (bx - ax) * i / n), round(ay + (by - ay) * i / n), s.color)
            prev = cur

    label_rows = {0: labels[0], (plot_h - 1) // 2: labels[1], plot_h - 1: labels[2]}
    rows = []
    for r in range(plot_h):
        row = [(label_rows.get(r, "").rjust(lw) + "┤" if r in label_rows else " " * lw + "│",
                "dim")]
        for c in range(plot_w):
            if (r, c) in marks:
                row.append((MARKER, marks[(r, c)]))
            else:
                row.append((chr(0x2800 + cells[r][c]) if cells[r][c] else " ", color[r][c]))
        rows.append(_merge(row))
    left, right = _label(x0), _label(x1)
    axis = " " * lw + "└" + left + right.rjust(max(plot_w - len(left), 0))
    rows.append([(axis[:width], "dim")])
    return Chart(rows)


def _merge(row: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for text, style in row:
        if out and out[-1][1] == style:
            out[-1] = (out[-1][0] + text, style)
        else:
            out.append((text, style))
    return out


def legend(series: list[Series]) -> Text:
    out = Text(no_wrap=True, overflow="ellipsis")
    for i, s in enumerate(series):
        if i:
            out.append("  ")
        out.append(MARKER if s.markers else "━", s.color)
        out.append(f" {s.label}")
    return out


class Curve(Widget):
    """A chart of one or more series; set `series` (and the toggles), then refresh()."""

    DEFAULT_CSS = """
    Curve { height: 1fr; min-height: 5; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None,
                 empty: str = "no data yet"):
        super().__init__(id=id, classes=classes)
        self.series: list[Series] = []
        self.log_y = False
        self.smoothing = 0.0
        self.x_max: float | None = None
        self.empty = empty

    def render(self) -> Text:
        size = self.content_size
        return plot(self.series, size.width, size.height, self.log_y, self.smoothing,
                    self.x_max, self.empty).text()
