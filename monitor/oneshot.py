"""`dsmonitor --once` and `--json`: every file read once to its end, the latest state printed."""

from __future__ import annotations

import json
import time

from .alerts import AlertRules, evaluate_alerts
from .fmt import duration
from .state import RunState, summary
from .tail import Tailer, run_name


def load_states(targets: list[str]) -> list[RunState]:
    """Read every file once, to its end."""
    states = []
    for t in targets:
        tailer, state = Tailer(t), RunState(run_name(t))
        res = tailer.poll()
        for rec in res.records:
            state.add(rec)
        state.corrupt, state.unknown = res.corrupt, res.unknown
        states.append(state)
    return states


def summary_text(states: list[RunState], rules: AlertRules) -> str:
    lines = []
    now = time.time()
    for s in states:
        d = summary(s)
        prog = "" if d["progress"] is None else f" ({100 * d['progress']:.1f}%)"
        lines.append(
            f"run {s.name}: step {d['step']}/{d['total_steps'] or '?'}{prog}, {d['records']} records, "
            f"{d['corrupt_lines']} corrupt, {'ended: ' + d['ended'] if d['ended'] else 'running, ETA ' + duration(d['eta_s'])}"
        )
        if d["train"]:
            t = d["train"]
            comps = " ".join(f"{k}={v:.4g}" for k, v in t["losses"].items())
            lines.append(
                f"  train @ {t['step']}: objective {t['objective']:.4g} | {comps} | lr {t['lr']:.3g} | T {t['temperature']:.3g} | {t['tokens_per_s']:,.0f} tok/s"
            )
        if d["eval"]:
            e = d["eval"]
            teacher = f" (teacher {e['teacher_ppl']:.4g})" if e["teacher_ppl"] is not None else ""
            if e.get("teacher_ppls"):
                teacher = " (teachers " + ", ".join(f"{n} {p:.4g}" for n, p in e["teacher_ppls"].items()) + ")"
            lines.append(
                f"  eval  @ {e['step']}: objective {e['objective']:.4g} | ppl {e['ppl']:.4g}{teacher} | best {e['metric']} "
                f"{e['best']:.4g}"
            )
        alerts = evaluate_alerts(s, rules, now=now)
        for a in alerts:
            lines.append(f"  {a.level.upper()} {a.code}: {a.message}")
        if not alerts:
            lines.append("  no alerts")
    return "\n".join(lines)


def summary_json(states: list[RunState], rules: AlertRules) -> str:
    now = time.time()
    out = []
    for s in states:
        d = summary(s)
        d["alerts"] = [
            {"code": a.code, "level": a.level, "message": a.message, "step": a.step} for a in evaluate_alerts(s, rules, now=now)
        ]
        out.append(d)
    return json.dumps(out, indent=2, allow_nan=True)  # always a list, one entry per run
