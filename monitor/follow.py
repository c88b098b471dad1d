"""The tail thread: reads every run's metrics file and hands the UI whole states or batches of records. It
never touches a widget; the UI learns of its work through messages (messages.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from textual.message import Message

from .messages import Inbox, Loaded, Preview, RecordsArrived
from .series_math import BlockMinMax
from .state import RunState
from .tail import Tailer, run_name
from .view import LONG

MAX_BYTES_PER_POLL = 1 << 20
FIRST_FRAMES_S = 0.3


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class Follower:
    def __init__(
        self,
        targets: list[str],
        post: Callable[[Message], object],
        *,
        poll_interval: float,
        preview_bytes: int,
        smoothing: Callable[[], float],
    ):
        self.tailers = [Tailer(t) for t in targets]
        self.names = [run_name(t) for t in targets]
        self.post = post
        self.poll_interval = poll_interval
        self.preview_bytes = preview_bytes
        """Files larger than this are drawn from their first and latest records before their history is read."""
        self.smoothing = smoothing
        self.inbox = Inbox(len(targets))
        self.stop = threading.Event()
        self.loaded_bytes = [0] * len(targets)
        self.catching_up = True
        """True while a backlog is still being read: intermediate full redraws are skipped."""
        self.missing = [False] * len(targets)
        """What the thread last saw of each file (the UI's copy follows the batches it applies)."""

    def loaded_share(self) -> float:
        total = sum(file_size(t.path) for t in self.tailers) or 1
        return sum(self.loaded_bytes) / total

    def run(self) -> None:
        # 0. what drawing the curriculum needs is imported here, not on the UI thread at the first draw
        import dsdistill.curriculum  # noqa: F401

        # 1. a large file's latest state first, so the screen shows where the run is within moments
        previews = 0
        for i, tailer in enumerate(self.tailers):
            if file_size(tailer.path) > self.preview_bytes:
                previews += 1
                preview = RunState(self.names[i])  # built here too: the UI thread only swaps it in
                for rec in tailer.peek_latest(tail_bytes=min(2 << 20, self.preview_bytes // 4)).records:
                    preview.add(rec)
                self.post(Preview(i, preview))
        # 2. every history read and ingested here, off the UI thread (keys stay responsive); the UI swaps
        #    each run in whole. The first frames are drawn before the parsing starts to compete for the
        #    interpreter, and the parsing pauses between chunks so a key is never queued for long.
        if previews:
            self.stop.wait(FIRST_FRAMES_S)
        for i in range(len(self.tailers)):
            state, missing = self._history(i)
            self.post(Loaded(i, state, missing))
        self.catching_up = False
        # 3. follow: small batches, coalesced into one message while the UI is busy
        while not self.stop.is_set():
            more = False
            for i, tailer in enumerate(self.tailers):
                res = tailer.poll(max_bytes=MAX_BYTES_PER_POLL)
                if res.records or res.corrupt or res.restarted or res.missing != self.missing[i]:
                    self.missing[i] = res.missing
                    self.inbox.put(i, res)
                    self.post(RecordsArrived())
                more = more or tailer.offset < file_size(tailer.path)
            self.catching_up = more
            if not more:
                self.stop.wait(self.poll_interval)

    def _history(self, i: int) -> tuple[RunState, bool]:
        tailer, state = self.tailers[i], RunState(self.names[i])
        res = None
        while not self.stop.is_set():
            res = tailer.poll(max_bytes=MAX_BYTES_PER_POLL)
            if res.restarted:
                state = RunState(state.name)
            # no GC pause here: the history is held in arrays, not in objects the GC would rescan, and a
            # pause as long as the load would let the UI's cyclic garbage pile up (GBs on a 1M-record file)
            for rec in res.records:
                state.add(rec)
            state.corrupt += res.corrupt
            state.unknown += res.unknown
            self.loaded_bytes[i] = tailer.offset
            if res.missing or tailer.offset >= file_size(tailer.path):
                break
            time.sleep(0.002)
        smoothing = self.smoothing()
        if smoothing > 0:  # smooth the history here too: the first draw then has nothing to catch up
            for key, series in list(state.train.items()):
                if key.startswith(("raw/", "weighted/")) or key == "objective":  # what the plots smooth
                    smooth = series.smoothed(smoothing)
                    if len(series) > LONG:  # and the block extremes a whole-history plot starts from
                        series.blocks.setdefault(None, BlockMinMax()).candidates(series.value)
                        series.blocks.setdefault(smoothing, BlockMinMax()).candidates(smooth)
        missing = bool(res is not None and res.missing)
        self.missing[i] = missing
        return state, missing
