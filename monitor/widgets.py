"""The dashboard's chrome around the panels: the status line, the key bar, the views bar, the side
column, the filter box and the modal screens (help, search)."""

from __future__ import annotations

from typing import Optional

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Input, Static

from .fmt import duration
from .state import RunState
from .textsafe import label
from .view import ViewOptions


class StatusBar(Static):
    """FOLLOW/PAUSED, records per second, time since the last record, stalled warning, view settings."""

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        background: $boost;
        padding: 0 1;
    }
    """

    def draw(
        self, runs: list[RunState], missing: list[bool], opts: ViewOptions, stall_seconds: float, now: float, mode: str
    ) -> None:
        """One line: follow state, each run's liveness (by its records' own times) and the view settings.
        Parts that do not fit the width are left out whole, least important first; none is cut."""
        states, extra = [], []
        for i, run in enumerate(runs):
            since = run.since_last(now)
            state = (
                "no file yet"
                if missing[i]
                else "no records"
                if since is None
                else f"ended: {run.end.reason}"
                if run.end is not None
                else "STALLED"
                if since > run.stall_after(stall_seconds)
                else "live"
            )
            states.append((run.name, state, since))
            extra += _run_notes(run)
        o = opts
        extra.insert(
            0,
            f"x:{o.x_axis} smooth:{o.smoothing:g} log-y:{'on' if o.logy else 'off'} "
            f"{'weighted' if o.weighted else 'raw'} window:{o.window or 'all'}"
            + (f" filter:{o.filter}" if o.filter else "")
            + (f" zoom:{100 * o.zoom[0]:.0f}-{100 * o.zoom[1]:.0f}%" if o.zoom != (0.0, 1.0) else "")
            + (" outliers:ignored" if o.robust else "")
            + (f" crosshair:{o.cursor:g}" if o.cursor is not None else ""),
        )
        room = max(10, self.size.width - 2)
        parts = [mode, *run_states(states, room - len(mode) - 3)]
        for part in extra:
            if len(" | ".join([*parts, part])) <= room:
                parts.append(part)
        while len(" | ".join(parts)) > room and len(parts) > 1:
            parts.pop()
        self.update(label(" | ".join(parts)))  # run names and filters come from outside


def _run_notes(run: RunState) -> list[str]:
    """What the status line says of a run besides its state, if anything."""
    gap = run.record_interval()
    bits = [f"{run.name}: a record every {duration(gap)}" if gap is not None else f"{run.name}:"]
    if run.earlier_runs:
        bits.append(f"a fresh run replaced {run.earlier_runs} earlier run(s) in this file")
    if run.corrupt:
        bits.append(f"{run.corrupt} corrupt")
    if run.unknown:
        bits.append(f"{run.unknown} of unknown kinds skipped")
    return [" ".join(bits)] if len(bits) > 1 or gap is not None else []


class KeyBar(Widget):
    """The key bar: the shown bindings in their order, as many as the width holds (every key is in `?`
    help), so a narrow terminal never cuts one in half. A click runs the key's action."""

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        background: $panel;
    }
    """

    def __init__(self, bindings: list[Binding], **kw):
        super().__init__(**kw)
        self.bindings = [b for b in bindings if b.show]
        self._spans: list[tuple[int, int, str]] = []

    @property
    def items(self) -> list[tuple[str, str, str]]:
        """(key as Textual displays it, description, action) of each shown binding."""
        return [(self.app.get_key_display(b), b.description, b.action) for b in self.bindings]

    def fitted(self, width: int) -> list[tuple[str, str, str]]:
        """The items that fit in `width` columns, in order (the first, quit and help, always)."""
        out: list[tuple[str, str, str]] = []
        used = 0
        for key, desc, action in self.items:
            w = len(key) + len(desc) + 3
            if used + w > width and out:
                break
            out.append((key, desc, action))
            used += w
        return out

    def render(self) -> Text:
        text, self._spans = Text(no_wrap=True, overflow="crop"), []
        for key, desc, action in self.fitted(self.size.width):
            start = len(text)
            text.append(f" {key}", style="bold reverse")
            text.append(f" {desc} ")
            self._spans.append((start, len(text), action))
        return text

    async def on_click(self, event) -> None:
        for start, end, action in self._spans:
            if start <= event.x < end:
                await self.app.run_action(action)
                return


class ViewsBar(Static):
    """Small terminals: the views `v` cycles through, the current one highlighted, alerts counted."""

    DEFAULT_CSS = """
    ViewsBar {
        height: 1;
        padding: 0 1;
    }
    """

    def draw(self, shown: str, views: tuple[str, ...], alerts: list) -> None:
        if shown == "all":
            return
        n_alerts = sum(a.level != "info" for _, a in alerts)
        bar = Text("v ", style="bold")
        for name in views:
            text = f"{name} ({n_alerts})" if name == "alerts" and n_alerts else name
            bar.append(f" {text} ", style="reverse bold" if name == shown else ("bold red" if text != name else ""))
        self.update(bar)


class Side(VerticalScroll):
    """Curriculum, eval, stats, router and alerts."""

    DEFAULT_CSS = """
    Side {
        width: 2fr;
        height: 1fr;
    }
    """


class FilterInput(Input):
    """Glob filter for metric names (comma-separated); Enter applies, Escape cancels."""

    DEFAULT_CSS = """
    FilterInput {
        dock: bottom;
        display: none;
    }
    FilterInput.-shown {
        display: block;
    }
    """
    BINDINGS = [Binding("escape", "cancel", "cancel", show=False)]

    def __init__(self, **kw):
        super().__init__(**kw)
        self.disabled = True  # hidden and unfocusable until "/" opens it

    def open(self, value: str) -> None:
        self.value = value
        self.disabled = False
        self.add_class("-shown")
        self.focus()

    def close(self) -> None:
        self.remove_class("-shown")
        self.disabled = True
        self.app.set_focus(None)

    def action_cancel(self) -> None:
        self.close()


class SearchScreen(ModalScreen):
    """Lines of text (the resolved config, raw records) with a search box: only matching lines are shown."""

    DEFAULT_CSS = """
    SearchScreen {
        align: center middle;
    }
    SearchScreen > VerticalScroll {
        width: 90%;
        height: 85%;
        border: round $accent;
        background: $surface;
    }
    SearchScreen Input {
        width: 90%;
    }
    """
    BINDINGS = [Binding("escape", "dismiss", "close")]

    def __init__(self, title: str, lines: list[str]):
        super().__init__()
        self.title_text = title
        self.lines = lines

    def compose(self) -> ComposeResult:
        yield Input(placeholder="search (case-insensitive); Escape closes", id="search")
        with VerticalScroll() as scroll:
            scroll.border_title = label(self.title_text)
            yield Static(self._text(""), id="found")

    def _text(self, query: str) -> Text:
        q = query.lower()
        shown = [line for line in self.lines if q in line.lower()] if q else self.lines
        out = Text("\n".join(shown) if shown else f"nothing matches '{query}'")
        if q:
            out.highlight_words([query], style="reverse", case_sensitive=False)
        return out

    def on_input_changed(self, event: Input.Changed) -> None:
        self.query_one("#found", Static).update(self._text(event.value))

    def shown_text(self) -> str:
        return str(self.query_one("#found", Static).render())


class HelpScreen(ModalScreen):
    """Every key and what it does."""

    DEFAULT_CSS = """
    HelpScreen {
        align: center middle;
    }
    HelpScreen > VerticalScroll {
        width: 64;
        max-width: 100%;
        height: auto;
        max-height: 100%;
        border: round $accent;
        padding: 0 1;
        background: $surface;
    }
    """
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        t = Text("dsmonitor keys\n\n", style="bold")
        for key, desc in self.rows:
            t.append(f"{key:>12}  ", style="bold cyan")
            t.append(f"{desc}\n")
        t.append("\nEscape closes this screen; arrows and PgUp/PgDn scroll it.", style="grey62")
        # in a small terminal (80x24) the list is taller than the screen: it scrolls, nothing is cut
        with VerticalScroll():
            yield Static(t)


def run_states(states: list[tuple[str, str, Optional[float]]], room: int) -> list[str]:
    """Each run's state for the status line, every run shown: in full ("live, last record 3s ago"), else
    short ("live 3s"), else with names shortened to share the room."""

    def render(name: str, state: str, since: Optional[float], short: bool) -> str:
        if since is None:
            return f"{name}: {state}"
        return f"{name}: {state} {duration(since)}" if short else f"{name}: {state}, last record {duration(since)} ago"

    for short in (False, True):
        parts = [render(n, st, since, short) for n, st, since in states]
        if len(" | ".join(parts)) <= room:
            return parts
    fixed = len(" | ".join(render("", st, since, True) for _, st, since in states))
    per = max(4, (room - fixed) // max(1, len(states)))
    return [render(n if len(n) <= per else n[: per - 1] + "…", st, since, True) for n, st, since in states]
