"""A toy dashboard panel, to show what adding one takes: this file, plus its line in `PANELS`."""

from __future__ import annotations

from rich.text import Text

from dsmonitor.panels import DrawContext, Panel


class RecordsPanel(Panel):
    """How many records each run has, and how many of them were train records."""

    view = "records"

    def draw(self, ctx: DrawContext) -> None:
        self.border_title = "records"
        lines = [f"{run.name}: {run.records} records, {len(run.train_x.step)} train" for run in ctx.runs]
        self.paint(lambda width, height: Text("\n".join(lines)))
