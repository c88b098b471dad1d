"""Dashboard panels. Each widget owns its CSS; all of them draw from `RunState`s and `ViewOptions`."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Input, Static

from .alerts import Alert
from .plot import HLine, Trace, render_plot
from .series_math import BlockMinMax, minmax_indices
from .state import RunState, Series
from .textsafe import label

RUN_COLORS = ("cyan", "magenta", "green", "yellow", "dodger_blue1", "orange1")
SMOOTHING = (0.0, 0.6, 0.8, 0.9, 0.95, 0.99)
WINDOWS = (None, 50, 200, 1000, 5000)
SPARK = "▁▂▃▄▅▆▇█"


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


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if 1e3 <= a < 1e8:
        return f"{v:,.0f}"
    if a != 0 and (a >= 1e8 or a < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4g}" if a >= 1e-2 else f"{v:.3g}"


def _duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def eta_text(run: RunState) -> str:
    """The ETA as a user reads it: from the run's pace, an upper bound from its first record, or what it
    waits for."""
    eta, how = run.eta_estimate()
    if how == "pace":
        return _duration(eta)
    if how == "first":
        return f"<{_duration(eta)} (from the first record, start-up counted)"
    return "after the first step" if how == "waiting" else "-"


def sparkline(values: list[float], n: int = 10) -> str:
    vals = [v for v in values[-n:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return SPARK[3] * len(vals)
    return "".join(SPARK[min(7, int((v - lo) / (hi - lo) * 8))] for v in vals)


def _cut_label(text: str, width: int) -> str:
    """A label shortened with an ellipsis to `width` (labels may be shortened; numbers never are)."""
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def fit_table(header: list[str], rows: list[list[str]], width: int, optional: Optional[list[int]] = None) -> Text:
    """A right-aligned table of formatted values that fits `width` by dropping whole columns (trend, then
    delta, then min, then other runs from the last) and shortening labels; a value is shown whole or not
    at all."""
    cols = list(range(len(header)))
    if optional is None:
        optional = [4, 3, 2] + list(range(len(header) - 1, 4, -1))  # trend, delta, min, then other runs from the right
    optional = list(optional)

    def widths(cols: list[int], label_w: int) -> list[int]:
        out = []
        for c in cols:
            w = max([len(header[c])] + [len(r[c]) for r in rows]) if c else label_w
            out.append(w)
        return out

    label_full = max([len(header[0])] + [len(r[0]) for r in rows])
    label_w = min(label_full, 14)
    while sum(widths(cols, label_w)) + len(cols) - 1 > width and optional:
        drop = optional.pop(0)
        if drop in cols:
            cols.remove(drop)
    while sum(widths(cols, label_w)) + len(cols) - 1 > width and label_w > 4:
        label_w -= 1
    ws = widths(cols, label_w)
    out = Text()
    out.append(
        " ".join(_cut_label(header[c], w).ljust(w) if c == 0 else header[c][-w:].rjust(w) for c, w in zip(cols, ws)), style="bold"
    )
    for r in rows:
        out.append("\n")
        out.append(_cut_label(r[0], ws[0]).ljust(ws[0]), style="bold")
        for c, w in zip(cols[1:], ws[1:]):
            out.append(" " + (r[c].ljust(w) if c == 4 else r[c].rjust(w)))
    return out


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


class Panel(Widget, can_focus=True):
    """A bordered, focusable panel (tab / shift+tab move between panels).

    `draw(...)` stores a painter; `render()` calls it with the panel's current content size, so a resize
    redraws at the new size without new data."""

    DEFAULT_CSS = """
    Panel {
        border: round $panel-lighten-2;
        padding: 0 1;
        height: auto;
    }
    Panel:focus {
        border: round $accent;
    }
    Panel.-alone {
        height: 1fr;
        max-height: 100%;
    }
    """

    def __init__(self, **kw):
        super().__init__(**kw)
        self._painter = None
        self._cache: Optional[tuple[tuple[int, int], object]] = None
        self.expanded = False
        """Shown alone (a small terminal, or `v`): the panel may use the whole height."""

    def paint(self, painter) -> None:
        """Set what to draw: a callable (width, height) -> renderable."""
        self._painter = painter
        self._cache = None
        self.refresh(layout=True)

    def render(self):
        if self._painter is None:
            return Text("waiting for records", style="grey50")
        size = self.content_size
        key = (max(20, size.width), max(3, size.height))
        if self._cache is None or self._cache[0] != key:  # render is called more than once per frame
            self._cache = (key, self._painter(*key))
        return self._cache[1]


class PlotPanel(Panel):
    """One loss component over training, raw or weighted, for every run (baseline first)."""

    DEFAULT_CSS = """
    PlotPanel {
        height: 12;
    }
    """

    def __init__(self, component: str, **kw):
        # a widget id takes letters, digits, - and _ only; a component's name comes from a file
        super().__init__(id="plot-" + re.sub(r"[^A-Za-z0-9_-]", lambda m: f"_{ord(m.group()):x}_", component), **kw)
        self.component = component
        self.border_title = label(component)

    # the mouse wheel zooms the x range, as + and - do (terminals that report the mouse)
    def on_mouse_scroll_up(self, event) -> None:
        event.stop()
        self.app.action_zoom(0.8)

    def on_mouse_scroll_down(self, event) -> None:
        event.stop()
        self.app.action_zoom(1.25)

    def draw(self, runs: list[RunState], opts: ViewOptions) -> None:
        kind = "weighted" if opts.weighted else "raw"
        at = "" if opts.cursor is None else f" @ {opts.cursor:g}"
        title = Text(f"{self.component} ({kind}){at}  ")
        for i, run in ordered_runs(runs, opts):
            s = run.train.get(f"{kind}/{self.component}")
            if s is not None and len(s):
                v = s.last if opts.cursor is None else value_at(s, opts.x_axis, opts.cursor)
                title.append(f"{_fmt(v)} ", style=RUN_COLORS[i % len(RUN_COLORS)])
        self.border_title = title
        base = runs[opts.baseline] if runs else None
        bounds = view_bounds(base.train.get(f"{kind}/{self.component}") if base is not None else None, opts)

        def painter(width: int, height: int):
            traces: list[Trace] = []
            for i, run in ordered_runs(runs, opts):
                color = RUN_COLORS[i % len(RUN_COLORS)]
                s = run.train.get(f"{kind}/{self.component}")
                if s is not None and len(s):
                    traces += series_trace(s, opts, color, width - 9, run.name, bounds=bounds)
                ev = run.eval.get(f"raw/{self.component}")
                if ev is not None and len(ev) and not opts.weighted:
                    # eval points follow the train window and zoom (step 0 does not stretch a windowed axis)
                    traces += series_trace(
                        ev,
                        opts,
                        "white",
                        width - 9,
                        f"{run.name} eval",
                        points_only=True,
                        bounds=bounds or (float("-inf"), float("inf")),
                    )
            markers = [] if opts.cursor is None else [opts.cursor]
            return render_plot(traces, width, height, logy=opts.logy, x_axis=opts.x_axis, markers=markers, robust=opts.robust)

        self.paint(painter)


class CurriculumPanel(Panel):
    """The whole schedule (from run_start), a marker at the current step, current weights and T."""

    DEFAULT_CSS = """
    CurriculumPanel {
        height: 12;
    }
    """

    def draw(self, runs: list[RunState], opts: ViewOptions) -> None:
        run = runs[opts.baseline] if runs else None
        cur = run.schedule() if run is not None else None
        if run is None or cur is None or not run.total_steps:
            self.border_title = "curriculum"
            self.paint(lambda w, h: Text("waiting for run_start", style="grey50"))
            return
        total = run.total_steps
        steps = sorted({round(total * k / 120) for k in range(121)})
        names = [n for n in cur.config.weights if opts.matches(n)]
        traces = []
        for j, name in enumerate(names):
            sched = cur.config.weights[name]
            ys = [sched.at(min(1.0, s / total)) for s in steps]
            style = RUN_COLORS[j % len(RUN_COLORS)] if name in cur.active else "grey42"
            traces.append(Trace([float(s) for s in steps], ys, style, name))
        step = run.current_step
        weights = cur.weights_at(step=min(step, total), total_steps=total)
        temp = cur.temperature_at(step=min(step, total), total_steps=total)
        self.border_title = f"curriculum @ step {step}  T={temp:.3g}"
        legend = Text()
        if cur.ever_on_policy:  # the on-policy fraction is a curriculum quantity too, drawn with the weights (first:
            # a narrow terminal cuts the legend's end)
            on = [cur.config.on_policy.at(min(1.0, s / total)) for s in steps]
            traces.append(Trace([float(s) for s in steps], on, "bold magenta", "on_policy"))
            legend.append(f"on_policy={_fmt(cur.on_policy_at(step=min(step, total), total_steps=total))} ", style="bold magenta")
        for j, name in enumerate(names):
            w = weights.get(name)
            style = RUN_COLORS[j % len(RUN_COLORS)] if name in cur.active else "grey42"
            legend.append(f"{name}={_fmt(w) if w is not None else 'off'} ", style=style)

        # the temperature has its own scale: a plot of its own under the weights when it changes over the run
        temps = [cur.config.temperature.at(min(1.0, s / total)) for s in steps]
        t_trace = [Trace([float(s) for s in steps], temps, "bold white", "T")] if max(temps) != min(temps) else []

        def painter(width: int, height: int):
            legend_rows = len(legend.wrap(self.app.console, width))
            room = max(3, height - legend_rows)
            t_rows = min(5, room // 3) if t_trace else 0
            parts = [legend, render_plot(traces, width, room - t_rows, x_axis="step", markers=[float(step)])]
            if t_rows:
                parts.append(Text("temperature", style="bold"))
                parts.append(render_plot(t_trace, width, t_rows - 1, x_axis="step", markers=[float(step)]))
            return Text("\n").join(parts)

        self.paint(painter)


class EvalPanel(Panel):
    """Train objective vs eval objective at the same steps; eval perplexity vs the teacher's."""

    DEFAULT_CSS = """
    EvalPanel {
        height: 16;
    }
    """

    def draw(self, runs: list[RunState], opts: ViewOptions) -> None:
        self.paint(lambda width, height: self._paint(runs, opts, width, height))

    def _paint(self, runs: list[RunState], opts: ViewOptions, width: int, height: int):
        obj_traces, ppl_traces, hlines = [], [], []
        lines = Text()
        base = runs[opts.baseline] if runs else None
        bounds = view_bounds(base.train.get("objective") if base is not None else None, opts) or (-math.inf, math.inf)
        for i, run in ordered_runs(runs, opts):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            if "objective" in run.train:
                obj_traces += series_trace(run.train["objective"], opts, color, width - 9, run.name, bounds=bounds)
            if "objective" in run.eval:
                (ev,) = series_trace(run.eval["objective"], opts, "white", width - 9, "eval", points_only=True, bounds=bounds)
                ev.points_only = False  # few points: joined
                obj_traces.append(ev)
            if "ppl" in run.eval:
                (pp,) = series_trace(run.eval["ppl"], opts, color, width - 9, run.name, points_only=True, bounds=bounds)
                pp.points_only = False
                ppl_traces.append(pp)
            e = run.last_eval
            if e is not None:
                # an estimate (a cache's labels outside its top-k) is no reference to measure the student by
                exact = e.teacher_ppl_exact_share is None or e.teacher_ppl_exact_share >= 0.99
                if e.teacher_ppl is not None and exact:
                    hlines.append(HLine(e.teacher_ppl, "grey62", "teacher"))
                stop = (
                    f"best {e.early_stop_metric} {_fmt(e.best)}, {e.bad_evals} eval(s) without improvement"
                    if e.best is not None
                    else ""
                )
                lines.append(
                    f"{run.name}: eval @ {e.step} obj {_fmt(e.objective)} ppl {_fmt(e.ppl)} (teacher {_teacher(e)}) {stop}"
                    + _probe(e)
                    + "\n",
                    style=color,
                )
        self.border_title = "train vs eval objective  |  eval ppl (teacher dotted)"
        lines.rstrip()
        head = lines if lines else Text("no eval yet", style="grey50")
        h = max(6, height - len(head.wrap(self.app.console, width)))
        top = render_plot(obj_traces, width, h // 2, logy=opts.logy, x_axis=opts.x_axis, robust=opts.robust)
        bottom = render_plot(ppl_traces, width, h - h // 2, logy=opts.logy, x_axis=opts.x_axis, hlines=hlines)
        return Text("\n").join([head, top, bottom])


class StatsPanel(Panel):
    """Last, min, delta and sparkline per metric, plus LR, throughput, progress, ETA, memory."""

    DEFAULT_CSS = """
    StatsPanel {
        height: auto;
        max-height: 24;
    }
    """

    def draw(self, runs: list[RunState], opts: ViewOptions, now: float) -> None:
        if not runs:
            return
        run = runs[opts.baseline]
        others = [r for i, r in enumerate(runs) if i != opts.baseline]
        header = ["metric", "last", "min", "Δ", "trend", *(o.name for o in others)]
        rows: list[list[str]] = []
        kind = "weighted" if opts.weighted else "raw"
        keys = [("objective", run.train, "objective")]
        keys += [(c, run.train, f"{kind}/{c}") for c in run.components if opts.matches(c)]
        keys += [
            ("lr", run.train, "lr"),
            ("temperature", run.train, "temperature"),
            ("tokens/s", run.train, "tokens_per_s"),
            ("grad norm", run.train, "grad_norm"),
            ("mem GiB", run.train, "mem_gib"),
            ("eval obj", run.eval, "objective"),
            ("eval ppl", run.eval, "ppl"),
            ("teacher ppl", run.eval, "teacher_ppl"),
        ]
        for name, table_src, key in keys:
            s = table_src.get(key)
            if s is None or not len(s):
                continue
            delta = s.value[-1] - s.value[-2] if len(s) > 1 else None
            row = [name, _fmt(s.last), _fmt(s.finite_min()), _fmt(delta), sparkline(s.value)]
            for o in others:
                src = o.train if table_src is run.train else o.eval
                os_ = src.get(key)
                row.append(_fmt(os_.last if os_ is not None else None))
            rows.append(row)
        prog = run.progress()
        self.border_title = (
            f"{label(run.name)}: step {run.current_step}/{run.total_steps or '?'}"
            f" {'' if prog is None else f'{100 * prog:.1f}%'}  ETA {eta_text(run)}"
        )
        self.paint(lambda w, h: fit_table(header, rows, w))


class RouterPanel(Panel):
    """Teacher-layer router gate usage (when the run has a router)."""

    DEFAULT_CSS = """
    RouterPanel {
        height: auto;
        max-height: 14;
    }
    """

    def draw(self, runs: list[RunState], opts: ViewOptions) -> None:
        run = runs[opts.baseline] if runs else None
        usage = run.gate_usage if run is not None else None
        self.border_title = "router gate usage per teacher layer"
        if not usage:
            self.paint(lambda w, h: Text("no router in this run", style="grey50"))
            return
        top = max(usage) or 1.0
        n = len(usage)

        def painter(width: int, height: int):
            # a deep teacher folds into columns; what still does not fit says how to see it whole. The side
            # panel's height is its content's (at most 12 rows); shown alone it is the screen's
            cap = max(2, height) if self.expanded else 12
            cols = max(1, min(math.ceil(n / cap), width // 16))
            per_col = math.ceil(n / cols)
            rows = per_col if per_col <= cap else cap - 1
            colw = width // cols
            t, shown = Text(), 0
            for r in range(rows):
                for c in range(cols):
                    layer = c * per_col + r + 1  # teacher layers numbered 1.. as in the config and README
                    if layer > n:
                        continue
                    u, shown = usage[layer - 1], shown + 1
                    bar = max(1, colw - 12)
                    filled = max(0, round(u / top * bar))
                    t.append(f"L{layer:<3}", style="bold")
                    t.append("█" * filled, style="cyan")
                    t.append(f" {u:.3f}".ljust(colw - 4 - filled) if c < cols - 1 else f" {u:.3f}")
                t.append("\n")
            if rows < per_col:
                t.append(f"… {n - shown} more layers: v shows the router alone", style="grey50")
            t.rstrip()
            return t

        self.paint(painter)


class SystemPanel(Panel):
    """Every rank's memory and GPU use, and the host's memory, from the trainer's newest system record."""

    DEFAULT_CSS = """
    SystemPanel {
        height: auto;
        max-height: 14;
    }
    """

    def draw(self, runs: list[RunState], opts: ViewOptions) -> None:
        run = runs[opts.baseline] if runs else None
        rec = run.system if run is not None else None
        if rec is None:
            self.border_title = "system"
            self.paint(lambda w, h: Text("no system records yet", style="grey50"))
            return
        self.border_title = f"system @ step {rec.step}"
        gpu = any(u.gpu_mem_gib is not None for u in rec.ranks)
        # the peaks are of the window since the rank's previous record: what a step really needed
        if gpu:
            header = ["rank", "GPU peak", "GPU held", "of GiB", "GPU %", "RSS peak", "RSS"]
            rows = [
                [str(u.rank), _fmt(u.gpu_peak_gib), _fmt(u.gpu_mem_gib), _fmt(u.gpu_mem_total_gib), _fmt(u.gpu_util)]
                + [_fmt(u.peak_rss_gib), _fmt(u.rss_gib)]
                for u in rec.ranks
            ]
            optional = [6, 5, 4, 3, 2]
        else:
            header = ["rank", "RSS peak GiB", "RSS GiB"]
            rows = [[str(u.rank), _fmt(u.peak_rss_gib), _fmt(u.rss_gib)] for u in rec.ranks]
            optional = [2]
        lines = []
        if rec.host_mem_total_gib:
            lines.append(f"host memory {_fmt(rec.host_mem_used_gib)} of {_fmt(rec.host_mem_total_gib)} GiB")
        if rec.estimate_gib is not None:
            lines.append(f"check's estimate {_fmt(rec.estimate_gib)} GiB per rank (activations excluded)")

        def painter(width: int, height: int):
            table = fit_table(header, rows, width, optional=optional)
            return Text("\n").join([*(Text(line, style="bold") for line in lines), table])

        self.paint(painter)


class AlertsPanel(Panel):
    """Alerts of every run, most severe first."""

    DEFAULT_CSS = """
    AlertsPanel {
        height: auto;
        max-height: 12;
    }
    """

    STYLES = {"error": "bold red", "warning": "yellow", "info": "grey62"}
    MAX_LINES = 10
    """Lines shown beside the other panels; shown alone (`v`), the panel takes the whole height."""

    def draw(self, alerts: list[tuple[str, Alert]], multi: bool) -> None:
        n = sum(a.level != "info" for _, a in alerts)
        self.border_title = f"alerts ({n})"
        if not alerts:
            self.paint(lambda w, h: Text("no alerts", style="green"))
            return

        def painter(width: int, height: int):
            lines: list[Text] = []
            for name, a in alerts:
                prefix = f"[{name}] " if multi else ""
                entry = Text(f"{a.level.upper():7} {prefix}{a.code}: {a.message}", style=self.STYLES.get(a.level, ""))
                lines += entry.wrap(self.app.console, width)
            room = max(1, height if self.expanded else min(height, self.MAX_LINES))
            if len(lines) > room:  # say what is not shown instead of clipping silently
                hidden = len(lines) - (room - 1)
                lines = lines[: room - 1] + [Text(f"... {hidden} more line(s): `v` shows the alerts alone", style="bold")]
            return Text("\n").join(lines)

        self.paint(painter)


class StatusBar(Static):
    """FOLLOW/PAUSED, records per second, time since the last record, stalled warning, view settings."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $boost;
        padding: 0 1;
    }
    """


class KeyBar(Widget):
    """The key bar: the shown bindings in their order, as many as the width holds (every key is in `?`
    help), so a narrow terminal never cuts one in half. A click runs the key's action."""

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        background: $panel;
    }
    """

    def __init__(self, bindings: list[Binding], **kw):
        super().__init__(**kw)
        self.bindings = [b for b in bindings if b.show]
        self._spans: list[tuple[int, int, str]] = []

    @property
    def items(self) -> list[tuple[str, str, str]]:
        """(key as Textual displays it, description, action) of each shown binding."""
        return [(self.app.get_key_display(b), b.description, b.action) for b in self.bindings]

    def fitted(self, width: int) -> list[tuple[str, str, str]]:
        """The items that fit in `width` columns, in order (the first, quit and help, always)."""
        out, used = [], 0
        for key, desc, action in self.items:
            w = len(key) + len(desc) + 3
            if used + w > width and out:
                break
            out.append((key, desc, action))
            used += w
        return out

    def render(self) -> Text:
        text, self._spans = Text(no_wrap=True, overflow="crop"), []
        for key, desc, action in self.fitted(self.size.width):
            start = len(text)
            text.append(f" {key}", style="bold reverse")
            text.append(f" {desc} ")
            self._spans.append((start, len(text), action))
        return text

    async def on_click(self, event) -> None:
        for start, end, action in self._spans:
            if start <= event.x < end:
                await self.app.run_action(action)
                return


class ViewsBar(Static):
    """Small terminals: the views `v` cycles through, the current one highlighted, alerts counted."""

    DEFAULT_CSS = """
    ViewsBar {
        height: 1;
        padding: 0 1;
    }
    """


class Plots(VerticalScroll):
    """The column of per-component plots."""

    DEFAULT_CSS = """
    Plots {
        width: 3fr;
        height: 1fr;
    }
    """


class Side(VerticalScroll):
    """Curriculum, eval, stats, router and alerts."""

    DEFAULT_CSS = """
    Side {
        width: 2fr;
        height: 1fr;
    }
    """


class FilterInput(Input):
    """Glob filter for metric names (comma-separated); Enter applies, Escape cancels."""

    DEFAULT_CSS = """
    FilterInput {
        dock: bottom;
        display: none;
    }
    FilterInput.-shown {
        display: block;
    }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel", show=False)]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.disabled = True  # hidden and unfocusable until "/" opens it

    def open(self, value: str) -> None:
        self.value = value
        self.disabled = False
        self.add_class("-shown")
        self.focus()

    def close(self) -> None:
        self.remove_class("-shown")
        self.disabled = True
        self.app.set_focus(None)

    def action_cancel(self) -> None:
        self.close()


def _probe(e) -> str:
    """An on-policy run's eval: what its own samples look like to the teacher (`g` shows them)."""
    p = e.on_policy
    if not p:
        return ""
    return f" | own samples: len {_fmt(p.get('mean_length'))} stop {100 * (p.get('stop_rate') or 0):.0f}% rKL {_fmt(p.get('reverse_kl'))}"


def _teacher(e) -> str:
    share = e.teacher_ppl_exact_share
    if share is None or share >= 0.99:
        return _fmt(e.teacher_ppl)
    return f"~{_fmt(e.teacher_ppl)}, estimated for {1 - share:.0%} of tokens"


def write_csv(runs: list[RunState], fh) -> int:
    """Every train and eval series of every run as CSV rows: run, kind (train or eval), step, time_s, tokens,
    then one column per series (blank where a record had no such value). Returns the rows written."""
    import csv

    keys = sorted({k for run in runs for table in (run.train, run.eval) for k in table})
    w = csv.writer(fh)
    w.writerow(["run", "kind", "step", "time_s", "tokens", *keys])
    n = 0
    for run in runs:
        for kind, x, table in (("train", run.train_x, run.train), ("eval", run.eval_x, run.eval)):
            cols = {k: dict(zip(s.rows, s.value)) for k, s in table.items()}
            for row in range(len(x.step)):
                values = (repr(cols[k][row]) if k in cols and row in cols[k] else "" for k in keys)
                w.writerow([run.name, kind, x.step[row], f"{x.time[row]:.3f}", int(x.tokens[row]), *values])
                n += 1
    return n


class SearchScreen(ModalScreen):
    """Lines of text (the resolved config, raw records) with a search box: only matching lines are shown."""

    DEFAULT_CSS = """
    SearchScreen {
        align: center middle;
    }
    SearchScreen > VerticalScroll {
        width: 90%;
        height: 85%;
        border: round $accent;
        background: $surface;
    }
    SearchScreen Input {
        width: 90%;
    }
    """
    BINDINGS = [Binding("escape", "dismiss", "close")]

    def __init__(self, title: str, lines: list[str]):
        super().__init__()
        self.title_text = title
        self.lines = lines

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search (case-insensitive); Escape closes", id="search")
        with VerticalScroll() as scroll:
            scroll.border_title = label(self.title_text)
            yield Static(self._text(""), id="found")

    def _text(self, query: str) -> Text:
        q = query.lower()
        shown = [line for line in self.lines if q in line.lower()] if q else self.lines
        out = Text("\n".join(shown) if shown else f"nothing matches '{query}'")
        if q:
            out.highlight_words([query], style="reverse", case_sensitive=False)
        return out

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#found", Static).update(self._text(event.value))

    def shown_text(self) -> str:
        return str(self.query_one("#found", Static).render())


class HelpScreen(ModalScreen):
    """Every key and what it does."""

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 64;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: round $accent;
        padding: 0 1;
        background: $surface;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        t = Text("dsmonitor keys\n\n", style="bold")
        for key, desc in self.rows:
            t.append(f"{key:>12}  ", style="bold cyan")
            t.append(f"{desc}\n")
        t.append("\nEscape closes this screen; arrows and PgUp/PgDn scroll it.", style="grey62")
        # in a small terminal (80x24) the list is taller than the screen: it scrolls, nothing is cut
        with VerticalScroll():
            yield Static(t)
