"""Knowledge distillation on logits: a divergence between temperature-softened teacher and student.

Divergences (p = teacher, q = student, both at temperature T):
- forward_kl:  KL(p || q)
- reverse_kl:  KL(q || p)
- jsd (beta):  beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
               beta = 0 and beta = 1 are defined as the limits of jsd/beta and jsd/(1 - beta):
               forward and reverse KL. beta = 0.5 is the symmetric Jensen-Shannon divergence.
- skew_kl (alpha): KL(p || alpha * p + (1 - alpha) * q); alpha = 0 is forward KL.
- tv:          total variation, 0.5 * sum |p - q|.
The value that enters the objective is T^2 x divergence (so gradient scales do not shrink with T); the
unscaled divergence is returned too, so a reader can tell a large KD number from a large T.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from dsdistill.losses.lm import shifted_mask, upcast

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tv"]
DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tv")


def _topk_log_probs(s: torch.Tensor, t: torch.Tensor, k: int, rest: bool):
    """Teacher's top-k positions; log-probabilities of both sides over those k tokens (renormalised), or
    over k + 1 buckets where the last holds all remaining mass (so k = vocab equals full KD).

    The rest bucket is the log-sum-exp of the tail itself, not log(1 - kept mass): when the tail holds less
    than ~1e-7 of the mass, 1 - kept cancels to nothing in fp32 (a near one-hot teacher, or k close to V),
    while the tail's own log-sum-exp stays exact."""
    t_logp_full = torch.log_softmax(t, dim=-1)
    top_t, idx = t_logp_full.topk(k, dim=-1)
    s_logp_full = torch.log_softmax(s, dim=-1)
    top_s = s_logp_full.gather(-1, idx)
    if not rest:
        return torch.log_softmax(top_s, dim=-1), torch.log_softmax(top_t, dim=-1)

    def with_rest(full, top):
        tail = full.scatter(-1, idx, float("-inf"))
        return torch.cat([top, torch.logsumexp(tail, dim=-1, keepdim=True)], dim=-1)

    return with_rest(s_logp_full, top_s), with_rest(t_logp_full, top_t)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(a || b) from log-probabilities; rows where a has zero mass contribute 0."""
    pa = logp_a.exp()
    return torch.where(pa > 0, pa * (logp_a - logp_b), torch.zeros_like(pa)).sum(-1)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) for 0 < w < 1."""
    return torch.logaddexp(logp_a + math.log(w), logp_b + math.log1p(-w))


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, *, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence between teacher and student log-probabilities [N, V] -> [N]."""
    if kind == "forward_kl":
        return _kl(t_logp, s_logp)
    if kind == "reverse_kl":
        return _kl(s_logp, t_logp)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(t_logp, s_logp)
        if beta >= 1.0:
            return _kl(s_logp, t_logp)
        m = _mix(t_logp, s_logp, beta)
        return beta * _kl(t_logp, m) + (1 - beta) * _kl(s_logp, m)
    if kind == "skew_kl":
        if alpha <= 0.0:
            return _kl(t_logp, s_logp)
        return _kl(t_logp, _mix(t_logp, s_logp, alpha) if alpha < 1.0 else t_logp)
    if kind == "tv":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int = -100,
    top_k: Optional[int] = None,
    top_k_rest: bool = False,
    divergence_kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
):
    """Summed T^2 x divergence over valid positions.

    Both logits are [B, S, V] over the same vocabulary; position t is valid when labels[:, t+1] is not
    `ignore_index` (the positions the LM loss uses). Computed in at least fp32.
    Returns (sum, {"count": valid tokens, "kl": summed divergence without the T^2 factor}).
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
    raw = divergence(t_logp, s_logp, divergence_kind, beta=beta, alpha=alpha).sum()
    return raw * (temperature**2), {"count": int(mask.sum()), "kl": raw.detach()}
