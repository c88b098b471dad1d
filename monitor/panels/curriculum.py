"""The curriculum: every weight (and the on-policy share) over the run, a marker at the current step, T."""

from __future__ import annotations

from rich.text import Text

from ..fmt import fmt
from ..plot import Trace, render_plot
from ..view import RUN_COLORS
from .base import DrawContext, Panel


class CurriculumPanel(Panel):
    """The whole schedule (from run_start), a marker at the current step, current weights and T."""

    view = "curriculum"

    DEFAULT_CSS = """
    CurriculumPanel {
        height: 12;
    }
    """

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
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
            legend.append(f"on_policy={fmt(cur.on_policy_at(step=min(step, total), total_steps=total))} ", style="bold magenta")
        for j, name in enumerate(names):
            w = weights.get(name)
            style = RUN_COLORS[j % len(RUN_COLORS)] if name in cur.active else "grey42"
            legend.append(f"{name}={fmt(w) if w is not None else 'off'} ", style=style)

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
