"""Alerts of every run, most severe first."""

from __future__ import annotations

from rich.text import Text

from .base import DrawContext, Panel


class AlertsPanel(Panel):
    """Alerts of every run, most severe first."""

    view = "alerts"

    DEFAULT_CSS = """
    AlertsPanel {
        height: auto;
        max-height: 12;
    }
    """

    STYLES = {"error": "bold red", "warning": "yellow", "info": "grey62"}
    MAX_LINES = 10
    """Lines shown beside the other panels; shown alone (`v`), the panel takes the whole height."""

    def draw(self, ctx: DrawContext) -> None:
        alerts, multi = ctx.alerts, len(ctx.runs) > 1
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
