"""Watching a real run from a test: its records, and waiting until it has trained a few steps."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from dsdistill.schema import METRICS_FILE, parse_line


def records(run_dir) -> list:
    return [parse_line(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines()]


def wait_for_train_records(
    run_dir: Path, n: int, proc: subprocess.Popen, *, timeout: float = 120, output: Optional[Callable[[], str]] = None
) -> None:
    """Return once `n` train records are in the run's metrics; fail with the run's output if it ended."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        f = Path(run_dir) / METRICS_FILE
        if f.exists() and sum('"kind":"train"' in line for line in f.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            said = output() if output else (proc.stderr.read() if proc.stderr else "")
            raise AssertionError(f"run ended early ({proc.returncode}): {said[-3000:]}")
        time.sleep(0.1)
    raise AssertionError("no train records in time")
