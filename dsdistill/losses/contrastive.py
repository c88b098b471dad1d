"""Contrastive component: InfoNCE between pooled, projected student and teacher sequence representations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsdistill.losses.lm import upcast


def mean_pool(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states [B, S, D] over positions where valid [B, S] is true (zero if none)."""
    w = valid.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)


def info_nce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float,
    valid: torch.Tensor,
    teacher_negatives: torch.Tensor | None = None,
    offset: int = 0,
):
    """Summed InfoNCE over valid sequences: each student embedding must pick its own teacher embedding
    among the batch (plus `teacher_negatives`, e.g. other ranks' teachers) at `temperature`.

    student, teacher: [B, D] (projected); valid: [B] bool (sequences with at least one valid token);
    `offset` is the index of this batch's first teacher inside the candidate set.
    Returns (sum over valid sequences, {"count": valid sequences})."""
    s = F.normalize(upcast(student), dim=-1)
    cands = teacher if teacher_negatives is None else teacher_negatives
    t = F.normalize(upcast(cands), dim=-1)
    logits = s @ t.T / temperature
    target = torch.arange(s.size(0), device=s.device) + offset
    per = F.cross_entropy(logits, target, reduction="none")
    return per[valid].sum(), {"count": int(valid.sum())}
