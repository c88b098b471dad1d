"""The plots: one per loss component and one per diagnostic, in a column (a grid on wide terminals)."""

from __future__ import annotations

import re
from typing import Optional

from rich.text import Text
from textual.containers import VerticalScroll

from ..fmt import fmt
from ..messages import ZoomRequest
from ..plot import Trace, render_plot
from ..state import RunState
from ..textsafe import label
from ..view import RUN_COLORS, ViewOptions, ordered_runs, series_trace, value_at, view_bounds
from .base import DrawContext, Panel


class PlotPanel(Panel):
    """One loss component (raw or weighted) or one component's diagnostic (`metric/<name>`) over training,
    for every run (baseline first), with its eval points."""

    DEFAULT_CSS = """
    PlotPanel {
        height: 12;
    }
    """

    def __init__(self, plotted: str, **kw):
        # a widget id takes letters, digits, - and _ only; a component's name comes from a file
        super().__init__(id="plot-" + re.sub(r"[^A-Za-z0-9_-]", lambda m: f"_{ord(m.group()):x}_", plotted), **kw)
        self.plotted = plotted
        """A component's name, or metric/<name> for a diagnostic."""
        self.is_metric = plotted.startswith("metric/")
        self.border_title = label(plotted.removeprefix("metric/"))

    # the mouse wheel zooms the x range, as + and - do (terminals that report the mouse)
    def on_mouse_scroll_up(self, event) -> None:
        event.stop()
        self.post_message(ZoomRequest(0.8))

    def on_mouse_scroll_down(self, event) -> None:
        event.stop()
        self.post_message(ZoomRequest(1.25))

    @staticmethod
    def plotted_names(runs: list[RunState]) -> list[str]:
        """What the plots show: every run's components in component order, then their diagnostics."""
        from ..state import component_order

        metrics = sorted({m for r in runs for m in r.metrics})
        return component_order({c for r in runs for c in r.components}) + [f"metric/{m}" for m in metrics]

    def keys(self, opts: ViewOptions) -> tuple[str, Optional[str]]:
        """(train series key, eval series key or None) this plot draws under the view options."""
        if self.is_metric:
            return self.plotted, self.plotted
        kind = "weighted" if opts.weighted else "raw"
        return f"{kind}/{self.plotted}", None if opts.weighted else f"raw/{self.plotted}"

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
        key, eval_key = self.keys(opts)
        at = "" if opts.cursor is None else f" @ {opts.cursor:g}"
        kind = "" if self.is_metric else f" ({'weighted' if opts.weighted else 'raw'})"
        title = Text(f"{self.plotted.removeprefix('metric/')}{kind}{at}  ")
        for i, run in ordered_runs(runs, opts):
            s = run.train.get(key)
            if s is not None and len(s):
                v = s.last if opts.cursor is None else value_at(s, opts.x_axis, opts.cursor)
                title.append(f"{fmt(v)} ", style=RUN_COLORS[i % len(RUN_COLORS)])
        self.border_title = title
        base = runs[opts.baseline] if runs else None
        bounds = view_bounds(base.train.get(key) if base is not None else None, opts)

        def painter(width: int, height: int):
            traces: list[Trace] = []
            for i, run in ordered_runs(runs, opts):
                s = run.train.get(key)
                if s is not None and len(s):
                    traces += series_trace(s, opts, RUN_COLORS[i % len(RUN_COLORS)], width - 9, run.name, bounds=bounds)
                ev = run.eval.get(eval_key) if eval_key is not None else None
                if ev is not None and len(ev):
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


class Plots(VerticalScroll):
    """The column of per-component plots."""

    DEFAULT_CSS = """
    Plots {
        width: 3fr;
        height: 1fr;
    }
    """

    def sync(self, plots: dict[str, PlotPanel], wanted: list[str]) -> dict[str, PlotPanel]:
        """Mount and remove plots so that `wanted` are shown, in order; returns them by name. A new plot goes
        right after its predecessor (a cleared filter brings plots back where they were)."""
        for name in [n for n in plots if n not in wanted]:
            plots.pop(name).remove()
        prev: Optional[PlotPanel] = None
        for name in wanted:
            plot = plots.get(name)
            if plot is None:
                plot = plots[name] = PlotPanel(name)
                if prev is not None:
                    self.mount(plot, after=prev)
                elif self.children:
                    self.mount(plot, before=0)
                else:
                    self.mount(plot)
            prev = plot
        return {name: plots[name] for name in wanted}
