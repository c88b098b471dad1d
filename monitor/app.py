"""dsmonitor: a Textual dashboard that follows dsdistill metrics streams.

    dsmonitor RUN_DIR [RUN_DIR ...]       follow runs (the first is the baseline in comparisons)
    dsmonitor RUN_DIR --once               print a text summary and exit
    dsmonitor RUN_DIR --json               print the parsed latest state as JSON and exit

A thread worker tails every file and posts batches of records; the screen redraws on a timer, never per line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from rich.console import Console
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Header, Input

from .alerts import AlertRules, evaluate_alerts
from .series_math import BlockMinMax
from .state import X_AXES, RunState
from .tail import PollResult, Tailer, run_name
from .textsafe import clean, label
from .widgets import (
    LONG,
    SMOOTHING,
    WINDOWS,
    AlertsPanel,
    CurriculumPanel,
    EvalPanel,
    FilterInput,
    HelpScreen,
    KeyBar,
    PlotPanel,
    Plots,
    RouterPanel,
    SearchScreen,
    Side,
    StatsPanel,
    StatusBar,
    SystemPanel,
    ViewOptions,
    ViewsBar,
    _duration,
    series_xy,
    write_csv,
)

MAX_BYTES_PER_POLL = 1 << 20
FIRST_FRAMES_S = 0.3
COMPACT_SIZE = (100, 30)
PLOT_MIN_WIDTH = 60
VIEWS = ("stats", "alerts", "curriculum", "eval", "router", "system", "plots")


class RecordsArrived(Message):
    """A batch read by the tail worker for run `index`."""

    def __init__(self, index: int, result: PollResult):
        super().__init__()
        self.index = index
        self.result = result


class Preview(Message):
    """A large file's state from its first and latest records, read before its history (Tailer.peek_latest)."""

    def __init__(self, index: int, state: RunState):
        super().__init__()
        self.index = index
        self.state = state


class Loaded(Message):
    """A run's whole history, ingested by the tail worker (off the UI thread)."""

    def __init__(self, index: int, state: RunState, missing: bool):
        super().__init__()
        self.index = index
        self.state = state
        self.missing = missing


class DsMonitor(App):
    """The dashboard."""

    TITLE = "dsmonitor"
    CSS = """
    Screen {
        layout: vertical;
    }
    #main {
        height: 1fr;
    }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help"),
        Binding("v", "next_view", "view"),
        Binding("p", "pause", "pause"),
        Binding("slash", "filter", "filter"),
        Binding("r", "toggle_weighted", "raw/weighted"),
        Binding("e", "export", "SVG"),
        Binding("l", "toggle_log", "log-y"),
        Binding("s", "smooth(1)", "smooth+"),
        Binding("S", "smooth(-1)", "smooth-"),
        Binding("x", "cycle_x", "x-axis"),
        Binding("n", "cycle_window", "window"),
        Binding("b", "cycle_baseline", "baseline"),
        Binding("o", "toggle_robust", "outliers"),
        Binding("m", "maximise", "maximise plot", show=False),
        Binding("plus,equals_sign", "zoom(0.5)", "zoom+", show=False),
        Binding("minus", "zoom(2.0)", "zoom-", show=False),
        Binding("less_than_sign,comma", "pan(-1)", "pan left", show=False),
        Binding("greater_than_sign,full_stop", "pan(1)", "pan right", show=False),
        Binding("0", "reset_zoom", "reset zoom", show=False),
        Binding("left_square_bracket", "cursor(-1)", "cursor left", show=False),
        Binding("right_square_bracket", "cursor(1)", "cursor right", show=False),
        Binding("c", "hide_cursor", "hide cursor", show=False),
        Binding("E", "export_csv", "CSV", show=False),
        Binding("i", "show_config", "config", show=False),
        Binding("j", "show_records", "records", show=False),
        Binding("g", "show_samples", "samples", show=False),
        Binding("tab", "focus_next", "next panel", show=False),
        Binding("shift+tab", "focus_previous", "prev panel", show=False),
    ]
    HELP = [
        ("q", "quit"),
        ("?", "this help"),
        ("p", "pause / follow (records keep being read while paused)"),
        ("l", "log-y on/off"),
        ("s / S", "more / less smoothing (debiased EMA)"),
        ("x", "x-axis: step, wall time, tokens"),
        ("r", "raw / weighted components"),
        ("n", "window: all or the last N points"),
        ("/", "filter metrics by glob, e.g. kd,routing_*"),
        ("b", "next run as the pinned baseline"),
        ("e", "export an SVG screenshot (to --export-dir or the current directory)"),
        ("v", f"one view alone, next view (below {COMPACT_SIZE[0]}x{COMPACT_SIZE[1]} one view is always alone)"),
        ("o", "y range ignores outliers (2nd-98th percentile) on/off"),
        ("m", "the focused plot (tab to it) fills the screen; m again brings the others back"),
        ("+ / -", "zoom in / out on x (about the crosshair, else the newest end)"),
        ("< / >", "pan left / right; 0 resets the zoom"),
        ("[ / ]", "crosshair one record left / right: every plot reads its value there; c hides it"),
        ("E", "export every series as CSV (to --export-dir or the current directory)"),
        ("i", "the run's resolved config, searchable"),
        ("j", "the newest raw records, searchable"),
        ("g", "on-policy runs: the student's completions of held-out prompts at each eval, with the teacher's score"),
        ("tab", "next / previous panel (shift+tab)"),
    ]

    def __init__(
        self,
        targets: list[str],
        *,
        poll_interval: float = 1.0,
        refresh_interval: float = 0.5,
        rules: Optional[AlertRules] = None,
        clock: Callable[[], float] = time.time,
        export_dir: Optional[str] = None,
        preview_bytes: int = 4 << 20,
    ):
        super().__init__()
        self.targets = targets
        self.tailers = [Tailer(t) for t in targets]
        self.runs = [RunState(run_name(t)) for t in targets]
        self.opts = ViewOptions()
        self.rules = rules or AlertRules()
        self.clock = clock
        self.poll_interval = poll_interval
        self.refresh_interval = refresh_interval
        self.paused = False
        self.pending = 0
        self.dirty = True
        self.missing = [False] * len(targets)
        self.export_dir = export_dir
        self.catching_up = True
        """True while the worker is still reading a backlog: intermediate full redraws are skipped."""
        self.preview_bytes = preview_bytes
        """Files larger than this are drawn from their first and latest records before their history is read."""
        self.previewed: list[Optional[tuple[int, int]]] = [None] * len(targets)
        """(step, records) each run's preview showed, for runs drawn tail first."""
        self.loaded_bytes = [0] * len(targets)
        self._stop = threading.Event()
        self._plots: dict[str, PlotPanel] = {}
        self.last_export: Optional[Path] = None
        self.maximised: Optional[str] = None
        """The component whose plot fills the screen (`m`), or None."""
        self.view = "all"
        """What `v` selected: "all" (the whole dashboard) or one view alone (small terminals never show all)."""
        self.held: list[RecordsArrived] = []
        """Batches that arrived while paused (applied when follow resumes)."""

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        # kept as attributes: the refresh timer must reach them even while a modal screen is on top
        self.status_bar = StatusBar(id="status")
        self.plots = Plots(id="plots")
        self.stats = StatsPanel(id="stats")
        self.alerts = AlertsPanel(id="alerts")
        self.curriculum = CurriculumPanel(id="curriculum")
        self.eval_panel = EvalPanel(id="eval")
        self.router = RouterPanel(id="router")
        self.system = SystemPanel(id="system")
        self.filter_box = FilterInput(placeholder="filter metrics: glob[,glob...] (empty shows all)", id="filter")
        self.views_bar = ViewsBar(id="views")
        self.side = Side(id="side")
        yield Header()
        yield self.status_bar
        yield self.views_bar
        with Horizontal(id="main"):
            yield self.plots
            with self.side:
                yield self.stats
                yield self.system
                yield self.alerts
                yield self.curriculum
                yield self.eval_panel
                yield self.router
        yield self.filter_box
        yield KeyBar([*self.BINDINGS, Binding("ctrl+p", "command_palette", "palette")], id="keys")

    def on_mount(self) -> None:
        self.sub_title = label(", ".join(r.name for r in self.runs))
        self._arrange()
        self.set_interval(self.refresh_interval, self.refresh_views)
        self.tail_worker()

    def on_unmount(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ small terminals
    def on_resize(self, event) -> None:
        self._arrange()

    @property
    def compact(self) -> bool:
        """Below COMPACT_SIZE one view at a time fills the screen (`v` switches) instead of panels below the fold."""
        return self.size.width < COMPACT_SIZE[0] or self.size.height < COMPACT_SIZE[1]

    @property
    def shown(self) -> str:
        """The view on screen: "all" (every panel, wide terminals only) or one of VIEWS alone."""
        return "stats" if self.view == "all" and self.compact else self.view

    def _arrange(self) -> None:
        if self.maximised is not None:
            for name, panel in self._plots.items():
                panel.display = name == self.maximised
                panel.set_class(name == self.maximised, "-alone")
            self.plots.display, self.side.display, self.views_bar.display = True, False, False
            self.plots.styles.layout = "vertical"
            return
        for panel in self._plots.values():
            panel.display = True
            panel.set_class(False, "-alone")
        shown = self.shown
        alone = shown != "all"
        views = {
            "stats": self.stats,
            "alerts": self.alerts,
            "curriculum": self.curriculum,
            "eval": self.eval_panel,
            "router": self.router,
            "system": self.system,
        }
        has_system = any(r.system is not None for r in self.runs)
        for name, panel in views.items():
            panel.display = (not alone or shown == name) and (name != "system" or has_system)
            panel.expanded = alone
            panel.set_class(alone, "-alone")
        self.plots.display = not alone or shown == "plots"
        self.side.display = not alone or shown != "plots"
        self.side.styles.width = "1fr" if alone else "2fr"
        # wide terminals: plots in a grid of columns at least PLOT_MIN_WIDTH cells wide
        plots_width = self.size.width if shown == "plots" else self.size.width * 3 // 5
        columns = max(1, plots_width // PLOT_MIN_WIDTH)
        self.plots.styles.layout = "grid" if columns > 1 else "vertical"
        if columns > 1:
            self.plots.styles.grid_size_columns = columns
            self.plots.styles.grid_rows = "12"
        self.views_bar.display = alone
        self._draw_views_bar()

    def _draw_views_bar(self) -> None:
        if self.shown == "all":
            return
        n_alerts = sum(a.level != "info" for _, a in self.all_alerts())
        bar = Text("v ", style="bold")
        for name in self._views():
            label = f"{name} ({n_alerts})" if name == "alerts" and n_alerts else name
            bar.append(f" {label} ", style="reverse bold" if name == self.shown else ("bold red" if label != name else ""))
        self.views_bar.update(bar)

    def _views(self) -> tuple[str, ...]:
        """The views `v` cycles through: the system view only once a run has written system records."""
        views = tuple(v for v in VIEWS if v != "system" or any(r.system is not None for r in self.runs))
        return views if self.compact else ("all", *views)

    def action_next_view(self) -> None:
        cycle = self._views()
        self.view = cycle[(cycle.index(self.shown) + 1) % len(cycle)]
        self._arrange()
        self._changed()

    # ------------------------------------------------------------------ data
    @work(thread=True, exclusive=True, group="tail")
    def tail_worker(self) -> None:
        # 0. what drawing the curriculum needs is imported here, not on the UI thread at the first draw
        import dsdistill.curriculum  # noqa: F401

        # 1. a large file's latest state first, so the screen shows where the run is within moments
        previews = 0
        for i, tailer in enumerate(self.tailers):
            if _size(tailer.path) > self.preview_bytes:
                previews += 1
                preview = RunState(self.runs[i].name)  # built here too: the UI thread only swaps it in
                for rec in tailer.peek_latest(tail_bytes=min(2 << 20, self.preview_bytes // 4)).records:
                    preview.add(rec)
                self.post_message(Preview(i, preview))
        # 2. every history read and ingested here, off the UI thread (keys stay responsive); the UI swaps
        #    each run in whole. The first frames are drawn before the parsing starts to compete for the
        #    interpreter, and the parsing pauses between chunks so a key is never queued for long.
        if previews:
            self._stop.wait(FIRST_FRAMES_S)
        for i, tailer in enumerate(self.tailers):
            state = RunState(self.runs[i].name)
            while not self._stop.is_set():
                res = tailer.poll(max_bytes=MAX_BYTES_PER_POLL)
                if res.restarted:
                    state = RunState(state.name)
                # no GC pause here: the history is held in arrays, not in objects the GC would rescan, and a
                # pause as long as the load would let the UI's cyclic garbage pile up (GBs on a 1M-record file)
                for rec in res.records:
                    state.add(rec)
                state.corrupt += res.corrupt
                state.unknown += res.unknown
                self.loaded_bytes[i] = tailer.offset
                if res.missing or tailer.offset >= _size(tailer.path):
                    break
                time.sleep(0.002)
            if self.opts.smoothing > 0:  # smooth the history here too: the first draw then has nothing to catch up
                for key, series in list(state.train.items()):
                    if key.startswith(("raw/", "weighted/")) or key == "objective":  # what the plots smooth
                        smooth = series.smoothed(self.opts.smoothing)
                        if len(series) > LONG:  # and the block extremes a whole-history plot starts from
                            series.blocks.setdefault(None, BlockMinMax()).candidates(series.value)
                            series.blocks.setdefault(self.opts.smoothing, BlockMinMax()).candidates(smooth)
            self.post_message(Loaded(i, state, res.missing))
        self.catching_up = False
        # 3. follow: small batches applied by the UI thread
        while not self._stop.is_set():
            more = False
            for i, tailer in enumerate(self.tailers):
                res = tailer.poll(max_bytes=MAX_BYTES_PER_POLL)
                if res.records or res.corrupt or res.restarted or res.missing != self.missing[i]:
                    self.post_message(RecordsArrived(i, res))
                more = more or tailer.offset < _size(tailer.path)
            self.catching_up = more
            if not more:
                self._stop.wait(self.poll_interval)

    def on_preview(self, msg: Preview) -> None:
        state = msg.state
        self.runs[msg.index] = state
        self.previewed[msg.index] = (state.current_step, state.records)
        self.refresh_views(force=True)

    def on_loaded(self, msg: Loaded) -> None:
        self.runs[msg.index] = msg.state
        self.missing[msg.index] = msg.missing
        self.dirty = True

    def on_records_arrived(self, msg: RecordsArrived) -> None:
        if self.paused:  # a pause is a freeze: what arrives waits until follow resumes
            self.held.append(msg)
            self.pending += len(msg.result.records)
            return
        self._apply(msg)

    def _apply(self, msg: RecordsArrived) -> None:
        res = msg.result
        i = msg.index
        self.missing[i] = res.missing
        if res.restarted:
            old = self.runs[i]
            self.runs[i] = RunState(old.name)
            self.runs[i].corrupt = old.corrupt
            self.notify(label(f"{old.name}: metrics file {res.restarted}, re-reading from the start"), severity="warning")
        run = self.runs[i]
        for rec in res.records:
            run.add(rec)
        run.corrupt += res.corrupt
        run.unknown += res.unknown
        self.dirty = True

    # ------------------------------------------------------------------ drawing
    def all_alerts(self):
        now = self.clock()
        return [(run.name, a) for run in self.runs for a in evaluate_alerts(run, self.rules, now=now)]

    def refresh_views(self, force: bool = False) -> None:
        self._draw_status()
        if (self.paused or not self.dirty or self.catching_up) and not force:
            return
        self.dirty = False
        runs, opts = self.runs, self.opts
        wanted = [c for c in _union_components(runs) if opts.matches(c)]
        plots = self.plots
        if list(self._plots) != wanted:
            for name in [n for n in self._plots if n not in wanted]:
                self._plots.pop(name).remove()
            # new plots go right after their predecessor in component order (a cleared filter brings them back
            # where they were, not at the end)
            prev: Optional[PlotPanel] = None
            for name in wanted:
                panel = self._plots.get(name)
                if panel is None:
                    panel = self._plots[name] = PlotPanel(name)
                    if prev is not None:
                        plots.mount(panel, after=prev)
                    elif plots.children:
                        plots.mount(panel, before=0)
                    else:
                        plots.mount(panel)
                prev = panel
            self._plots = {name: self._plots[name] for name in wanted}
            if self.maximised is not None:
                self._arrange()
        for name in wanted:
            self._plots[name].draw(runs, opts)
        self.stats.draw(runs, opts, self.clock())
        self.curriculum.draw(runs, opts)
        self.eval_panel.draw(runs, opts)
        self.router.draw(runs, opts)
        self.system.draw(runs, opts)
        if self.system.display != (any(r.system is not None for r in runs) and self.shown in ("all", "system")):
            self._arrange()  # the system panel appears with the first system record
        self.alerts.draw(self.all_alerts(), len(runs) > 1)

    def _draw_status(self) -> None:
        """One line: follow state, each run's liveness (by its records' own times) and the view settings.
        Parts that do not fit the width are left out whole, least important first; none is cut."""
        now = self.clock()
        mode = f"PAUSED (+{self.pending} new)" if self.paused else "FOLLOW"
        if self.catching_up:
            total = sum(_size(t.path) for t in self.tailers) or 1
            mode += f" loading history {100 * sum(self.loaded_bytes) / total:.0f}%"
        states, extra = [], []
        for i, run in enumerate(self.runs):
            since = run.since_last(now)
            state = (
                "no file yet"
                if self.missing[i]
                else "no records"
                if since is None
                else f"ended: {run.end.reason}"
                if run.end is not None
                else "STALLED"
                if since > run.stall_after(self.rules.stall_seconds)
                else "live"
            )
            states.append((run.name, state, since))
            gap = run.record_interval()
            bits = [f"{run.name}: a record every {_duration(gap)}" if gap is not None else f"{run.name}:"]
            if run.earlier_runs:
                bits.append(f"a fresh run replaced {run.earlier_runs} earlier run(s) in this file")
            if run.corrupt:
                bits.append(f"{run.corrupt} corrupt")
            if run.unknown:
                bits.append(f"{run.unknown} of unknown kinds skipped")
            if len(bits) > 1 or gap is not None:
                extra.append(" ".join(bits))
        o = self.opts
        extra.insert(
            0,
            f"x:{o.x_axis} smooth:{o.smoothing:g} log-y:{'on' if o.logy else 'off'} "
            f"{'weighted' if o.weighted else 'raw'} window:{o.window or 'all'}"
            + (f" filter:{o.filter}" if o.filter else "")
            + (f" zoom:{100 * o.zoom[0]:.0f}-{100 * o.zoom[1]:.0f}%" if o.zoom != (0.0, 1.0) else "")
            + (" outliers:ignored" if o.robust else "")
            + (f" crosshair:{o.cursor:g}" if o.cursor is not None else ""),
        )
        room = max(10, self.size.width - 2)
        parts = [mode, *_run_states(states, room - len(mode) - 3)]
        for part in extra:
            if len(" | ".join([*parts, part])) <= room:
                parts.append(part)
        while len(" | ".join(parts)) > room and len(parts) > 1:
            parts.pop()
        self.status_bar.update(label(" | ".join(parts)))  # run names and filters come from outside
        self._draw_views_bar()

    def screen_text(self) -> str:
        """The screen as plain text (what a snapshot test compares)."""
        width, height = self.size
        console = Console(width=width, height=height, file=io.StringIO(), record=True, color_system=None, legacy_windows=False)
        console.print(self.screen._compositor.render_update(full=True, screen_stack=self._background_screens))
        return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"

    # ------------------------------------------------------------------ actions
    def _changed(self) -> None:
        self.dirty = True
        self.refresh_views(force=True)  # also while paused: a view change redraws the frozen data

    def _base_xs(self):
        """x of the baseline run's train points, in order (what the crosshair steps along)."""
        s = self.runs[self.opts.baseline].train.get("objective") if self.runs else None
        if s is None or not len(s):
            return None
        xs, _ = series_xy(s, self.opts.x_axis)
        return xs[np.isfinite(xs)]

    def action_maximise(self) -> None:
        if self.maximised is not None:
            self.maximised = None
        else:
            focused = self.focused if isinstance(self.focused, PlotPanel) else None
            self.maximised = focused.component if focused is not None else next(iter(self._plots), None)
        self._arrange()
        self._changed()

    def action_toggle_robust(self) -> None:
        self.opts.robust = not self.opts.robust
        self._changed()

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
        self._changed()

    def action_pan(self, direction: int) -> None:
        z0, z1 = self.opts.zoom
        step = 0.25 * (z1 - z0) * direction
        step = max(-z0, min(1 - z1, step))
        self.opts.zoom = (z0 + step, z1 + step)
        self._changed()

    def action_reset_zoom(self) -> None:
        self.opts.zoom = (0.0, 1.0)
        self._changed()

    def action_cursor(self, direction: int) -> None:
        xs = self._base_xs()
        if xs is None or not len(xs):
            return
        if self.opts.cursor is None:
            i = len(xs) - 1
        else:
            i = int(np.searchsorted(xs, self.opts.cursor, side="right")) - 1 + direction
        self.opts.cursor = float(xs[max(0, min(len(xs) - 1, i))])
        self._changed()

    def action_hide_cursor(self) -> None:
        self.opts.cursor = None
        self._changed()

    def action_export_csv(self) -> None:
        path = (
            Path(self.export_dir or os.getcwd())
            / f"dsmonitor-{'-'.join(r.name for r in self.runs)[:80]}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        )
        try:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                write_csv(self.runs, fh)
        except OSError as e:
            self.notify(label(f"export failed: {e}"), severity="error")
            return
        self.last_export = path
        self.notify(label(f"saved {path}"))

    def action_show_config(self) -> None:
        run = self.runs[self.opts.baseline]
        if run.start is None:
            self.notify("no run_start record yet", severity="warning")
            return
        import yaml

        text = yaml.safe_dump(run.start.config, sort_keys=False)
        self.push_screen(SearchScreen(f"{run.name}: resolved config (run_start)", text.splitlines()))

    def action_show_records(self) -> None:
        tailer = self.tailers[self.opts.baseline]
        lines = [clean(line.decode("utf-8", "replace")) for line in tailer.tail_lines(500)]
        self.push_screen(SearchScreen(f"{self.runs[self.opts.baseline].name}: newest {len(lines)} records", lines))

    def action_show_samples(self) -> None:
        run = self.runs[self.opts.baseline]
        lines: list[str] = []
        for e in run.evals:
            p = e.on_policy
            if not p:
                continue
            lines.append(
                f"eval @ step {e.step}: {p.get('completions', 0)} completions, mean length {p.get('mean_length', 0):.1f}, "
                f"stop rate {100 * p.get('stop_rate', 0):.0f}%, reverse KL {p.get('reverse_kl', float('nan')):.4g}"
            )
            for s in p.get("samples", []):  # already cleaned of controls when read; shown as text
                lines.append(f"  prompt: {s.get('prompt', '')}")
                lines.append(
                    f"  student: {s.get('completion', '')}   (teacher log-prob/token {s.get('teacher_logprob', float('nan')):.3f})"
                )
        if not lines:
            lines = ["no on-policy samples yet: they come with each eval of a run with curriculum.on_policy > 0"]
        self.push_screen(SearchScreen(f"{run.name}: the student's own completions", lines))

    def action_toggle_log(self) -> None:
        self.opts.logy = not self.opts.logy
        self._changed()

    def action_smooth(self, direction: int) -> None:
        i = SMOOTHING.index(self.opts.smoothing) if self.opts.smoothing in SMOOTHING else 1
        self.opts.smoothing = SMOOTHING[max(0, min(len(SMOOTHING) - 1, i + direction))]
        self._changed()

    def action_cycle_x(self) -> None:
        self.opts.x_axis = X_AXES[(X_AXES.index(self.opts.x_axis) + 1) % len(X_AXES)]
        self._changed()

    def action_toggle_weighted(self) -> None:
        self.opts.weighted = not self.opts.weighted
        self._changed()

    def action_cycle_window(self) -> None:
        self.opts.window = WINDOWS[(WINDOWS.index(self.opts.window) + 1) % len(WINDOWS)]
        self._changed()

    def action_cycle_baseline(self) -> None:
        self.opts.baseline = (self.opts.baseline + 1) % len(self.runs)
        self.notify(label(f"baseline: {self.runs[self.opts.baseline].name}"))
        self._changed()

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            held, self.held, self.pending = self.held, [], 0
            for msg in held:
                self._apply(msg)
            self._changed()
        else:
            self._draw_status()

    def action_filter(self) -> None:
        self.filter_box.open(self.opts.filter)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.opts.filter = event.value.strip()
        self.filter_box.close()
        self._changed()

    def action_export(self) -> None:
        # toasts are not part of the picture: clear them, export after the next refresh
        self.clear_notifications()
        self.call_after_refresh(self._export_svg)

    def _export_svg(self) -> None:
        """The screen as a self-contained SVG (no remote font) in --export-dir or the current directory,
        never in the run directory (it may be shared or read-only)."""
        width, height = self.size
        console = Console(
            width=width,
            height=height,
            file=io.StringIO(),
            record=True,
            legacy_windows=False,
            force_terminal=True,
            color_system="truecolor",
        )
        console.print(self.screen._compositor.render_update(full=True, screen_stack=self._background_screens))
        svg = re.sub(r',\s*url\("[^"]*"\)\s*format\("[^"]*"\)', "", console.export_svg(title="dsmonitor"))
        name = f"dsmonitor-{'-'.join(r.name for r in self.runs)[:80]}-{time.strftime('%Y%m%d-%H%M%S')}.svg"
        path = Path(self.export_dir or os.getcwd()) / name
        try:
            path.write_text(svg, encoding="utf-8")
        except OSError as e:
            self.notify(label(f"export failed: {e}"), severity="error")
            return
        self.last_export = path
        self.notify(label(f"saved {path}"))

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.HELP))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _union_components(runs: list[RunState]) -> list[str]:
    from .state import component_order

    return component_order({c for r in runs for c in r.components})


# ---------------------------------------------------------------------- one-shot modes


def load_states(targets: list[str]) -> list[RunState]:
    """Read every file once, to its end."""
    states = []
    for t in targets:
        tailer, state = Tailer(t), RunState(run_name(t))
        res = tailer.poll()
        for rec in res.records:
            state.add(rec)
        state.corrupt, state.unknown = res.corrupt, res.unknown
        states.append(state)
    return states


def summary_text(states: list[RunState], rules: AlertRules) -> str:
    lines = []
    now = time.time()
    for s in states:
        d = s.summary()
        prog = "" if d["progress"] is None else f" ({100 * d['progress']:.1f}%)"
        lines.append(
            f"run {s.name}: step {d['step']}/{d['total_steps'] or '?'}{prog}, {d['records']} records, "
            f"{d['corrupt_lines']} corrupt, {'ended: ' + d['ended'] if d['ended'] else 'running, ETA ' + _duration(d['eta_s'])}"
        )
        if d["train"]:
            t = d["train"]
            comps = " ".join(f"{k}={v:.4g}" for k, v in t["losses"].items())
            lines.append(
                f"  train @ {t['step']}: objective {t['objective']:.4g} | {comps} | lr {t['lr']:.3g} | T {t['temperature']:.3g} | {t['tokens_per_s']:,.0f} tok/s"
            )
        if d["eval"]:
            e = d["eval"]
            teacher = f" (teacher {e['teacher_ppl']:.4g})" if e["teacher_ppl"] is not None else ""
            lines.append(
                f"  eval  @ {e['step']}: objective {e['objective']:.4g} | ppl {e['ppl']:.4g}{teacher} | best {e['metric']} "
                f"{e['best']:.4g}"
            )
        alerts = evaluate_alerts(s, rules, now=now)
        for a in alerts:
            lines.append(f"  {a.level.upper()} {a.code}: {a.message}")
        if not alerts:
            lines.append("  no alerts")
    return "\n".join(lines)


def summary_json(states: list[RunState], rules: AlertRules) -> str:
    now = time.time()
    out = []
    for s in states:
        d = s.summary()
        d["alerts"] = [
            {"code": a.code, "level": a.level, "message": a.message, "step": a.step} for a in evaluate_alerts(s, rules, now=now)
        ]
        out.append(d)
    return json.dumps(out, indent=2, allow_nan=True)  # always a list, one entry per run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsmonitor", description="Follow dsdistill runs in the terminal.")
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directory or metrics.jsonl (several: compare; the first is the baseline)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="print a text summary and exit (status 1 if any run has an ERROR alert)")
    g.add_argument(
        "--json", action="store_true", help="print the latest state of every run as a JSON list and exit (status as --once)"
    )
    p.add_argument("--poll", type=float, default=1.0, help="seconds between file polls (default 1)")
    p.add_argument("--refresh", type=float, default=0.5, help="seconds between redraws (default 0.5)")
    p.add_argument(
        "--stall",
        type=float,
        default=300.0,
        help="seconds since the newest record was written (its own time) before a run without run_end is STALLED "
        "(default 300; sooner for a run that writes often: ten of its median record intervals, at least 30)",
    )
    p.add_argument("--export-dir", default=None, help="where `e` writes SVG screenshots (default: the current directory)")
    p.add_argument("--gap", type=float, default=0.5, help="relative train/eval objective gap that alerts (default 0.5)")
    p.add_argument(
        "--spike", type=float, default=3.0, help="objective above this multiple of the recent median alerts (default 3)"
    )
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for t in args.runs:
        if not Path(t).exists():
            print(
                f"dsmonitor: error: '{clean(t)}' does not exist; expected a run directory or a metrics.jsonl file",
                file=sys.stderr,
            )
            return 2
    rules = AlertRules(gap=args.gap, spike=args.spike, stall_seconds=args.stall)
    if args.once or args.json:
        states = load_states(args.runs)
        text = summary_json(states, rules) if args.json else summary_text(states, rules)
        errors = any(a.level == "error" for s in states for a in evaluate_alerts(s, rules, now=time.time()))
        try:
            print(text, flush=True)
        except BrokenPipeError:  # `dsmonitor --once | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        # CI can gate on a run: 1 when any run has an ERROR alert
        return 1 if errors else 0
    DsMonitor(args.runs, poll_interval=args.poll, refresh_interval=args.refresh, rules=rules, export_dir=args.export_dir).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _run_states(states: list[tuple[str, str, Optional[float]]], room: int) -> list[str]:
    """Each run's state for the status line, every run shown: in full ("live, last record 3s ago"), else
    short ("live 3s"), else with names shortened to share the room."""

    def render(name: str, state: str, since: Optional[float], short: bool) -> str:
        if since is None:
            return f"{name}: {state}"
        return f"{name}: {state} {_duration(since)}" if short else f"{name}: {state}, last record {_duration(since)} ago"

    for short in (False, True):
        parts = [render(n, st, since, short) for n, st, since in states]
        if len(" | ".join(parts)) <= room:
            return parts
    fixed = len(" | ".join(render("", st, since, True) for _, st, since in states))
    per = max(4, (room - fixed) // max(1, len(states)))
    return [render(n if len(n) <= per else n[: per - 1] + "…", st, since, True) for n, st, since in states]
