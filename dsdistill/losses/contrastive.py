"""Contrastive component: InfoNCE between pooled, projected student and teacher sequence representations.

Its value depends on how many candidates each student embedding is compared with: the micro-batch size,
times the world size with `loss.contrastive.gather` (the other ranks' teachers as negatives). More negatives
give a larger loss (about log of their number at the start), so values are comparable only between runs with
the same micro-batch x world size. Sequences without a loss-bearing token are neither anchors nor
negatives: their pooled state would be an all-zero vector, a constant negative the value would depend on."""

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
    negatives_valid: torch.Tensor | None = None,
    offset: int = 0,
):
    """Summed InfoNCE over valid sequences: each student embedding must pick its own teacher embedding
    among the batch (plus `teacher_negatives`, e.g. other ranks' teachers) at `temperature`.

    student, teacher: [B, D] (projected); valid: [B] bool (sequences with at least one valid token);
    `offset` is the index of this batch's first teacher inside the candidate set; `negatives_valid` [N] marks
    the candidates of `teacher_negatives` that are valid (default: all). Invalid candidates are left out.
    Returns (sum over valid sequences, {"count": valid sequences})."""
    s = F.normalize(upcast(student), dim=-1)
    cands = teacher if teacher_negatives is None else teacher_negatives
    keep = valid if teacher_negatives is None else negatives_valid
    t = F.normalize(upcast(cands), dim=-1)
    logits = s @ t.T / temperature
    if keep is not None:
        # a finite floor, not -inf: exp() of it is exactly 0, and a row with no candidate stays finite
        logits = logits.masked_fill(~keep[None, :], -1e9)
    target = torch.arange(s.size(0), device=s.device) + offset
    per = F.cross_entropy(logits, target, reduction="none")
    return torch.where(valid, per, 0.0).sum(), {"count": valid.sum()}
