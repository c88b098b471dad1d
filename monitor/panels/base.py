"""The panel base and what every panel draws from. A panel is one module in this package and one entry
in `PANELS` (panels/__init__.py); the app composes, arranges and refreshes them from that list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from rich.text import Text
from textual.widget import Widget

from ..alerts import Alert
from ..state import RunState
from ..view import ViewOptions


@dataclass
class DrawContext:
    """One refresh's inputs, the same for every panel."""

    runs: list[RunState]
    opts: ViewOptions
    now: float
    """The clock (record times are compared with it)."""
    alerts: list[tuple[str, Alert]]
    """(run name, alert) of every run, most severe first."""


class Panel(Widget, can_focus=True):
    """A bordered, focusable panel (tab / shift+tab move between panels).

    `draw(...)` stores a painter; `render()` calls it with the panel's current content size, so a resize
    redraws at the new size without new data."""

    DEFAULT_CSS = """
    Panel {
        border: round $panel-lighten-2;
        padding: 0 1;
        height: auto;
    }
    Panel:focus {
        border: round $accent;
    }
    Panel.-alone {
        height: 1fr;
        max-height: 100%;
    }
    """

    view: ClassVar[str] = ""
    """Its name among the views `v` cycles through, and its widget id."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._painter = None
        self._cache: Optional[tuple[tuple[int, int], object]] = None
        self.expanded = False
        """Shown alone (a small terminal, or `v`): the panel may use the whole height."""

    def paint(self, painter) -> None:
        """Set what to draw: a callable (width, height) -> renderable."""
        self._painter = painter
        self._cache = None
        self.refresh(layout=True)

    def render(self):
        if self._painter is None:
            return Text("waiting for records", style="grey50")
        size = self.content_size
        key = (max(20, size.width), max(3, size.height))
        if self._cache is None or self._cache[0] != key:  # render is called more than once per frame
            self._cache = (key, self._painter(*key))
        return self._cache[1]

    def wanted(self, runs: list[RunState]) -> bool:
        """Whether it is shown at all (a panel with nothing to show for these runs stays hidden)."""
        return True

    def draw(self, ctx: DrawContext) -> None:
        raise NotImplementedError
