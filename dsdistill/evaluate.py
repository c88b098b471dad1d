"""Evaluation: the training objective's own functions, at the curriculum weights of a given step.

`evaluate` prints nothing; the caller logs one summary line after it returns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dsdistill.data import eval_batches
from dsdistill.heads import full_weight
from dsdistill.losses import lm_loss
from dsdistill.losses.fused import fused_kd_lm
from dsdistill.dist import all_reduce_sum
from dsdistill.objective import component_sums, forward_pair, kd_options, objective_value


@dataclass
class EvalResult:
    step: int
    weights: dict[str, float]
    temperature: float
    losses: dict[str, float]
    weighted: dict[str, float]
    objective: float
    lm_ce: float
    ppl: float
    tokens: int


def _batches(run):
    return eval_batches(
        run.splits.eval,
        micro_batch=run.cfg.eval.micro_batch_size or run.cfg.train.micro_batch_size,
        rank=run.rank,
        world=run.world,
        ignore_index=run.cfg.loss.ignore_index,
        max_batches=run.cfg.eval.max_batches,
    )


@torch.no_grad()
def evaluate(run, *, step: int) -> EvalResult:
    """Every computed component and the objective over the eval split, reduced token-weighted over ranks,
    with weights and temperature from the curriculum at optimizer step `step`."""
    weights = run.curriculum.weights_at(step=step, total_steps=run.total_steps)
    temperature = run.curriculum.temperature_at(step=step, total_steps=run.total_steps)
    names = tuple(dict.fromkeys([*run.curriculum.active, "lm"]))  # lm always: perplexity needs it
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}
    student = run.student
    was_training = student.module.training
    student.eval()
    t_weight = full_weight(run.teacher_head_weight) if run.fused and "kd" in names else None
    try:
        for batch in _batches(run):
            ids = batch["input_ids"].to(student.device)
            labels = batch["labels"].to(student.device)
            out = forward_pair(run, ids, labels, temperature=temperature, teacher_weight=t_weight, want_lm=True)
            part = component_sums(names, out, temperature=temperature, loss_cfg=run.cfg.loss, plan=run.layers)
            for n in names:  # summed on the device; transferred once by the all-reduce below
                sums[n] = sums[n] + part.sums[n].detach()
                counts[n] += part.counts[n]
    finally:
        if was_training:
            student.train()
    reduced = all_reduce_sum([sums[n] for n in names] + [float(counts[n]) for n in names])
    k = len(names)
    losses = {n: reduced[i] / max(reduced[k + i], 1.0) for i, n in enumerate(names)}
    lm_ce = losses["lm"]
    return EvalResult(
        step=step,
        weights=weights,
        temperature=temperature,
        losses=losses,
        weighted={n: weights[n] * losses[n] for n in weights},
        objective=objective_value(losses, weights),
        lm_ce=lm_ce,
        ppl=math.exp(lm_ce) if lm_ce < 700 else float("inf"),
        tokens=int(reduced[k + names.index("lm")]),
    )


@torch.no_grad()
def teacher_perplexity(run) -> float:
    """exp of the teacher's token-weighted LM cross-entropy on the eval split (computed once per run)."""
    total, count = 0.0, 0
    t_weight = full_weight(run.teacher_head_weight) if run.fused else None
    for batch in _batches(run):
        ids = batch["input_ids"].to(run.teacher.device)
        labels = batch["labels"].to(ids.device)
        out = run.teacher(input_ids=ids).logits  # the final hidden state on the fused path
        if run.teacher_capture is not None:
            run.teacher_capture.collect()  # drop what the hooks kept
        if run.fused:
            _, m = fused_kd_lm(out, t_weight[: run.vocab], None, None, labels, coef_kd=0.0, coef_lm=0.0,
                               options=kd_options(run, temperature=1.0, want_kd=False, want_lm=True),
                               ignore_index=run.cfg.loss.ignore_index)
            s = m["lm"]
        else:
            s, m = lm_loss(out[..., : run.vocab], labels, ignore_index=run.cfg.loss.ignore_index)
        total = total + s.detach()
        count += m["count"]
    total, count = all_reduce_sum([total, float(count)])
    ce = total / max(count, 1.0)
    return math.exp(ce) if ce < 700 else float("inf")


class EarlyStopping:
    """Patience on a lower-is-better eval metric."""

    def __init__(self, *, metric: str, patience: Optional[int], min_delta: float):
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.bad_evals = 0

    def value_of(self, r: EvalResult) -> float:
        if self.metric in ("ppl", "lm_ce", "objective"):
            return float(getattr(r, self.metric))
        return float(r.losses[self.metric])

    def update(self, r: EvalResult) -> bool:
        """Record an evaluation; True when training should stop."""
        v = self.value_of(r)
        if self.best is None or v < self.best - self.min_delta:
            self.best, self.bad_evals = v, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "bad_evals": self.bad_evals}

    def restore(self, state: dict) -> None:
        """Continue from a saved state (ignored if it watched another metric)."""
        if state.get("metric") == self.metric:
            self.best, self.bad_evals = state["best"], int(state["bad_evals"])
