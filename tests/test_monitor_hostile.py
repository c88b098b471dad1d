"""Text from a metrics file or a run directory's name reaches the terminal as text: escape sequences (OSC
window titles, OSC 52 clipboard writes, OSC 8 links, CSI screen clears), C1 controls, bidi overrides and
markup in alert codes and messages, component names and run names are shown escaped in the TUI (80x24 and
wide), `--once`, `--json`, the CSV and the SVG, and none of them crashes the app."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time

import pytest

from dsdistill.schema import METRICS_FILE, AlertRecord, TrainRecord
from dsmonitor.app import DsMonitor, main
from tests.streams import T0, healthy_records, write

HOSTILE = "\x1b]0;pwned\x07\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1b]8;;https://evil.example\x07x\x9b31m\u202e[bold red]R[link=https:evil.example]y"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _records():
    recs = healthy_records(20)
    end = recs.pop()
    t = next(r for r in reversed(recs) if isinstance(r, TrainRecord))
    bad = t.model_copy(
        update={
            "step": 20,
            "losses": {**t.losses, f"c{HOSTILE}": 1.0},
            "weighted": {**t.weighted, f"c{HOSTILE}": 0.5},
            "metrics": {f"m{HOSTILE}": 2.0},  # a diagnostic's name gets a plot of its own
        }
    )
    recs.append(bad)
    recs.append(AlertRecord(step=20, time=T0 + 50, level="error", code=f"code{HOSTILE}", message=f"message {HOSTILE}"))
    recs.append(end.model_copy(update={"step": 21}))
    return recs


@pytest.fixture
def hostile_run(tmp_path):
    run = tmp_path / f"run{HOSTILE.replace('/', '_')}"
    write(run / METRICS_FILE, _records())
    return run


def _assert_clean(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"{ch!r} reached the output"


@pytest.mark.parametrize("flag", ["--once", "--json"])
def test_once_and_json_print_escapes_not_controls(hostile_run, flag):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main([str(hostile_run), flag])
    text = out.getvalue()
    _assert_clean(text)
    if flag == "--json":
        text = json.dumps(json.loads(text))  # what a consumer reads back is clean too
        _assert_clean(json.loads(text)[0]["alerts"][-1]["message"])
    assert "\\x1b]0;pwned" in (text if flag == "--once" else out.getvalue().replace("\\\\", "\\"))


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
def test_the_tui_shows_hostile_text_as_text_and_exports_it_clean(hostile_run, tmp_path, size):
    out = tmp_path / "exports"
    out.mkdir()
    app = DsMonitor([str(hostile_run)], poll_interval=0.02, refresh_interval=0.05, export_dir=str(out))
    seen: dict[str, str] = {}

    async def scenario():
        async with app.run_test(size=size) as pilot:
            start = time.monotonic()
            while app.runs[0].end is None and time.monotonic() - start < 60:
                await pilot.pause(0.05)
            await pilot.pause(0.3)
            seen["screen"] = app.screen_text()
            await pilot.press("v")  # the alerts alone
            await pilot.pause(0.2)
            seen["alerts"] = app.screen_text()
            await pilot.press("v")
            await pilot.press("e")
            while app.last_export is None and time.monotonic() - start < 60:
                await pilot.pause(0.05)
            seen["svg"] = app.last_export.read_text()
            await pilot.press("E")
            await pilot.pause(0.3)
            seen["csv"] = "".join(p.read_text() for p in out.glob("*.csv"))
            await pilot.press("j")  # the raw records
            await pilot.pause(0.3)
            seen["records"] = app.screen_text()

    asyncio.run(scenario())
    assert app.runs[0].end is not None
    for text in seen.values():
        _assert_clean(text)
    assert "[bold red]R" in seen["alerts"].replace("\n", "")  # markup shown as the text it is
    assert seen["csv"]
