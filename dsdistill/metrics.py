"""Rank 0's append-only writer of `metrics.jsonl` (records from `dsdistill.schema`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dsdistill.errors import DistillError
from dsdistill.rundir import ensure_dir, open_append
from dsdistill.schema import METRICS_FILE, dumps


class MetricsError(DistillError):
    """The metrics stream cannot be written."""


class MetricsWriter:
    """Appends one record per line and flushes at once; a no-op on ranks other than 0.

    The file is opened in append mode on the first record: records from earlier runs in the same
    directory are never lost, and a run that fails before its first record leaves no empty file."""

    def __init__(self, run_dir: str | Path, *, enabled: bool):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        self.opened = False
        """Whether this run has written a record (so a failure owes the stream a run_end)."""
        self._fh: Any = None

    def write(self, record: BaseModel) -> None:
        if not self.enabled:
            return
        try:
            if self._fh is None:
                ensure_dir(self.path.parent)
                self._fh = open_append(self.path)
            self._fh.write(dumps(record) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as e:
            raise MetricsError(
                f"output.run_dir: cannot write '{self.path}' ({e.strerror or e}); records written before are kept"
            ) from None
        self.opened = True

    def close(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:
                pass
            self._fh = None
