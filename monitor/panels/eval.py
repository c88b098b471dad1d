"""Train vs eval objective at the same steps; eval perplexity vs the teacher's."""

from __future__ import annotations

import math

from rich.text import Text

from ..fmt import fmt
from ..plot import HLine, render_plot
from ..state import RunState
from ..view import RUN_COLORS, ViewOptions, ordered_runs, series_trace, view_bounds
from .base import DrawContext, Panel


class EvalPanel(Panel):
    """Train objective vs eval objective at the same steps; eval perplexity vs the teacher's."""

    view = "eval"

    DEFAULT_CSS = """
    EvalPanel {
        height: 16;
    }
    """

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
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
                if e.teacher_ppls and exact:  # several teachers: a reference line each
                    hlines += [HLine(p, "grey62", f"teacher {name}") for name, p in e.teacher_ppls.items()]
                elif e.teacher_ppl is not None and exact:
                    hlines.append(HLine(e.teacher_ppl, "grey62", "teacher"))
                stop = (
                    f"best {e.early_stop_metric} {fmt(e.best)}, {e.bad_evals} eval(s) without improvement"
                    if e.best is not None
                    else ""
                )
                lines.append(
                    f"{run.name}: eval @ {e.step} obj {fmt(e.objective)} ppl {fmt(e.ppl)} ({_teacher(e)}) {stop}"
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


def _probe(e) -> str:
    """An on-policy run's eval: what its own samples look like to the teacher (`g` shows them)."""
    p = e.on_policy
    if not p:
        return ""
    return f" | own samples: len {fmt(p.get('mean_length'))} stop {100 * (p.get('stop_rate') or 0):.0f}% rKL {fmt(p.get('reverse_kl'))}"


def _teacher(e) -> str:
    """`teacher 6.3`, `teachers llama 6.1, qwen 7.0`, or an estimate said as one."""
    if e.teacher_ppls:
        return "teachers " + ", ".join(f"{name} {fmt(p)}" for name, p in e.teacher_ppls.items())
    share = e.teacher_ppl_exact_share
    if share is None or share >= 0.99:
        return f"teacher {fmt(e.teacher_ppl)}"
    return f"teacher ~{fmt(e.teacher_ppl)}, estimated for {1 - share:.0%} of tokens"
