"""Last, min, delta and trend per metric for the baseline run, with the other runs beside it."""

from __future__ import annotations

from ..fmt import eta_text, fit_table, fmt, sparkline
from ..textsafe import label
from .base import DrawContext, Panel


class StatsPanel(Panel):
    """Last, min, delta and sparkline per metric, plus LR, throughput, progress, ETA, memory."""

    view = "stats"

    DEFAULT_CSS = """
    StatsPanel {
        height: auto;
        max-height: 24;
    }
    """

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
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
            ("teacher wait", run.train, "teacher_wait"),  # a remote teacher: share of the step
            ("mem GiB", run.train, "mem_gib"),
            ("eval obj", run.eval, "objective"),
            ("eval ppl", run.eval, "ppl"),
            ("teacher ppl", run.eval, "teacher_ppl"),
            *((f"teacher {k[12:]}", run.eval, k) for k in run.eval if k.startswith("teacher_ppl/")),  # its ppl
        ]
        for name, table_src, key in keys:
            s = table_src.get(key)
            if s is None or not len(s):
                continue
            delta = s.value[-1] - s.value[-2] if len(s) > 1 else None
            row = [name, fmt(s.last), fmt(s.finite_min()), fmt(delta), sparkline(s.value)]
            for o in others:
                src = o.train if table_src is run.train else o.eval
                os_ = src.get(key)
                row.append(fmt(os_.last if os_ is not None else None))
            rows.append(row)
        prog = run.progress()
        self.border_title = (
            f"{label(run.name)}: step {run.current_step}/{run.total_steps or '?'}"
            f" {'' if prog is None else f'{100 * prog:.1f}%'}  ETA {eta_text(run)}"
        )
        self.paint(lambda w, h: fit_table(header, rows, w))
