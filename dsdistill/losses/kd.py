"""Knowledge distillation on logits: a divergence between temperature-softened teacher and student.

Divergences (p = teacher, q = student, both at temperature T):
- forward_kl:  KL(p || q)
- reverse_kl:  KL(q || p)
- jsd (beta):  beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
               beta = 0 and beta = 1 are defined as the limits of jsd/beta and jsd/(1 - beta):
               forward and reverse KL. beta = 0.5 is the symmetric Jensen-Shannon divergence. The value
               jumps at beta = 0 and 1 (jsd itself goes to 0 there; its rescaled limit does not), as in TRL.
- skew_kl (alpha):  KL(p || alpha * p + (1 - alpha) * q); alpha = 0 is forward KL (DistiLLM's SKL).
- skew_rkl (alpha): KL(q || alpha * q + (1 - alpha) * p); alpha = 0 is reverse KL (DistiLLM's SRKL).
- tv:          total variation, 0.5 * sum |p - q|.

Scaling: the KL family (every divergence above but tv) has gradients that shrink as 1/T^2 when both
sides are softened, so the value that enters the objective is T^2 x divergence (Hinton et al.). Total
variation has no such property (and is bounded by 1), so it enters unscaled. `T2_SCALED` lists which are
scaled; run_start records it. The unscaled divergence is logged too (`kd_kl`).

Training computes these in closed form (`closed_form.py`: value and logit gradient, for `kd_loss` on full
logits and the fused head alike); the functions here are the reference formulas it is tested against and
the values it takes on small supports.

Top-k supports (`loss.kd.top_k`): each divergence is computed on the tokens where the side it weights puts its
mass, so a student cannot hide mass outside the compared set:
- forward_kl: the teacher's top-k (the expectation is under the teacher);
- reverse_kl, skew_rkl: the student's top-k (the expectation is under the student);
- jsd, skew_kl, tv: the union of both top-k sets (both sides weigh in).
Both distributions are renormalised over that support, or, with `loss.kd.top_k_rest`, the rest of the
vocabulary is one more bucket on both sides (k = vocab with the bucket equals full KD).
"""

from __future__ import annotations

import math

import torch

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv")
T2_SCALED: frozenset[str] = frozenset({"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl"})
"""Divergences multiplied by T^2 in the objective (their gradients shrink as 1/T^2); tv is not."""
TOP_K_SUPPORT: dict[str, str] = {
    "forward_kl": "teacher",
    "reverse_kl": "student",
    "skew_rkl": "student",
    "jsd": "union",
    "skew_kl": "union",
    "tv": "union",
}
"""Whose top-k tokens a divergence is compared on (see the module docstring)."""

_ABSENT = -1.0e4
"""Log-value of a support slot that holds no token (a duplicate in a union): exp() of it is exactly 0 in
fp32 and fp64, and unlike -inf it keeps every gradient finite."""


def t2_factor(kind: str, temperature: float) -> float:
    """The factor the divergence is multiplied by in the objective: T^2 for the KL family, 1 for tv."""
    return temperature**2 if kind in T2_SCALED else 1.0


def topk_support(s_logp_full: torch.Tensor, t_logp_full: torch.Tensor, k: int, kind: str, support: str = "auto"):
    """Token ids [N, k or 2k] of the divergence's top-k support and a mask of slots that repeat a token
    already in it (union supports only; such slots must hold no mass). `support` "teacher" forces the
    teacher's top-k (what a cache holds), "auto" takes `TOP_K_SUPPORT[kind]`."""
    side = "teacher" if support == "teacher" else TOP_K_SUPPORT[kind]
    t_idx = t_logp_full.topk(k, dim=-1).indices if side != "student" else None
    s_idx = s_logp_full.topk(k, dim=-1).indices if side != "teacher" else None
    if t_idx is None:
        return s_idx, None
    if s_idx is None:
        return t_idx, None
    dup = (s_idx[:, :, None] == t_idx[:, None, :]).any(-1)
    return torch.cat([t_idx, s_idx], dim=-1), torch.cat([torch.zeros_like(dup), dup], dim=-1)


def _topk_log_probs(s: torch.Tensor, t: torch.Tensor, k: int, rest: bool, kind: str = "forward_kl", support: str = "auto"):
    """Log-probabilities of both sides over the divergence's top-k support (renormalised), or over that
    support plus one bucket holding all remaining mass.

    The rest bucket is the log-sum-exp of the tail itself, not log(1 - kept mass): when the tail holds less
    than ~1e-7 of the mass, 1 - kept cancels to nothing in fp32 (a near one-hot teacher, or k close to V),
    while the tail's own log-sum-exp stays exact."""
    t_logp_full = torch.log_softmax(t, dim=-1)
    s_logp_full = torch.log_softmax(s, dim=-1)
    idx, dup = topk_support(s_logp_full, t_logp_full, k, kind, support)

    def on_support(full):
        top = full.gather(-1, idx)
        if dup is not None:
            top = top.masked_fill(dup, _ABSENT)
        if not rest:
            return torch.log_softmax(top, dim=-1)
        tail = full.scatter(-1, idx, float("-inf"))
        return torch.cat([top, torch.logsumexp(tail, dim=-1, keepdim=True)], dim=-1)

    return on_support(s_logp_full), on_support(t_logp_full)


def _kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(a || b) from log-probabilities; rows where a has zero mass contribute 0."""
    pa = logp_a.exp()
    return (pa * torch.where(pa > 0, logp_a - logp_b, 0.0)).sum(-1)


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
    if kind == "skew_rkl":
        if alpha <= 0.0:
            return _kl(s_logp, t_logp)
        return _kl(s_logp, _mix(s_logp, t_logp, alpha) if alpha < 1.0 else s_logp)
    if kind == "tv":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
