"""dsmonitor: a Textual dashboard that follows dsdistill metrics streams.

    dsmonitor RUN_DIR [RUN_DIR ...]       follow runs (the first is the baseline in comparisons)
    dsmonitor RUN_DIR --once               print a text summary and exit
    dsmonitor RUN_DIR --json               print the parsed latest state as JSON and exit

A thread (follow.py) tails every file and hands the UI batches of records; the screen redraws on a timer,
never per line. The panels are in panels/ (one list), the view options and their keys in view.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Header, Input

from . import export
from .alerts import AlertRules, evaluate_alerts
from .fmt import sample_lines
from .follow import Follower
from .keys import BINDINGS, COMPACT_SIZE, KEY_HELP
from .messages import Loaded, Preview, RecordsArrived, ZoomRequest
from .oneshot import load_states, summary_json, summary_text
from .panels import PANELS, DrawContext, Panel
from .panels.plot import PlotPanel, Plots
from .state import RunState
from .textsafe import clean, label
from .view import ViewKeys, ViewOptions
from .widgets import FilterInput, HelpScreen, KeyBar, SearchScreen, Side, StatusBar, ViewsBar

PLOT_MIN_WIDTH = 60


class DsMonitor(ViewKeys, App):
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
    BINDINGS = BINDINGS  # type: ignore[assignment]  # a list of Binding is what Textual reads
    KEY_HELP = KEY_HELP

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
        self.opts = ViewOptions()
        self.follower = Follower(
            targets,
            self.post_message,
            poll_interval=poll_interval,
            preview_bytes=preview_bytes,
            smoothing=lambda: self.opts.smoothing,
        )
        self.tailers = self.follower.tailers
        self.runs = [RunState(name) for name in self.follower.names]
        self.rules = rules or AlertRules()
        self.clock = clock
        self.refresh_interval = refresh_interval
        self.paused = False
        self.dirty = True
        self.missing = [False] * len(targets)
        self.export_dir = export_dir
        self.previewed: list[Optional[tuple[int, int]]] = [None] * len(targets)
        """(step, records) each run's preview showed, for runs drawn tail first."""
        self._plots: dict[str, PlotPanel] = {}
        self.panels: dict[str, Panel] = {}
        self.last_export: Optional[Path] = None
        self.maximised: Optional[str] = None
        """The plot that fills the screen (`m`), or None."""
        self.view = "all"
        """What `v` selected: "all" (the whole dashboard) or one view alone (small terminals never show all)."""

    @property
    def catching_up(self) -> bool:
        return self.follower.catching_up

    @property
    def pending(self) -> int:
        return self.follower.inbox.pending()

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        # kept as attributes: the refresh timer must reach them even while a modal screen is on top
        self.status_bar = StatusBar(id="status")
        self.plots = Plots(id="plots")
        self.panels = {cls.view: cls(id=cls.view) for cls in PANELS}
        self.filter_box = FilterInput(placeholder="filter metrics: glob[,glob...] (empty shows all)", id="filter")
        self.views_bar = ViewsBar(id="views")
        self.side = Side(id="side")
        yield Header()
        yield self.status_bar
        yield self.views_bar
        with Horizontal(id="main"):
            yield self.plots
            with self.side:
                yield from self.panels.values()
        yield self.filter_box
        yield KeyBar([*self.BINDINGS, Binding("ctrl+p", "command_palette", "palette")], id="keys")

    def on_mount(self) -> None:
        self.sub_title = label(", ".join(r.name for r in self.runs))
        self._arrange()
        self.set_interval(self.refresh_interval, self.refresh_views)
        self.tail_worker()

    def on_unmount(self) -> None:
        self.follower.stop.set()

    def on_resize(self, event) -> None:
        self._arrange()

    @property
    def compact(self) -> bool:
        """Below COMPACT_SIZE one view at a time fills the screen (`v` switches) instead of panels below the fold."""
        return self.size.width < COMPACT_SIZE[0] or self.size.height < COMPACT_SIZE[1]

    @property
    def shown(self) -> str:
        """The view on screen: "all" (every panel, wide terminals only) or one view alone (`_views`)."""
        return "stats" if self.view == "all" and self.compact else self.view

    def _arrange(self) -> None:
        if self.maximised is not None:
            for name, plot in self._plots.items():
                plot.display = name == self.maximised
                plot.set_class(name == self.maximised, "-alone")
            self.plots.display, self.side.display, self.views_bar.display = True, False, False
            self.plots.styles.layout = "vertical"
            return
        for plot in self._plots.values():
            plot.display = True
            plot.set_class(False, "-alone")
        shown = self.shown
        alone = shown != "all"
        for name, panel in self.panels.items():
            panel.display = (not alone or shown == name) and panel.wanted(self.runs)
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
        self.views_bar.draw(self.shown, self._views(), self.all_alerts())

    def _views(self) -> tuple[str, ...]:
        """The views `v` cycles through, in `PANELS` order, then the plots; a panel with nothing to show (no
        system records yet) is skipped."""
        views = (*(v for v, panel in self.panels.items() if panel.wanted(self.runs)), "plots")
        return views if self.compact else ("all", *views)

    def action_next_view(self) -> None:
        cycle = self._views()
        self.view = cycle[(cycle.index(self.shown) + 1) % len(cycle)]
        self._arrange()
        self.changed()

    # ------------------------------------------------------------------ data
    @work(thread=True, exclusive=True, group="tail")
    def tail_worker(self) -> None:
        self.follower.run()

    def on_preview(self, msg: Preview) -> None:
        self.runs[msg.index] = msg.state
        self.previewed[msg.index] = (msg.state.current_step, msg.state.records)
        self.refresh_views(force=True)

    def on_loaded(self, msg: Loaded) -> None:
        self.runs[msg.index] = msg.state
        self.missing[msg.index] = msg.missing
        self.dirty = True

    def on_records_arrived(self, msg: RecordsArrived) -> None:
        if self.paused:  # a pause is a freeze: what arrives waits in the inbox until follow resumes
            return
        self._apply()

    def _apply(self) -> None:
        for i, res in self.follower.inbox.take():
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

    def on_zoom_request(self, msg: ZoomRequest) -> None:
        self.action_zoom(msg.factor)

    # ------------------------------------------------------------------ drawing
    def all_alerts(self):
        now = self.clock()
        return [(run.name, a) for run in self.runs for a in evaluate_alerts(run, self.rules, now=now)]

    def refresh_views(self, force: bool = False) -> None:
        self._draw_status()
        if (self.paused or not self.dirty or self.catching_up) and not force:
            return
        self.dirty = False
        self._sync_plots()
        ctx = DrawContext(self.runs, self.opts, self.clock(), self.all_alerts())
        for plot in self._plots.values():
            plot.draw(ctx)
        for panel in self.panels.values():
            panel.draw(ctx)
            if panel.display != (panel.wanted(self.runs) and self.shown in ("all", panel.view)):
                self._arrange()  # a panel appears with what it shows (the system panel with the first system record)
        self.views_bar.draw(self.shown, self._views(), ctx.alerts)

    def _sync_plots(self) -> None:
        """One plot per component and per diagnostic the runs have, in order, as the filter allows."""
        wanted = [c for c in PlotPanel.plotted_names(self.runs) if self.opts.matches(c.removeprefix("metric/"))]
        if list(self._plots) != wanted:
            self._plots = self.plots.sync(self._plots, wanted)
            if self.maximised is not None:
                self._arrange()

    def _draw_status(self) -> None:
        mode = f"PAUSED (+{self.pending} new)" if self.paused else "FOLLOW"
        if self.catching_up:
            mode += f" loading history {100 * self.follower.loaded_share():.0f}%"
        self.status_bar.draw(self.runs, self.missing, self.opts, self.rules.stall_seconds, self.clock(), mode)
        self.views_bar.draw(self.shown, self._views(), self.all_alerts())

    def screen_text(self) -> str:
        """The screen as plain text (what a snapshot test compares)."""
        return export.screen_text(self)

    # ------------------------------------------------------------------ actions
    def changed(self) -> None:
        self.dirty = True
        self.refresh_views(force=True)  # also while paused: a view change redraws the frozen data

    def action_maximise(self) -> None:
        if self.maximised is not None:
            self.maximised = None
        else:
            focused = self.focused if isinstance(self.focused, PlotPanel) else None
            self.maximised = focused.plotted if focused is not None else next(iter(self._plots), None)
        self._arrange()
        self.changed()

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
        self.push_screen(SearchScreen(f"{run.name}: the student's own completions", sample_lines(run)))

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self._apply()
            self.changed()
        else:
            self._draw_status()

    def action_filter(self) -> None:
        self.filter_box.open(self.opts.filter)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.opts.filter = event.value.strip()
        self.filter_box.close()
        self.changed()

    def action_export_csv(self) -> None:
        self._export("csv", lambda fh: export.write_csv(self.runs, fh))

    def action_export(self) -> None:
        # toasts are not part of the picture: clear them, export after the next refresh
        self.clear_notifications()
        self.call_after_refresh(lambda: self._export("svg", lambda fh: fh.write(export.svg(self))))

    def _export(self, suffix: str, write) -> None:
        try:
            path = export.write_export(Path(self.export_dir or os.getcwd()), export.export_name(self.runs, suffix), write)
        except OSError as e:
            self.notify(label(f"export failed: {e}"), severity="error")
            return
        self.last_export = path
        self.notify(label(f"saved {path}"))

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.KEY_HELP))


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
