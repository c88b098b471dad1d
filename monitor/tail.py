"""Following a growing metrics.jsonl by byte offset, safe on shared filesystems.

Polling only (inotify misses writes made by other NFS clients). Each `poll()` reads whatever was appended
since the last one, in bounded chunks, keeps a partial last line until its newline arrives, skips and
counts lines that are not valid records, and starts over from the beginning when the file was truncated,
replaced (rotation: a new inode) or deleted and recreated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dsdistill.schema import KINDS as KNOWN_KINDS
from dsdistill.schema import METRICS_FILE, parse_line

from .textsafe import clean, clean_obj, needs_cleaning

CHUNK = 1 << 20


def metrics_path(target: str | Path) -> Path:
    """A run directory or a metrics file -> the metrics file. Whatever is not a file (a directory, or a
    run directory that does not exist yet) is taken as a run directory, whatever its name looks like."""
    p = Path(target)
    return p if p.is_file() else p / METRICS_FILE


def run_name(target: str | Path) -> str:
    """The name a run is shown under: its directory's name (`runs/qwen2.5-lr3e-4` -> `qwen2.5-lr3e-4`)."""
    return clean(metrics_path(target).parent.name or str(target))


HEAD_BYTES = 256
"""Bytes at the start of the file remembered to notice it was replaced by a file of the same inode and a
size at least as large (truncated and refilled, or deleted and recreated within one poll)."""
MARK_BYTES, MARK_SAMPLES = 128, 8
"""Beyond the head, samples of MARK_BYTES at MARK_SAMPLES points of the region read (its end included)."""


def read_record(raw: bytes):
    """A record from one line, with every string in it cleaned of terminal controls (see textsafe)."""
    rec = parse_line(raw)
    if rec is not None and needs_cleaning(raw):
        rec = type(rec).model_validate(clean_obj(rec.model_dump()))
    return rec


def _kind_of(raw: bytes) -> Optional[str]:
    """The `kind` of a JSON object line, or None when the line is not one."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return kind if isinstance(kind, str) else None


@dataclass
class PollResult:
    """What one poll found."""

    records: list = field(default_factory=list)
    corrupt: int = 0
    """Lines that were not valid records."""
    unknown: int = 0
    """Well-formed records of a kind this version does not know (a newer trainer's): skipped, not corrupt."""
    restarted: Optional[str] = None
    """'truncated', 'rotated' (a new inode) or 'replaced' (new contents under the same inode) when re-read
    from the start."""
    missing: bool = False
    """The file does not exist (yet)."""


class Tailer:
    """Incremental reader of one metrics file."""

    def __init__(self, path: str | Path, *, chunk: int = CHUNK):
        self.path = metrics_path(path)
        self.chunk = chunk
        self.offset = 0
        self.inode: Optional[tuple[int, int]] = None
        self.partial = b""
        self.head = b""
        """The first bytes as last read (see HEAD_BYTES)."""
        self.marks: list[tuple[int, bytes]] = []
        """(offset, bytes) samples of the region read so far (see `_same_head`)."""
        self.corrupt_total = 0
        self.unknown_total = 0
        self.lines_total = 0

    def _reset(self) -> None:
        self.offset = 0
        self.partial = b""
        self.head = b""
        self.marks = []

    def _same_head(self) -> bool:
        """Whether the file still holds the bytes read from it before: its start, the stretch just before
        where reading stopped, and evenly spaced samples in between (a few small reads, however large the
        file), so a file rewritten in place under the same inode is noticed even when it starts alike."""
        if not self.head:
            return True
        try:
            with open(self.path, "rb") as fh:
                if fh.read(len(self.head)) != self.head:
                    return False
                for at, data in self.marks:
                    fh.seek(at)
                    if fh.read(len(data)) != data:
                        return False
                return True
        except OSError:
            return False

    def _mark(self, fh) -> None:
        """Remember the samples `_same_head` compares (after a read; `fh` is open on the file)."""
        end = self.offset
        spots = {max(0, end - MARK_BYTES)} | {end * i // MARK_SAMPLES for i in range(1, MARK_SAMPLES)}
        marks = []
        for at in sorted(spots):
            if at < HEAD_BYTES and end > HEAD_BYTES:
                continue  # the head covers it
            fh.seek(at)
            marks.append((at, fh.read(min(MARK_BYTES, end - at))))
        self.marks = marks

    def poll(self, *, max_bytes: Optional[int] = None) -> PollResult:
        """Read what is new (at most `max_bytes`, whole chunks); never raises for a missing file."""
        out = PollResult()
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            out.missing = True
            if self.inode is not None:
                self.inode = None
                self._reset()
            return out
        ident = (st.st_dev, st.st_ino)
        if self.inode is not None and ident != self.inode:
            out.restarted = "rotated"
            self._reset()
        elif st.st_size < self.offset:
            out.restarted = "truncated"
            self._reset()
        elif not self._same_head():
            out.restarted = "replaced"
            self._reset()
        self.inode = ident
        if st.st_size == self.offset:
            return out
        budget = max_bytes if max_bytes is not None else st.st_size - self.offset
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while budget > 0:
                data = fh.read(min(self.chunk, budget))
                if not data:
                    break
                if self.offset < HEAD_BYTES:
                    self.head = (self.head + data)[:HEAD_BYTES]
                self.offset += len(data)
                budget -= len(data)
                self._consume(data, out)
            self._mark(fh)
        return out

    def peek_latest(self, *, tail_bytes: int = 2 << 20) -> PollResult:
        """The file's first record (the run_start a curriculum and the axes need) and the records in its last
        `tail_bytes`, read without moving the offset: what a large file's latest state is drawn from while
        its history is read (like toolong opening a large log at its end)."""
        out = PollResult()
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                head = fh.readline(1 << 20)
                fh.seek(max(0, size - tail_bytes))
                tail = fh.read(tail_bytes)
        except OSError:
            out.missing = True
            return out
        lines = tail.split(b"\n")
        if size > tail_bytes:
            lines = lines[1:]  # the first line of the window is cut
        first = read_record(head) if head.endswith(b"\n") else None
        if first is not None and size > tail_bytes:
            out.records.append(first)
        for raw in lines[:-1] if not tail.endswith(b"\n") else lines:
            rec = read_record(raw) if raw.strip() else None
            if rec is not None:
                out.records.append(rec)
        return out

    def tail_lines(self, n: int, *, max_bytes: int = 4 << 20) -> list[bytes]:
        """The newest `n` complete lines of the file (for the raw-record view), read from its end."""
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                fh.seek(max(0, size - max_bytes))
                data = fh.read(max_bytes)
        except OSError:
            return []
        lines = data.split(b"\n")
        if size > max_bytes:
            lines = lines[1:]
        return [line for line in lines if line.strip()][-n:]

    def _consume(self, data: bytes, out: PollResult) -> None:
        buf = self.partial + data
        lines = buf.split(b"\n")
        self.partial = lines.pop()  # b"" when data ended with a newline
        for raw in lines:
            if not raw.strip():
                continue
            self.lines_total += 1
            rec = read_record(raw)
            if rec is not None:
                out.records.append(rec)
            elif (kind := _kind_of(raw)) is not None and kind not in KNOWN_KINDS:
                out.unknown += 1
                self.unknown_total += 1
            else:
                out.corrupt += 1
                self.corrupt_total += 1
