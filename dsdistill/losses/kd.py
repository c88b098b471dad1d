"""Knowledge distillation on logits: forward KL(teacher || student) at temperature T, scaled by T^2."""
from __future__ import annotations

from typing import Optional

import torch

from dsdistill.losses.lm import shifted_mask, upcast


def _topk_log_probs(s: torch.Tensor, t: torch.Tensor, k: int, rest: bool):
    """Teacher's top-k positions; log-probabilities of both sides over those k tokens (renormalised), or
    over k + 1 buckets where the last holds all remaining mass (so k = vocab equals full KD)."""
    t_logp_full = torch.log_softmax(t, dim=-1)
    top_t, idx = t_logp_full.topk(k, dim=-1)
    s_logp_full = torch.log_softmax(s, dim=-1)
    top_s = s_logp_full.gather(-1, idx)
    if not rest:
        return torch.log_softmax(top_s, dim=-1), torch.log_softmax(top_t, dim=-1)

    def with_rest(top):
        kept = torch.logsumexp(top, dim=-1, keepdim=True)
        # log(1 - exp(kept)), stable; clamp: rounding can make the kept mass exceed 1 by an ulp
        rest_lp = torch.log(-torch.expm1(kept.clamp(max=-1e-12)))
        return torch.cat([top, rest_lp], dim=-1)

    return with_rest(top_s), with_rest(top_t)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int = -100,
    top_k: Optional[int] = None,
    top_k_rest: bool = False,
):
    """Summed T^2 * KL(p_teacher^T || p_student^T) over valid positions.

    Both logits are [B, S, V] over the same vocabulary; position t is valid when labels[:, t+1] is not
    `ignore_index` (the same positions the LM loss uses). Computed in fp32.
    Returns (sum, {"count": valid tokens, "kl": summed KL without the T^2 factor}).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    mask = shifted_mask(labels, ignore_index)
    s = upcast(student_logits[:, :-1][mask]) / temperature
    t = upcast(teacher_logits[:, :-1][mask]) / temperature
    if top_k is not None and top_k < s.size(-1):
        s_logp, t_logp = _topk_log_probs(s, t, top_k, top_k_rest)
    else:
        s_logp, t_logp = torch.log_softmax(s, dim=-1), torch.log_softmax(t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    return kl * (temperature**2), {"count": int(mask.sum()), "kl": kl.detach()}
