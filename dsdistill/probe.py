"""What on-policy distillation improves, measured at each evaluation: the student's own completions of
held-out prompts, scored by the teacher.

Held-out perplexity scores the student on the data's completions; on-policy distillation trains it on its
own. So an on-policy run also evaluates this (an off-policy run too when it sets the number):
`generation.eval_prompts` held-out prompts per rank are
completed by the student (the same sampler and settings as training, seeded by the eval step and row),
then both models score the sampled tokens. The figures:
- `reverse_kl`: teacher cross-entropy minus student cross-entropy on the sampled tokens, per token: a Monte
  Carlo estimate of KL(student || teacher) on the student's own samples (exact in expectation at sampling
  temperature 1 without top-k/top-p; with them it measures the filtered policy);
- `mean_length` and `stop_rate`: how long completions are and how many end on a stop token (a student
  that never emits its end-of-turn token runs every completion to max_new_tokens);
- `samples`: the first two of rank 0 as text, with the teacher's mean log-prob per completion token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol

import torch
import torch.distributed as dist

from dsdistill.components.base import Needs
from dsdistill.rollout import apply_rollouts
from dsdistill.trainer import retokenised, teacher_input

if TYPE_CHECKING:
    from dsdistill.preflight import Plan, RunData
    from dsdistill.trainer import Evaluator, PairForward, Trainer


class Session(Protocol):
    """What the probe reads of a run (`run.loop.Session` has it)."""

    plan: "Plan"
    data: "RunData"
    student: Any
    trainer: "Trainer"
    evaluator: "Evaluator"
    forward: "PairForward"

    def eval_batches(self, rows: Any = None) -> Iterable[dict[str, torch.Tensor]]: ...


SAMPLES = 2
"""Completions recorded as text per evaluation (rank 0's first)."""


def _rows(session: "Session", limit: int) -> list[dict[str, torch.Tensor]]:
    """Up to `limit` held-out rows that have a prompt (real rows with loss-bearing tokens), one dict each."""
    ignore = session.plan.cfg.loss.ignore_index
    out = []
    for batch in session.eval_batches():
        for i in range(batch["input_ids"].size(0)):
            if "row" in batch and int(batch["row"][i]) < 0:
                continue  # a filler row of an uneven split
            if not bool((batch["labels"][i, 1:] != ignore).any()):
                continue
            out.append({k: v[i : i + 1] for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 1})
            if len(out) == limit:
                return out
    return out


def _stacked(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One-row batches as one batch (a cross-tokenizer run's teacher rows padded to one width)."""
    from dsdistill.data import TEACHER_ROWS, pad_teacher_rows

    out = {key: torch.cat([r[key] for r in rows]) for key in rows[0] if key not in TEACHER_ROWS}
    if "t_input_ids" in rows[0]:
        out.update(pad_teacher_rows([{key: r[key][0] for key in TEACHER_ROWS} for r in rows]))
    return out


def _agreed_min(n: int) -> int:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return n


@torch.no_grad()
def on_policy_probe(session: "Session", *, step: int, prompts: int) -> dict[str, Any]:
    """The probe's figures at optimizer step `step` (every rank calls it: sampling and scoring are collectives)."""
    cfg, sampler = session.plan.cfg, session.trainer.rollouts
    rows = _rows(session, prompts)
    k = _agreed_min(len(rows))  # every rank samples and scores the same number of rows (ZeRO-3 gathers together)
    if k == 0 or sampler is None:
        return {}
    window = [_stacked(rows[:k])]
    # seeds from (seed, step, row) like training, offset so a probe never replays a training sample
    sampled, stats = apply_rollouts(
        window,
        fraction=1.0,
        backend=sampler,
        generation=cfg.generation,
        step=step,
        seed=cfg.train.seed + 7_777,
        pad=sampler.pad,
        ignore_index=cfg.loss.ignore_index,
    )
    sampled = retokenised(session.forward.teacher, sampled, stats.places)
    r = session.evaluator.evaluate(sampled, step=step)  # the student's cross-entropy on its own tokens
    t_sum, t_count = session.evaluator.teacher_nll(sampled)
    # per student token: a teacher with another tokenizer scores the same text in its own tokens, so its summed
    # cross-entropy is over the student's completion tokens (log p of the same text on both sides)
    teacher_ce = t_sum / max(r.tokens if "x_pos" in sampled[0] else t_count, 1.0)
    totals = {"sequences": float(stats.sequences), "tokens": float(stats.tokens), "ended": float(stats.ended)}
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(list(totals.values()), dtype=torch.float64)
        dist.all_reduce(t)
        totals = dict(zip(totals, t.tolist()))
    seqs = max(totals["sequences"], 1.0)
    return {
        "completions": int(totals["sequences"]),
        "mean_length": totals["tokens"] / seqs,
        "stop_rate": totals["ended"] / seqs,
        "reverse_kl": teacher_ce - r.lm_ce,
        "samples": _samples(session, sampled[0], min(SAMPLES, k)),
    }


def _samples(session: "Session", mb: dict[str, torch.Tensor], n: int) -> list[dict[str, Any]]:
    """Rank 0's first `n` completions as text, with the teacher's mean log-prob per completion token."""
    tok, teacher, ignore = session.data.tokenizer, session.forward.teacher, session.plan.cfg.loss.ignore_index
    device = session.student.device
    out = []
    teacher.begin_step(Needs(teacher_logits=True))
    try:
        for i in range(n):  # every rank forwards its own row i together (a ZeRO-3 teacher gathers)
            one = {k: v[i : i + 1] for k, v in mb.items()}
            ids, labels = one["input_ids"], one["labels"]
            s, count = teacher.lm_sums(teacher_input(one, labels.to(device), ignore), labels.to(device))
            carried = (labels[0] != ignore).nonzero().flatten().tolist()
            if not carried:
                continue
            start, end = carried[0], carried[-1] + 1
            out.append(
                {
                    "prompt": tok.decode(ids[0, :start].tolist()),
                    "completion": tok.decode(ids[0, start:end].tolist()),
                    "teacher_logprob": -float(s) / max(len(carried), 1),  # per student token of the completion
                }
            )
    finally:
        teacher.end_step()
    rank = dist.get_rank() if dist.is_initialized() else 0
    return out if rank == 0 else []
