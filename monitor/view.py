"""What the keys change about the view (`ViewOptions`), the series transforms every plot shares (window,
zoom, crosshair, smoothing, downsampling), and the app's actions that change the options (`ViewKeys`)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .plot import Trace
from .series_math import BlockMinMax, minmax_indices
from .state import X_AXES, RunState, Series
from .textsafe import label

RUN_COLORS = ("cyan", "magenta", "green", "yellow", "dodger_blue1", "orange1")
SMOOTHING = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)
WINDOWS = (None, 50, 200, 1000, 5000)


@dataclass
class ViewOptions:
    """Everything the keys toggle."""

    logy: bool = False
    smoothing: float = 0.6
    x_axis: str = "step"
    weighted: bool = False
    window: Optional[int] = None
    filter: str = ""
    baseline: int = 0
    robust: bool = False
    """y range from the 2nd-98th percentile of the points (outliers do not flatten the curve)."""
    zoom: tuple[float, float] = (0.0, 1.0)
    """The visible part of the x range (after the window), as fractions."""
    cursor: Optional[float] = None
    """x of the crosshair (None: hidden); every plot reads its values there."""

    def matches(self, name: str) -> bool:
        if not self.filter:
            return True
        return any(fnmatch.fnmatch(name, pat.strip()) for pat in self.filter.split(",") if pat.strip())


def ordered_runs(runs: list[RunState], opts: ViewOptions) -> list[tuple[int, RunState]]:
    """Baseline first, then the others, each with its index (which fixes its colour)."""
    idx = [opts.baseline] + [i for i in range(len(runs)) if i != opts.baseline]
    return [(i, runs[i]) for i in idx if i < len(runs)]


def _np(col) -> np.ndarray:
    """A zero-copy numpy view of an array column."""
    return np.frombuffer(col, dtype=np.float64 if col.typecode == "d" else np.int64) if len(col) else np.zeros(0)


def _rows(series: Series):
    """The series' table rows as an index: a slice while it has no gaps (no copy), else an int array."""
    rows = series.rows
    if isinstance(rows, range):
        return slice(rows.start, rows.stop)
    return _np(rows).astype(np.int64, copy=False)


def series_xy(series: Series, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of every point of a series as numpy arrays (no Python object per point)."""
    return _np(getattr(series.table, axis))[_rows(series)].astype(np.float64), _np(series.value)


def window_start_x(series: Series, opts: ViewOptions) -> Optional[float]:
    """The x where the last-N window of a train series begins (None: no window, or all of it fits)."""
    if not opts.window or len(series) <= opts.window:
        return None
    return getattr(series.table, opts.x_axis)[series.rows[len(series) - opts.window]]


def view_bounds(series: Optional[Series], opts: ViewOptions) -> Optional[tuple[float, float]]:
    """The x range on screen, from a reference train series: the last-N window, then the zoom within it."""
    if series is None or not len(series):
        return None
    if not opts.window and opts.zoom == (0.0, 1.0):
        return -math.inf, math.inf  # the whole history: nothing to compute
    xs, _ = series_xy(series, opts.x_axis)
    finite = xs[np.isfinite(xs)]
    if not len(finite):
        return None
    start = window_start_x(series, opts)
    lo, hi = (float(finite.min()) if start is None else float(start)), float(finite.max())
    z0, z1 = opts.zoom
    span = hi - lo
    # open at an edge nothing cuts (the eval after the last train step stays in view)
    return (lo + z0 * span if start is not None or z0 > 0 else -math.inf), (lo + z1 * span if z1 < 1 else math.inf)


def value_at(series: Series, axis: str, x: float) -> Optional[float]:
    """The series' value at the last point with x <= `x` (what the crosshair reads)."""
    xs, ys = series_xy(series, axis)
    idx = np.flatnonzero(xs <= x)
    return float(ys[idx[-1]]) if len(idx) else None


LONG = 20_000
"""Series longer than this are downsampled from their block extremes (BlockMinMax) when shown whole."""


def series_trace(
    series: Series,
    opts: ViewOptions,
    color: str,
    width: int,
    label: str,
    points_only: bool = False,
    bounds: Optional[tuple[float, float]] = None,
) -> list[Trace]:
    """Raw (dim) and smoothed traces of one series within the x `bounds` (the window and zoom of the
    panel; without bounds the last-N window by count), downsampled to the plot width. Vectorised, and a
    long series shown whole is downsampled from its block extremes: a redraw's cost does not grow with
    the history."""
    xcol, scol = _np(getattr(series.table, opts.x_axis)), _np(series.table.segment)
    rows = series.rows
    n = len(series)
    whole = (bounds is None or (bounds[0] == -math.inf and bounds[1] == math.inf)) and not opts.window

    def row_of(idx: np.ndarray):
        return rows.start + idx if isinstance(rows, range) else np.frombuffer(rows, dtype=np.int64)[idx]

    if whole:
        sel = None
    elif bounds is not None:
        xs, _ = series_xy(series, opts.x_axis)
        sel = np.flatnonzero((xs >= bounds[0]) & (xs <= bounds[1]))
    else:
        sel = np.arange(max(0, n - opts.window) if opts.window else 0, n)
    smooth = None
    if opts.smoothing > 0 and not points_only:
        smooth = series.smoothed(opts.smoothing)

    def pick(values, key) -> Trace:
        arr = np.frombuffer(values, dtype=np.float64) if len(values) else np.zeros(0)
        if sel is None and n > LONG:
            cand = series.blocks.setdefault(key, BlockMinMax()).candidates(values)
        else:
            cand = np.arange(n) if sel is None else sel
        keep = cand[minmax_indices(arr[cand], max(8, width))] if len(cand) else cand
        r = row_of(keep)
        return Trace(xcol[r].astype(np.float64).tolist(), arr[keep].tolist(), "", label, scol[r].tolist())

    if smooth is None:
        t = pick(series.value, None)
        t.color, t.points_only = f"bold {color}", points_only
        return [t]
    raw, sm = pick(series.value, None), pick(smooth, opts.smoothing)
    raw.color, sm.color = f"dim {color}", f"bold {color}"
    return [raw, sm]


class ViewKeys:
    """The app's actions on `ViewOptions` (a mixin of `DsMonitor`: it has `opts`, `runs` and `changed()`)."""

    opts: ViewOptions
    runs: list[RunState]
    if TYPE_CHECKING:  # what the app provides

        def changed(self) -> None: ...

        def notify(self, message: str, **kw: Any) -> Any: ...

    def _base_xs(self):
        """x of the baseline run's train points, in order (what the crosshair steps along)."""
        s = self.runs[self.opts.baseline].train.get("objective") if self.runs else None
        if s is None or not len(s):
            return None
        xs, _ = series_xy(s, self.opts.x_axis)
        return xs[np.isfinite(xs)]

    def _fraction(self, x: float) -> Optional[float]:
        xs = self._base_xs()
        if xs is None or not len(xs) or xs.max() == xs.min():
            return None
        return (x - xs.min()) / (xs.max() - xs.min())

    def action_zoom(self, factor: float) -> None:
        z0, z1 = self.opts.zoom
        frac = self._fraction(self.opts.cursor) if self.opts.cursor is not None else None
        anchor = z1 if frac is None else min(z1, max(z0, frac))
        n0, n1 = anchor - (anchor - z0) * factor, anchor + (z1 - anchor) * factor
        if n1 - n0 < 0.01:
            return
        if n1 - n0 >= 1:
            n0, n1 = 0.0, 1.0
        shift = max(0.0, -n0) - max(0.0, n1 - 1)
        self.opts.zoom = (n0 + shift, n1 + shift)
        self.changed()

    def action_pan(self, direction: int) -> None:
        z0, z1 = self.opts.zoom
        step = 0.25 * (z1 - z0) * direction
        step = max(-z0, min(1 - z1, step))
        self.opts.zoom = (z0 + step, z1 + step)
        self.changed()

    def action_reset_zoom(self) -> None:
        self.opts.zoom = (0.0, 1.0)
        self.changed()

    def action_cursor(self, direction: int) -> None:
        xs = self._base_xs()
        if xs is None or not len(xs):
            return
        if self.opts.cursor is None:
            i = len(xs) - 1
        else:
            i = int(np.searchsorted(xs, self.opts.cursor, side="right")) - 1 + direction
        self.opts.cursor = float(xs[max(0, min(len(xs) - 1, i))])
        self.changed()

    def action_hide_cursor(self) -> None:
        self.opts.cursor = None
        self.changed()

    def action_toggle_robust(self) -> None:
        self.opts.robust = not self.opts.robust
        self.changed()

    def action_toggle_log(self) -> None:
        self.opts.logy = not self.opts.logy
        self.changed()

    def action_smooth(self, direction: int) -> None:
        i = SMOOTHING.index(self.opts.smoothing) if self.opts.smoothing in SMOOTHING else 1
        self.opts.smoothing = SMOOTHING[max(0, min(len(SMOOTHING) - 1, i + direction))]
        self.changed()

    def action_cycle_x(self) -> None:
        self.opts.x_axis = X_AXES[(X_AXES.index(self.opts.x_axis) + 1) % len(X_AXES)]
        self.changed()

    def action_toggle_weighted(self) -> None:
        self.opts.weighted = not self.opts.weighted
        self.changed()

    def action_cycle_window(self) -> None:
        self.opts.window = WINDOWS[(WINDOWS.index(self.opts.window) + 1) % len(WINDOWS)]
        self.changed()

    def action_cycle_baseline(self) -> None:
        self.opts.baseline = (self.opts.baseline + 1) % len(self.runs)
        self.notify(label(f"baseline: {self.runs[self.opts.baseline].name}"))
        self.changed()
