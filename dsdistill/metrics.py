"""Rank 0's append-only writer of `metrics.jsonl` (records from `dsdistill.schema`)."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from dsdistill.schema import METRICS_FILE, dumps


class MetricsWriter:
    """Appends one record per line and flushes at once; a no-op on ranks other than 0.

    The file is opened in append mode: records from earlier runs in the same directory are never lost."""

    def __init__(self, run_dir: str | Path, *, enabled: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self._fh = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: BaseModel) -> None:
        if self._fh is None:
            return
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
