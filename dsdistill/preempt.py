"""Stopping a run the way terminals, launchers and schedulers do: one preemption, however delivered.

A single preemption reaches a rank several times: the terminal or scheduler signals the whole process
group (or every process of the job), and the launcher forwards the same stop to its children, sometimes
much later (DeepSpeed's launcher SIGTERMs its ranks one after another, up to 30 s apart). `StopRequest`
takes every SIGTERM and SIGHUP after the first stop signal as the same request, however late: that is how
launchers and schedulers repeat themselves (their next word is SIGKILL). Only a person insists: a second
Ctrl-C (SIGINT) more than `grace_s` after the first exits at once without saving. Once the run has saved
and is on its way out, further signals are ignored (a launcher that sees one rank exit signals the rest).

`LauncherWatch` covers the launcher dying without a word (a SIGTERM or SIGKILL to the `deepspeed` runner
or the per-node launcher alone): the ranks would otherwise train on as orphans. When a watched launcher
process is gone, the watch files the same stop request, so the run finishes its step, saves and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

EXIT_PREEMPTED = 75
"""Exit status after a stop request: the step in flight finished and a checkpoint was saved (resumable)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

LAUNCHER_MARKS = (
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "bin/deepspeed",
    "dsdistill.launcher",
    "torch.distributed.run",
    "bin/torchrun",
)
"""Command-line fragments of the processes that start ranks (their death orphans the ranks)."""


class StopRequest:
    """First stop signal: finish the current micro-batch, save, stop. Repeated SIGTERM/SIGHUP, and a
    SIGINT within `grace_s`, are the same preemption delivered again; a SIGINT after that exits at once
    (128 + signal)."""

    def __init__(self, grace_s: float = 5.0, *, log=None):
        self.grace_s = grace_s
        self.signal: Optional[str] = None
        """Name of what asked to stop (a signal name, or 'launcher exited'); None while running."""
        self.first_at: Optional[float] = None
        self.duplicates = 0
        self.exiting = False
        self._previous: dict = {}
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, what: str) -> None:
        """File a stop request that is not a signal (the launcher is gone); never escalates."""
        if self.signal is None:
            self.signal, self.first_at = what, time.monotonic()
            self._log(f"dsdistill: {what}: finishing this optimizer step, then saving a checkpoint")

    def leaving(self) -> None:
        """The run has saved and is exiting: later signals have nothing left to interrupt."""
        self.exiting = True

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.exiting:
            return
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.first_at = name, now
            self._log(
                f"dsdistill: {name} received: finishing this micro-batch, then saving a checkpoint "
                f"(press Ctrl-C again after {self.grace_s:g}s to exit at once without saving)"
            )
            return
        if signum != signal.SIGINT or now - (self.first_at or now) < self.grace_s:
            self.duplicates += 1  # the same preemption, delivered by the group and by the launcher
            return
        self._log(f"dsdistill: second {name}: exiting now without saving")
        os._exit(128 + signum)


def _launcher_ancestors(max_depth: int = 4) -> list:
    """psutil handles of this process's launcher ancestors (nearest first), up to the first that is not one."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return []
    found = []
    try:
        proc = psutil.Process(os.getpid()).parent()
        for _ in range(max_depth):
            if proc is None or proc.pid <= 1:
                break
            cmd = " ".join(proc.cmdline())
            if not any(mark in cmd for mark in LAUNCHER_MARKS):
                break
            found.append(proc)
            proc = proc.parent()
    except (psutil.Error, OSError):
        pass
    return found


class LauncherWatch:
    """A daemon thread that files a stop request when a launcher process above this rank disappears."""

    def __init__(self, stop: StopRequest, *, interval_s: float = 1.0):
        self.stop = stop
        self.interval_s = interval_s
        self.watched = _launcher_ancestors()
        self._done = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "LauncherWatch":
        if self.watched:
            self._thread = threading.Thread(target=self._run, name="dsdistill-launcher-watch", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._done.set()

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            for proc in self.watched:
                try:
                    alive = proc.is_running() and proc.status() != "zombie"
                except Exception:
                    alive = False
                if not alive:
                    self.stop.request(f"the launcher (pid {proc.pid}) exited")
                    return
