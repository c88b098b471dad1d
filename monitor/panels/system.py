"""Every rank's memory and GPU use, from the trainer's newest system record."""

from __future__ import annotations

from rich.text import Text

from ..fmt import fit_table, fmt
from ..state import RunState
from .base import DrawContext, Panel


class SystemPanel(Panel):
    """Every rank's memory and GPU use, and the host's memory, from the trainer's newest system record."""

    view = "system"

    def wanted(self, runs: list[RunState]) -> bool:
        return any(r.system is not None for r in runs)  # appears with the first system record

    DEFAULT_CSS = """
    SystemPanel {
        height: auto;
        max-height: 14;
    }
    """

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
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
                [str(u.rank), fmt(u.gpu_peak_gib), fmt(u.gpu_mem_gib), fmt(u.gpu_mem_total_gib), fmt(u.gpu_util)]
                + [fmt(u.peak_rss_gib), fmt(u.rss_gib)]
                for u in rec.ranks
            ]
            optional = [6, 5, 4, 3, 2]
        else:
            header = ["rank", "RSS peak GiB", "RSS GiB"]
            rows = [[str(u.rank), fmt(u.peak_rss_gib), fmt(u.rss_gib)] for u in rec.ranks]
            optional = [2]
        lines = []
        if rec.host_mem_total_gib:
            lines.append(f"host memory {fmt(rec.host_mem_used_gib)} of {fmt(rec.host_mem_total_gib)} GiB")
        if rec.estimate_gib is not None:
            lines.append(f"check's estimate {fmt(rec.estimate_gib)} GiB per rank (activations excluded)")

        def painter(width: int, height: int):
            table = fit_table(header, rows, width, optional=optional)
            return Text("\n").join([*(Text(line, style="bold") for line in lines), table])

        self.paint(painter)
