"""How numbers and durations are written in the panels, and the tables that fit a width."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from rich.text import Text

from .state import RunState

SPARK = "▁▂▃▄▅▆▇█"


def fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if 1e3 <= a < 1e8:
        return f"{v:,.0f}"
    if a != 0 and (a >= 1e8 or a < 1e-3):
        return f"{v:.2e}"
    return f"{v:.4g}" if a >= 1e-2 else f"{v:.3g}"


def duration(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def eta_text(run: RunState) -> str:
    """The ETA as a user reads it: from the run's pace, an upper bound from its first record, or what it
    waits for."""
    eta, how = run.eta_estimate()
    if how == "pace":
        return duration(eta)
    if how == "first":
        return f"<{duration(eta)} (from the first record, start-up counted)"
    return "after the first step" if how == "waiting" else "-"


def sparkline(values: Sequence[float], n: int = 10) -> str:
    vals = [v for v in values[-n:] if math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return SPARK[3] * len(vals)
    return "".join(SPARK[min(7, int((v - lo) / (hi - lo) * 8))] for v in vals)


def cut_label(text: str, width: int) -> str:
    """A label shortened with an ellipsis to `width` (labels may be shortened; numbers never are)."""
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def fit_table(header: list[str], rows: list[list[str]], width: int, optional: Optional[list[int]] = None) -> Text:
    """A right-aligned table of formatted values that fits `width` by dropping whole columns (trend, then
    delta, then min, then other runs from the last) and shortening labels; a value is shown whole or not
    at all."""
    cols = list(range(len(header)))
    if optional is None:
        optional = [4, 3, 2] + list(range(len(header) - 1, 4, -1))  # trend, delta, min, then other runs from the right
    optional = list(optional)

    def widths(cols: list[int], label_w: int) -> list[int]:
        out = []
        for c in cols:
            w = max([len(header[c])] + [len(r[c]) for r in rows]) if c else label_w
            out.append(w)
        return out

    label_full = max([len(header[0])] + [len(r[0]) for r in rows])
    label_w = min(label_full, 14)
    while sum(widths(cols, label_w)) + len(cols) - 1 > width and optional:
        drop = optional.pop(0)
        if drop in cols:
            cols.remove(drop)
    while sum(widths(cols, label_w)) + len(cols) - 1 > width and label_w > 4:
        label_w -= 1
    ws = widths(cols, label_w)
    out = Text()
    out.append(
        " ".join(cut_label(header[c], w).ljust(w) if c == 0 else header[c][-w:].rjust(w) for c, w in zip(cols, ws)), style="bold"
    )
    for r in rows:
        out.append("\n")
        out.append(cut_label(r[0], ws[0]).ljust(ws[0]), style="bold")
        for c, w in zip(cols[1:], ws[1:]):
            out.append(" " + (r[c].ljust(w) if c == 4 else r[c].rjust(w)))
    return out


def sample_lines(run: RunState) -> list[str]:
    """An on-policy run's completions of held-out prompts at each eval, with the teacher's score (`g`)."""
    lines: list[str] = []
    for e in run.evals:
        p = e.on_policy
        if not p:
            continue
        lines.append(
            f"eval @ step {e.step}: {p.get('completions', 0)} completions, mean length {p.get('mean_length', 0):.1f}, "
            f"stop rate {100 * p.get('stop_rate', 0):.0f}%, reverse KL {p.get('reverse_kl', float('nan')):.4g}"
        )
        for s in p.get("samples", []):  # already cleaned of controls when read; shown as text
            lines.append(f"  prompt: {s.get('prompt', '')}")
            lines.append(
                f"  student: {s.get('completion', '')}   (teacher log-prob/token {s.get('teacher_logprob', float('nan')):.3f})"
            )
    return lines or ["no on-policy samples yet: they come with each eval of a run with curriculum.on_policy > 0"]
