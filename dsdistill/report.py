"""Human-readable log lines (rank 0's console output), built from the same records the stream holds."""

from __future__ import annotations

from dsdistill.schema import EvalRecord, TrainRecord


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def train_line(r: TrainRecord) -> str:
    """`step 40/200 (20.0%) | T 3.00 | w kd=0.700 lm=0.300 | obj 2.3456 | kd 2.1000 (w 1.4700) ... | lr 3e-04 | 1,234 tok/s`"""
    weights = " ".join(f"{k}={v:.3f}" for k, v in r.weights.items())
    comps = " ".join(f"{k} {_num(v)} (w {_num(r.weighted.get(k, 0.0))})" for k, v in r.losses.items())
    return (
        f"step {r.step + 1}/{r.total_steps} ({100 * r.progress:.1f}%) | T {r.temperature:.2f} | w {weights} | "
        f"obj {_num(r.objective)} | {comps} | lr {r.lr:.3g} | {r.tokens_per_s:,.0f} tok/s"
    )


def eval_line(r: EvalRecord) -> str:
    """`eval @ step 40 | obj 2.1 | kd 1.9 lm 3.0 | ppl 20.1 (teacher 6.3)`"""
    comps = " ".join(f"{k} {_num(v)}" for k, v in r.losses.items())
    teacher = f" (teacher {r.teacher_ppl:.2f})" if r.teacher_ppl is not None else ""
    stop = f" | best {r.early_stop_metric} {r.best:.4g}, {r.bad_evals} without improvement" if r.best is not None else ""
    return f"eval @ step {r.step} | obj {_num(r.objective)} | {comps} | ppl {r.ppl:.3f}{teacher}{stop}"
