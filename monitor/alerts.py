"""Alert rules evaluated on a run's state: the things a person watching a distillation must not miss."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional

from .state import RunState


@dataclass(frozen=True)
class Alert:
    code: str
    level: str  # "error" | "warning" | "info"
    message: str
    step: Optional[int]
    """The optimizer step the alert is about (None when it is about no particular step)."""


@dataclass
class AlertRules:
    """Thresholds; every one can be set from the command line."""

    gap: float = 0.5
    """Relative train/eval objective gap at the same step that raises an alert."""
    spike: float = 3.0
    """Latest train objective above this multiple of the recent median is a spike."""
    spike_window: int = 20
    stall_seconds: float = 300.0
    """No record for this long (and no run_end) means the run looks stalled."""


def evaluate_alerts(state: RunState, rules: AlertRules, *, now: float) -> list[Alert]:
    """All current alerts for one run, most severe first."""
    out: list[Alert] = []
    obj = state.train.get("objective")
    if state.first_nonfinite is not None:
        key, value, step = state.first_nonfinite
        out.append(Alert("nan", "error", f"non-finite train {key} ({value}) at step {step}", step))
    if state.first_nonfinite_eval is not None:
        names, step = state.first_nonfinite_eval
        out.append(Alert("nan", "error", f"non-finite eval {names} at step {step}", step))
    evals = state.evals
    if state.first_identical_eval is not None:
        prev, cur = state.first_identical_eval
        out.append(
            Alert(
                "eval_identical",
                "error",
                f"eval objective {cur.objective:.6g} at step {cur.step} is identical to step {prev.step}: "
                "is eval using the training step's curriculum weights?",
                cur.step,
            )
        )
    if obj is not None and evals:
        by_step = state.train_objective_at
        for e in reversed(evals):
            t = by_step.get(e.step)
            if t is not None and math.isfinite(t) and math.isfinite(e.objective):
                gap = abs(e.objective - t) / max(abs(t), 1e-12)
                if gap > rules.gap:
                    out.append(
                        Alert(
                            "train_eval_gap",
                            "warning",
                            f"eval objective {e.objective:.4g} vs train {t:.4g} at step {e.step} ({gap:.0%} apart)",
                            e.step,
                        )
                    )
                break
    if state.lr_zero_found_at is not None:
        s = state.lr_zero_found_at
        out.append(Alert("lr_zero", "error", f"LR is 0 at step {s} after warmup began", s))
    if obj is not None and len(obj) > rules.spike_window:
        recent = [v for v in obj.value[-rules.spike_window - 1 : -1] if math.isfinite(v)]
        last = obj.value[-1]
        if recent and math.isfinite(last):
            med = statistics.median(recent)
            if med > 0 and last > rules.spike * med:
                out.append(
                    Alert(
                        "spike",
                        "warning",
                        f"train objective {last:.4g} at step {obj.last_step} is {last / med:.1f}x the recent median",
                        obj.last_step,
                    )
                )
    since = state.since_last(now)
    stall = state.stall_after(rules.stall_seconds)
    if state.end is None and since is not None and since > stall:
        out.append(Alert("stalled", "warning", f"no record for {since:.0f}s (threshold {stall:.0f}s)", state.step_seen))
    for a in state.trainer_alerts:
        out.append(Alert(a.code, a.level, a.message, a.step))
    rank = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda a: rank.get(a.level, 3))
