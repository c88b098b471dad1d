"""What leaves the monitor: every series as CSV (`E`), the screen as SVG (`e`) or as plain text (what
snapshot tests compare). Written to --export-dir or the current directory, never into a run directory."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

from rich.console import Console

from .state import RunState


def write_csv(runs: list[RunState], fh) -> int:
    """Every train and eval series of every run as CSV rows: run, kind (train or eval), step, time_s, tokens,
    then one column per series (blank where a record had no such value). Returns the rows written."""
    import csv

    keys = sorted({k for run in runs for table in (run.train, run.eval) for k in table})
    w = csv.writer(fh)
    w.writerow(["run", "kind", "step", "time_s", "tokens", *keys])
    n = 0
    for run in runs:
        for kind, x, table in (("train", run.train_x, run.train), ("eval", run.eval_x, run.eval)):
            cols = {k: dict(zip(s.rows, s.value)) for k, s in table.items()}
            for row in range(len(x.step)):
                values = (repr(cols[k][row]) if k in cols and row in cols[k] else "" for k in keys)
                w.writerow([run.name, kind, x.step[row], f"{x.time[row]:.3f}", int(x.tokens[row]), *values])
                n += 1
    return n


def _console(app, **kw) -> Console:
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True, legacy_windows=False, **kw)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console


def screen_text(app) -> str:
    """The screen as plain text."""
    console = _console(app, color_system=None)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def export_name(runs: list[RunState], suffix: str) -> str:
    return f"dsmonitor-{'-'.join(r.name for r in runs)[:80]}-{time.strftime('%Y%m%d-%H%M%S')}.{suffix}"


def svg(app) -> str:
    """The screen as a self-contained SVG (no remote font)."""
    console = _console(app, force_terminal=True, color_system="truecolor")
    return re.sub(r',\s*url\("[^"]*"\)\s*format\("[^"]*"\)', "", console.export_svg(title="dsmonitor"))


def write_export(directory: Path, name: str, write) -> Path:
    """`write(fh)` into directory/name; OSError goes to the caller (who notifies)."""
    path = directory / name
    with open(path, "w", newline="", encoding="utf-8") as fh:
        write(fh)
    return path
