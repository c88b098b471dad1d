"""What the dashboard knows about one run, built incrementally from metrics records (no UI here)."""

from __future__ import annotations

import bisect
import math
from array import array
from collections import deque
from typing import Any, Optional

from dsdistill import registry
from dsdistill.schema import AlertRecord, EvalRecord, RunEnd, RunStart, SystemRecord, TrainRecord

X_AXES = ("step", "time", "tokens")
OBJECTIVE_MEMORY = 4096
EVAL_MEMORY = 1024
MAX_TIME_JUMP = 10 * 365 * 86400.0
"""A record time this far from the previous one is a broken clock or a corrupt value, not training time."""


class XTable:
    """x coordinates stored once per record: step, seconds since run start, tokens, restart segment."""

    def __init__(self):
        # compact columns (8 bytes a value, not a Python object each): a million records stay small
        self.step = array("q")
        self.time = array("d")
        self.tokens = array("d")
        self.segment = array("q")

    def add(self, step: int, t: float, tokens: int, segment: int) -> int:
        self.step.append(step)
        self.time.append(t)
        self.tokens.append(tokens)
        self.segment.append(segment)
        return len(self.step) - 1


class Series:
    """One metric over training: values and the rows of the shared `XTable` they belong to.

    `segment` numbers increase whenever the step goes backwards (a restart from an earlier checkpoint),
    so plots can break the line there instead of drawing back across the chart."""

    __slots__ = ("table", "_rows", "start", "value", "smoothers", "vmin", "blocks")

    def __init__(self, table: XTable):
        self.table = table
        self._rows: Optional[array] = None
        """Rows of the table, stored only once the series skipped one (most series have a value in every
        record from their first on: `start` and the length say which rows then)."""
        self.start = 0
        self.value = array("d")
        self.blocks: dict = {}
        """BlockMinMax of the raw values (key None) and of each smoothing weight, for downsampling."""
        self.smoothers: dict = {}
        self.vmin: Optional[float] = None

    def smoothed(self, weight: float) -> Any:
        """Debiased EMA of the values, kept up to date incrementally per weight."""
        from .series_math import IncrementalEMA

        ema = self.smoothers.get(weight)
        if ema is None:
            ema = self.smoothers[weight] = IncrementalEMA(weight)
        return ema.update(self.value)

    @property
    def rows(self):
        """The table rows of the values, in order (an array, or a range while the series has no gaps)."""
        if self._rows is not None:
            return self._rows
        return range(self.start, self.start + len(self.value))

    def add(self, row: int, value: float) -> None:
        n = len(self.value)
        if n == 0 and self._rows is None:
            self.start = row
        elif self._rows is None and row != self.start + n:
            self._rows = array("q", range(self.start, self.start + n))
        if self._rows is not None:
            self._rows.append(row)
        self.value.append(value)
        if (self.vmin is None or value < self.vmin) and math.isfinite(value):
            self.vmin = value

    def xs(self, axis: str) -> list[Any]:
        col = getattr(self.table, axis)
        return [col[i] for i in self.rows]

    @property
    def step(self) -> list[int]:
        return self.xs("step")

    @property
    def last_step(self) -> int:
        """The step of the newest value (without building the whole step list)."""
        return int(self.table.step[self.rows[-1]])

    @property
    def time(self) -> list[float]:
        return self.xs("time")

    @property
    def segment(self) -> list[int]:
        return self.xs("segment")

    def __len__(self) -> int:
        return len(self.value)

    @property
    def last(self) -> Optional[float]:
        return self.value[-1] if self.value else None

    def finite_min(self) -> Optional[float]:
        return self.vmin


def component_order(names) -> list[str]:
    """Registry order first, anything else after, alphabetically."""
    known = [n for n in registry.NAMES if n in names]
    return known + sorted(n for n in names if n not in registry.COMPONENTS)


class RunState:
    """Aggregates one run's records: series per metric, evals, alerts, and the latest state."""

    def __init__(self, name: str):
        self.name = name
        self.start: Optional[RunStart] = None
        self.end: Optional[RunEnd] = None
        self.last_train: Optional[TrainRecord] = None
        self.last_eval: Optional[EvalRecord] = None
        self.train_x = XTable()
        self.eval_x = XTable()
        self.train: dict[str, Series] = {}
        """raw/<component>, weighted/<component>, metric/<name>, objective, lr, temperature, tokens_per_s, grad_norm, mem_gib
        (the weights themselves follow from the curriculum in run_start)."""
        self.eval: dict[str, Series] = {}
        """objective, ppl, lm_ce, teacher_ppl, teacher_ppl/<teacher>, raw/<component>, metric/<name>."""
        self.evals: deque[EvalRecord] = deque(maxlen=EVAL_MEMORY)
        """The newest evaluations (their values are all kept in the eval series)."""
        self.first_identical_eval: Optional[tuple[EvalRecord, EvalRecord]] = None
        """The first two consecutive evaluations at different steps with the same objective (the seed's bug)."""
        self.trainer_alerts: list[AlertRecord] = []
        self.records = 0
        self.corrupt = 0
        self.unknown = 0
        """Records of kinds this version does not know (skipped; a newer trainer wrote them)."""
        self.restarts = 0
        self.earlier_runs = 0
        """Runs that were in the same file before a fresh (not resumed) run_start replaced them in view."""
        self.segment = 0
        self.step_seen: Optional[int] = None
        self.last_record_time: Optional[float] = None
        """The newest record's own time (the trainer's clock): how old the run's latest news is."""
        self.recent_times: deque[float] = deque(maxlen=4096)
        """Record times of the latest records, for records per second."""
        self._time_base: Optional[tuple[float, float]] = None
        """(x time, record time) the time axis counts from: a resumed run continues where it stopped, so the
        curve goes on instead of starting over at 0 (time between runs is not counted)."""
        self._last_x_time = 0.0
        self.session_start_row = 0
        """First train row since the latest run_start: the pace of the current session gives the ETA."""
        self.first_train: Optional[tuple[int, float]] = None
        """(step, record time) of the first train record since the latest run_start."""
        self.gate_usage: Optional[list[float]] = None
        self._schedule: Optional[tuple[RunStart, Any]] = None
        self._lr_started = False
        self.lr_zero_found_at: Optional[int] = None
        """The first step whose LR was 0 after an earlier step's was not (checked as records arrive)."""
        self.system: Optional[SystemRecord] = None
        """The newest resources record (the trainer writes one every few log steps)."""
        self.first_nonfinite: Optional[tuple[str, float, int]] = None
        """(metric, value, step) of the first non-finite train loss or objective."""
        self.first_nonfinite_eval: Optional[tuple[str, int]] = None
        """(metrics, step) of the first eval with a non-finite value."""
        self.train_objective_at: dict[int, float] = {}
        """Train objective by step for the latest OBJECTIVE_MEMORY steps (the latest segment wins), for
        train/eval comparisons."""

    # ------------------------------------------------------------------ ingest
    def _series(self, table: dict[str, Series], key: str, x: XTable) -> Series:
        s = table.get(key)
        if s is None:
            s = table[key] = Series(x)
        return s

    def _x(self, rec) -> tuple[int, float, int]:
        if self._time_base is None:
            self._time_base = (0.0, rec.time)
        x0, t0 = self._time_base
        t = x0 + (rec.time - t0)
        if not math.isfinite(t) or abs(t - self._last_x_time) > MAX_TIME_JUMP:
            t = self._last_x_time  # a clock that jumped absurdly (or a corrupt time) does not stretch the axis
        self._last_x_time = t
        tokens = getattr(rec, "tokens", 0) or 0
        return rec.step, t, tokens

    def add(self, rec) -> None:
        self.records += 1
        if math.isfinite(rec.time):
            self.last_record_time = rec.time if self.last_record_time is None else max(self.last_record_time, rec.time)
            self.recent_times.append(rec.time)
        if isinstance(rec, RunStart):
            if not rec.resumed and self.records > 1:
                # a fresh run in the same directory is another run, not the continuation of the dead one: its
                # steps, trends, minima and ETA must not mix with the earlier run's (they zig-zagged)
                earlier = self.earlier_runs + 1
                self.__init__(self.name)  # type: ignore[misc]
                self.earlier_runs, self.records = earlier, 1
                if math.isfinite(rec.time):
                    self.last_record_time = rec.time
                    self.recent_times.append(rec.time)
            elif self.start is not None:
                self.restarts += 1
            self.start = rec
            self.end = None
            self._time_base = (self._last_x_time, rec.time)
            self.session_start_row = len(self.train_x.step)
            self.first_train = None
            return
        if isinstance(rec, (TrainRecord, EvalRecord)):
            if self.step_seen is not None and rec.step < self.step_seen:
                self.segment += 1
            self.step_seen = rec.step
        if isinstance(rec, TrainRecord):
            self._add_train(rec)
        elif isinstance(rec, EvalRecord):
            self._add_eval(rec)
        elif isinstance(rec, AlertRecord):
            self.trainer_alerts.append(rec)
        elif isinstance(rec, SystemRecord):
            self.system = rec
        elif isinstance(rec, RunEnd):
            self.end = rec

    def _add_train(self, rec: TrainRecord) -> None:
        self.last_train = rec
        if self.first_train is None and math.isfinite(rec.time):
            self.first_train = (rec.step, rec.time)
        step, t, tok = self._x(rec)
        row = self.train_x.add(step, t, tok, self.segment)
        table, x = self.train, self.train_x
        weighted = rec.weighted
        weights = rec.weights
        if self.first_nonfinite is None:
            bad = next(((k, v) for k, v in (*rec.losses.items(), ("objective", rec.objective)) if not math.isfinite(v)), None)
            if bad is not None:
                self.first_nonfinite = (bad[0] if bad[0] == "objective" else "raw/" + bad[0], bad[1], rec.step)
        for name, value in rec.losses.items():
            (table.get("raw/" + name) or self._series(table, "raw/" + name, x)).add(row, value)
            w = weighted.get(name)
            if w is None:
                w = weights.get(name, 0.0) * value
            (table.get("weighted/" + name) or self._series(table, "weighted/" + name, x)).add(row, w)
        if rec.lr > 0:
            self._lr_started = True
        elif self._lr_started and rec.lr == 0 and self.lr_zero_found_at is None:
            self.lr_zero_found_at = rec.step
        self.train_objective_at[rec.step] = rec.objective
        if len(self.train_objective_at) > OBJECTIVE_MEMORY:
            del self.train_objective_at[next(iter(self.train_objective_at))]
        scalars: tuple[tuple[str, Optional[float]], ...] = (
            ("objective", rec.objective),
            ("lr", rec.lr),
            ("temperature", rec.temperature),
            ("tokens_per_s", rec.tokens_per_s),
            ("grad_norm", rec.grad_norm),
            ("teacher_wait", rec.teacher_wait),
            ("mem_gib", rec.mem_gib),
            *((f"metric/{name}", v) for name, v in rec.metrics.items()),
        )
        for key, scalar in scalars:
            if scalar is not None:
                (table.get(key) or self._series(table, key, x)).add(row, scalar)
        if rec.gate_usage:
            self.gate_usage = rec.gate_usage

    def _add_eval(self, rec: EvalRecord) -> None:
        prev = self.last_eval
        if self.first_identical_eval is None and prev is not None and prev.step != rec.step and prev.objective == rec.objective:
            self.first_identical_eval = (prev, rec)
        self.last_eval = rec
        self.evals.append(rec)
        if self.first_nonfinite_eval is None:
            bad = [k for k, v in [("objective", rec.objective), ("ppl", rec.ppl), *rec.losses.items()] if not math.isfinite(v)]
            if bad:
                self.first_nonfinite_eval = (", ".join(bad), rec.step)
        step, t, tok = self._x(rec)
        if self.last_train is not None:
            tok = self.last_train.tokens
        row = self.eval_x.add(step, t, tok, self.segment)
        for key, value in (
            ("objective", rec.objective),
            ("ppl", rec.ppl),
            ("lm_ce", rec.lm_ce),
            ("teacher_ppl", rec.teacher_ppl),
        ):
            if value is not None:
                self._series(self.eval, key, self.eval_x).add(row, float(value))
        for name, value in rec.losses.items():
            self._series(self.eval, f"raw/{name}", self.eval_x).add(row, float(value))
        for name, value in rec.metrics.items():
            self._series(self.eval, f"metric/{name}", self.eval_x).add(row, float(value))
        for name, value in rec.teacher_ppls.items():  # several teachers: each one's own
            self._series(self.eval, f"teacher_ppl/{name}", self.eval_x).add(row, float(value))

    # ------------------------------------------------------------------ views
    @property
    def metrics(self) -> list[str]:
        """The components' diagnostics this run reported (`metrics` of its records), by name."""
        return sorted({k.split("/", 1)[1] for k in (*self.train, *self.eval) if k.startswith("metric/")})

    @property
    def components(self) -> list[str]:
        names = {k.split("/", 1)[1] for k in self.train if k.startswith("raw/")}
        names |= {k.split("/", 1)[1] for k in self.eval if k.startswith("raw/")}
        return component_order(names)

    @property
    def total_steps(self) -> Optional[int]:
        return self.start.total_steps if self.start is not None else None

    @property
    def current_step(self) -> int:
        if self.last_train is not None:
            return self.last_train.step + 1
        return self.start.step if self.start is not None else 0

    def progress(self) -> Optional[float]:
        total = self.total_steps
        return min(1.0, self.current_step / total) if total else None

    def eta_seconds(self) -> Optional[float]:
        """Remaining time from the pace of the train records since the latest (re)start, or of the current
        segment while this session has fewer than two."""
        x = self.train_x
        total = self.total_steps
        if len(x.step) < 2 or not total:
            return None
        i1 = len(x.step) - 1
        i0 = self.session_start_row if i1 - self.session_start_row >= 1 else bisect.bisect_left(x.segment, x.segment[-1])
        dstep = x.step[i1] - x.step[i0]
        if dstep <= 0:
            return None
        pace = (x.time[i1] - x.time[i0]) / dstep
        return max(0.0, (total - self.current_step) * pace)

    def eta_estimate(self) -> tuple[Optional[float], str]:
        """(seconds, how): "pace" from this session's train records; "first" from the run_start to the first
        train record while there is only one (start-up counts, so it is an upper bound); "waiting" before
        any; "none" once the run ended or without a known length."""
        eta = self.eta_seconds()
        if eta is not None:
            return eta, "pace"
        if self.end is not None or not self.total_steps:
            return None, "none"
        if self.start is not None and self.first_train is not None:
            step, t = self.first_train
            done = step + 1 - self.start.step
            if done > 0 and t > self.start.time:
                return max(0.0, (self.total_steps - step - 1) * (t - self.start.time) / done), "first"
        return None, "waiting"

    def record_interval(self, *, at_least: int = 2) -> Optional[float]:
        """Median seconds between the run's recent records (by their own times: a backlog read at once does
        not look like a burst); None with fewer than `at_least` records."""
        times = sorted(self.recent_times)[-64:]
        if len(times) < at_least:
            return None
        gaps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
        return gaps[len(gaps) // 2] if gaps else None

    def stall_after(self, limit: float) -> float:
        """Seconds without a record after which the run looks stalled: `limit`, or sooner for a run that
        writes often (ten of its median intervals between recent records, never under 30 s), so a killed run
        is not shown "live" for minutes."""
        gap = self.record_interval(at_least=6)
        return limit if gap is None else min(limit, max(30.0, 10 * gap))

    def since_last(self, now: float) -> Optional[float]:
        """Seconds since the newest record was written (by its own time)."""
        return None if self.last_record_time is None else max(0.0, now - self.last_record_time)

    def schedule(self):
        """The run's curriculum as a `Curriculum`, rebuilt from the run_start record (None if absent); built
        once per run_start."""
        if self.start is None:
            return None
        if self._schedule is not None and self._schedule[0] is self.start:
            return self._schedule[1]
        from dsdistill.curriculum import Curriculum, CurriculumConfig

        sched = self.start.schedule
        try:
            cfg = CurriculumConfig.model_validate(
                {
                    "weights": sched["weights"],
                    "temperature": sched["temperature"],
                    "on_policy": sched.get("on_policy", {"kind": "constant", "value": 0.0}),
                }
            )
            cur = Curriculum(cfg, active=tuple(sched["active"]) if sched.get("active") else None)
        except Exception:
            cur = None
        self._schedule = (self.start, cur)
        return cur


def summary(run: "RunState") -> dict[str, Any]:
    """The latest state as plain data (for --json and --once)."""
    t, e = run.last_train, run.last_eval
    return {
        "run": run.name,
        "records": run.records,
        "corrupt_lines": run.corrupt,
        "unknown_records": run.unknown,
        "restarts": run.restarts,
        "earlier_runs": run.earlier_runs,
        "total_steps": run.total_steps,
        "step": run.current_step,
        "progress": run.progress(),
        "eta_s": run.eta_seconds(),
        "ended": run.end.reason if run.end is not None else None,
        "train": None
        if t is None
        else {
            "step": t.step,
            "objective": t.objective,
            "losses": t.losses,
            "weights": t.weights,
            "lr": t.lr,
            "temperature": t.temperature,
            "tokens_per_s": t.tokens_per_s,
            "tokens": t.tokens,
        },
        "eval": None
        if e is None
        else {
            "step": e.step,
            "objective": e.objective,
            "losses": e.losses,
            "lm_ce": e.lm_ce,
            "ppl": e.ppl,
            "teacher_ppl": e.teacher_ppl,
            "teacher_ppls": dict(e.teacher_ppls),
            "best": e.best,
            "bad_evals": e.bad_evals,
            "metric": e.early_stop_metric,
            "on_policy": {k: v for k, v in e.on_policy.items() if k != "samples"},
        },
    }
