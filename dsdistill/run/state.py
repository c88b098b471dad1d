"""Where a run stands, and how it is saved and restored: the data position, the tokens seen, early
stopping's patience and the layout that fixes what a saved position means."""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

from dsdistill import checkpoint
from dsdistill.data import data_fingerprint
from dsdistill.dist import agree, gather_objects
from dsdistill.ds_config import zero_stage
from dsdistill.trainer import EarlyStopping


class RunState:
    def __init__(self, plan, data, student):
        self.plan, self.data, self.student = plan, data, student
        self.tokens_seen = 0
        self.abandoned: Optional[dict[str, Any]] = None
        """The position before a window a stop abandoned (what the final save records), else None."""
        self.last_save = time.monotonic()
        self.position: Optional[dict[str, Any]] = None
        """The data position after the last window handed to a step (the stream itself may be drawn ahead)."""

    def layout(self) -> dict[str, Any]:
        """The layout a checkpoint is written with: a resume with another ZeRO stage, precision, set of aux modules
        or (packed data) world size is carried into the new layout; with anything else changed, what fixes the
        meaning of the saved data position, it is refused."""
        c = self.plan.cfg
        return {
            "train.micro_batch_size": c.train.micro_batch_size,
            "train.seq_len": c.train.seq_len,
            "train.seed": c.train.seed,
            "world_size": self.plan.world,
            "data": data_fingerprint(self.data.splits, c),
            "zero_stage": zero_stage(self.plan.ds_student),
            "precision": self.plan.precision,
            "aux_modules": sorted(self.student.module.aux.keys()),
        }

    def mark(self, stream: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Where the run stands before a window (`stream`: the data position before it, default the stream's
        own): what a save records if a stop abandons the window."""
        at = self.data.stream.state() if stream is None else stream
        return {"stream": at, "rng": checkpoint.rng_state(), "tokens_seen": self.tokens_seen}

    def resume(self, early: EarlyStopping) -> Optional[dict[str, Any]]:
        """Load the latest (or the named) checkpoint if `checkpoint.resume` is auto; None: a fresh start."""
        plan, engine = self.plan, self.student
        self.tokens_seen = 0
        if plan.cfg.checkpoint.resume != "auto":
            return None
        resumed = agree(
            lambda: checkpoint.load(
                engine,
                plan.run_dir,
                tag=plan.cfg.checkpoint.resume_tag,
                expect=self.layout(),
                movable_world=hasattr(self.data.stream, "reshard"),
            ),
            what="resuming",
        )
        if resumed is not None:
            self.data.stream.restore(self._own_position(resumed))
            early.restore(resumed["early_stopping"])
            self.tokens_seen = int(resumed["tokens_seen"])
        return resumed

    def _own_position(self, resumed: dict[str, Any]) -> dict[str, Any]:
        """This rank's data position: its own entry where the checkpoint has one per rank (ZeRO-1/2 save the
        loop state from rank 0 only), re-sharded from the saved world where that differs."""
        streams = resumed.get("streams")
        saved_world = int((resumed.get("layout") or {}).get("world_size", self.plan.world))
        if saved_world != self.plan.world:
            return self.data.stream.reshard(resumed["stream"], saved_world)
        if isinstance(streams, list) and len(streams) == self.plan.world:
            return streams[self.plan.rank]
        return resumed["stream"]

    def save_due(self) -> bool:
        """Rank 0's clock: a time-based checkpoint is due (the step's reduction makes every rank agree)."""
        every = self.plan.cfg.checkpoint.every_minutes
        return bool(every) and self.plan.rank == 0 and time.monotonic() - self.last_save >= 60 * every

    def save(self, early: EarlyStopping, mark_best: bool = False) -> None:
        at = self.abandoned  # an abandoned window: the state before it
        stream = at["stream"] if at else (self.position if self.position is not None else self.data.stream.state())
        state = {
            "stream": stream,
            "streams": gather_objects(stream),
            "early_stopping": early.state(),
            "tokens_seen": at["tokens_seen"] if at else self.tokens_seen,
            "layout": self.layout(),
        }
        checkpoint.save(
            self.student,
            self.plan.run_dir,
            state=state,
            keep_last=self.plan.cfg.checkpoint.keep_last,
            mark_best=mark_best,
            rng=at["rng"] if at else None,
        )
        self.last_save = time.monotonic()

    def latest(self) -> str:
        """The latest checkpoint, in words (what a non-finite stop tells the user to resume from)."""
        last = checkpoint.latest_tag(self.plan.run_dir)
        return f"Latest checkpoint: {checkpoint.checkpoint_dir(self.plan.run_dir) / last if last else 'none'}"


class Windows:
    """Accumulation windows from the training stream, each with the stream's position before and after it;
    `peek` draws the next one early (a remote teacher fetches it meanwhile) without moving what a save records."""

    def __init__(self, stream, batches: Iterator[dict[str, Any]], size: int):
        self.stream, self.batches, self.size = stream, batches, size
        self._next: Optional[tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]] = None

    def _draw(self) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        before = self.stream.state()
        window = [next(self.batches) for _ in range(self.size)]
        return window, before, self.stream.state()

    def next(self) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        """(window, position before it, position after it)."""
        drawn, self._next = self._next or self._draw(), None
        return drawn

    def peek(self) -> list[dict[str, Any]]:
        if self._next is None:
            self._next = self._draw()
        return self._next[0]
