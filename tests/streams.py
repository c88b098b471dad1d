"""Crafted metrics streams for monitor tests, written with the real schema models."""

from __future__ import annotations

import math
from pathlib import Path

from dsdistill.curriculum import Constant, Curriculum, CurriculumConfig, default_weights
from dsdistill.schema import EvalRecord, RunEnd, RunStart, TrainRecord, dumps

T0 = 1_800_000_000.0
STREAM_CURRICULUM = CurriculumConfig(
    weights={**default_weights(), "kd": Constant(value=0.7), "lm": Constant(value=0.3)}, temperature=Constant(value=3.0)
)
"""Fixed here, not the product's default, so the crafted streams (and the screen snapshot) do not move with it."""


def healthy_records(
    steps: int = 40,
    *,
    eval_every: int = 10,
    nan_at=None,
    zero_lr_at=None,
    identical_evals=False,
    spike_at=None,
    end: bool = True,
    t0: float = T0,
):
    cur = Curriculum(STREAM_CURRICULUM)
    recs = [
        RunStart(
            step=0, time=t0, config={}, total_steps=steps, world_size=2, schedule=cur.definition(), global_batch=16, seq_len=64
        )
    ]
    for s in range(steps):
        w = cur.weights_at(step=s, total_steps=steps)
        kd = 3.0 * math.exp(-s / 15) + 0.2
        lm = 2.0 * math.exp(-s / 20) + 1.0
        if spike_at == s:
            kd *= 20
        if nan_at == s:
            kd = float("nan")
        losses = {"kd": kd, "lm": lm}
        lr = 0.0 if (zero_lr_at is not None and s >= zero_lr_at) else 1e-3 * min(1.0, (s + 1) / 5)
        recs.append(
            TrainRecord(
                step=s,
                time=t0 + 2 * (s + 1),
                weights=w,
                losses=losses,
                weighted={k: w[k] * v for k, v in losses.items()},
                objective=sum(w[k] * v for k, v in losses.items()),
                lr=lr,
                temperature=3.0,
                tokens_per_s=5000.0 + s,
                tokens=1024 * (s + 1),
                progress=(s + 1) / steps,
                total_steps=steps,
            )
        )
        done = s + 1
        if done % eval_every == 0:
            e_obj = 1.5 if identical_evals else w["kd"] * kd * 1.05 + w["lm"] * lm * 1.05
            recs.append(
                EvalRecord(
                    step=done,
                    time=t0 + 2 * done + 1,
                    weights=w,
                    losses={"kd": kd * 1.05, "lm": lm * 1.05},
                    objective=e_obj,
                    temperature=3.0,
                    lm_ce=lm * 1.05,
                    ppl=math.exp(lm * 1.05),
                    teacher_ppl=2.5,
                    best=math.exp(lm * 1.05),
                )
            )
    if end:
        recs.append(RunEnd(step=steps, time=t0 + 2 * steps + 2, reason="completed"))
    return recs


def write(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(dumps(r) + "\n")
    return path
