"""Line plots drawn with braille characters (2 x 4 dots per cell), rendered to Rich `Text`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from rich.text import Text

_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [row][col] within a cell


@dataclass
class Trace:
    """One line on a plot. Points with different `segments` values are not joined."""

    xs: list[float]
    ys: list[float]
    color: str = "white"
    label: str = ""
    segments: Optional[list[int]] = None
    points_only: bool = False


@dataclass
class HLine:
    """A horizontal reference line (e.g. the teacher's perplexity)."""

    y: float
    color: str = "grey50"
    label: str = ""


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = max(1, width), max(1, height)
        self.bits = [[0] * self.w for _ in range(self.h)]
        self.color: list[list[Optional[str]]] = [[None] * self.w for _ in range(self.h)]

    def dot(self, px: int, py: int, color: str) -> None:
        if 0 <= px < 2 * self.w and 0 <= py < 4 * self.h:
            cx, cy = px // 2, py // 4
            self.bits[cy][cx] |= _BITS[py % 4][px % 2]
            self.color[cy][cx] = color

    def line(self, x0: int, y0: int, x1: int, y1: int, color: str) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rows(self) -> list[Text]:
        out = []
        for cy in range(self.h):
            t = Text()
            for cx in range(self.w):
                b = self.bits[cy][cx]
                t.append(chr(0x2800 + b) if b else " ", style=self.color[cy][cx] or "")
            out.append(t)
        return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _fmt_x(v: float, axis: str) -> str:
    if axis == "time":
        if v >= 3600:
            return f"{v / 3600:.1f}h"
        return f"{v / 60:.1f}m" if v >= 60 else f"{v:.0f}s"
    if axis == "tokens":
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(v) >= div:
                return f"{v / div:.3g}{unit}"
    return f"{v:.0f}"


def render_plot(
    traces: list[Trace],
    width: int,
    height: int,
    *,
    logy: bool = False,
    x_axis: str = "step",
    hlines: Optional[list[HLine]] = None,
    markers: Optional[list[float]] = None,
    robust: bool = False,
) -> Text:
    """A plot `width` x `height` cells: y labels on the left, x labels below, braille lines in between.
    `robust`: the y range covers the 2nd to 98th percentile of the points (an early spike does not flatten
    the rest; points outside are cut at the edge), as TensorBoard's "ignore outliers"."""
    hlines = hlines or []
    markers = markers or []
    margin = 8
    pw, ph = max(4, width - margin - 1), max(2, height - 1)
    clip = robust  # points outside a robust y range are drawn at its edge instead of being dropped

    def ty(v: float) -> Optional[float]:
        if not math.isfinite(v):
            return None
        if logy:
            return math.log10(v) if v > 0 else None
        return v

    xs_all = [x for tr in traces for x in tr.xs if math.isfinite(x)] + [m for m in markers if math.isfinite(m)]
    ys_all = [y for tr in traces for y in (ty(v) for v in tr.ys) if y is not None]
    ys_all += [y for y in (ty(h.y) for h in hlines) if y is not None]
    if not xs_all or not ys_all:
        return Text("\n".join([" " * width] * (height // 2) + ["(no data yet)".center(width)]), style="grey50")
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(ys_all), max(ys_all)
    if robust and len(ys_all) >= 20:
        q = sorted(ys_all)
        y0, y1 = q[int(0.02 * (len(q) - 1))], q[int(0.98 * (len(q) - 1))]
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    canvas = Canvas(pw, ph)
    W, H = 2 * pw - 1, 4 * ph - 1

    def px(x: float) -> int:
        return round((x - x0) / (x1 - x0) * W)

    def py(y: float) -> int:
        if clip:
            y = min(y1, max(y0, y))
        return round((y1 - y) / (y1 - y0) * H)

    for h in hlines:
        y = ty(h.y)
        if y is not None:
            for xi in range(0, W + 1, 2):
                canvas.dot(xi, py(y), h.color)
    for m in markers:
        if math.isfinite(m):
            for y in range(0, H + 1, 2):
                canvas.dot(px(m), y, "yellow")
    for tr in traces:
        prev = None
        for i, (x, v) in enumerate(zip(tr.xs, tr.ys)):
            y = ty(v)
            seg = tr.segments[i] if tr.segments else 0
            if y is None or not math.isfinite(x):
                prev = None
                continue
            cur = (px(x), py(y), seg)
            if tr.points_only or prev is None or prev[2] != seg:
                canvas.dot(cur[0], cur[1], tr.color)
            else:
                canvas.line(prev[0], prev[1], cur[0], cur[1], tr.color)
            prev = cur

    return _frame(canvas, (x0, x1, y0, y1), width, margin=margin, logy=logy, x_axis=x_axis)


def _frame(
    canvas: Canvas, bounds: tuple[float, float, float, float], width: int, *, margin: int, logy: bool, x_axis: str
) -> Text:
    """The drawn canvas with its y labels (top, middle, bottom) on the left and the x range below."""
    x0, x1, y0, y1 = bounds
    rows = canvas.rows()
    ph, pw = len(rows), canvas.w
    out = Text()
    for r, row in enumerate(rows):
        if r == 0:
            label = _fmt(10**y1 if logy else y1)
        elif r == ph - 1:
            label = _fmt(10**y0 if logy else y0)
        elif r == ph // 2:
            mid = (y0 + y1) / 2
            label = _fmt(10**mid if logy else mid)
        else:
            label = ""
        out.append(_fit(label, margin - 1).rjust(margin - 1) + "│", style="grey62")
        out.append_text(row)
        out.append("\n")
    left, right = _fmt_x(x0, x_axis), _fmt_x(x1, x_axis)
    if margin + len(left) + 1 + len(right) > width:
        right = ""  # an axis label is shown whole or not at all
    axis = " " * margin + left + " " * max(1, pw - len(left) - len(right)) + right
    out.append(axis if len(axis) <= width else " " * width, style="grey62")
    return out


def _fit(label: str, width: int) -> str:
    """A tick label in `width` characters: a shorter form of the same number, or nothing (never cut)."""
    if len(label) <= width:
        return label
    try:
        v = float(label)
    except ValueError:
        return ""
    short = f"{v:.0e}"
    return short if len(short) <= width else ""
