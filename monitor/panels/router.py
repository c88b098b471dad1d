"""The router's gate usage per teacher layer."""

from __future__ import annotations

import math

from rich.text import Text

from .base import DrawContext, Panel


class RouterPanel(Panel):
    """Teacher-layer router gate usage (when the run has a router)."""

    view = "router"

    DEFAULT_CSS = """
    RouterPanel {
        height: auto;
        max-height: 14;
    }
    """

    def draw(self, ctx: DrawContext) -> None:
        runs, opts = ctx.runs, ctx.opts
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
