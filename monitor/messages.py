"""Messages between the tail thread and the UI (the tail thread never touches a widget)."""

from __future__ import annotations

import threading

from textual.message import Message

from .state import RunState
from .tail import PollResult


class Inbox:
    """Batches the tail thread read, per run, until the UI takes them: the thread appends, the UI drains
    (under a lock), so any number of batches cost the UI one wake-up."""

    def __init__(self, runs: int):
        self._lock = threading.Lock()
        self._batches: list[list[PollResult]] = [[] for _ in range(runs)]

    def put(self, index: int, result: PollResult) -> None:
        with self._lock:
            self._batches[index].append(result)

    def take(self) -> list[tuple[int, PollResult]]:
        with self._lock:
            out = [(i, r) for i, batch in enumerate(self._batches) for r in batch]
            self._batches = [[] for _ in self._batches]
        return out

    def pending(self) -> int:
        """Records waiting (what a paused screen counts as new)."""
        with self._lock:
            return sum(len(r.records) for batch in self._batches for r in batch)


class RecordsArrived(Message):
    """The inbox has batches. Coalesced: a newer one replaces one still queued, since the UI takes every
    batch the inbox holds when it handles one."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, RecordsArrived)


class Preview(Message):
    """A large file's state from its first and latest records, read before its history (Tailer.peek_latest)."""

    def __init__(self, index: int, state: RunState):
        super().__init__()
        self.index = index
        self.state = state


class Loaded(Message):
    """A run's whole history, ingested by the tail thread (off the UI thread)."""

    def __init__(self, index: int, state: RunState, missing: bool):
        super().__init__()
        self.index = index
        self.state = state
        self.missing = missing


class ZoomRequest(Message):
    """A plot asks the app to zoom the shared x range by `factor` (the wheel over it)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
