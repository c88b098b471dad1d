"""Hidden-state components: feature, layerwise and the router's routed feature. Pure functions.

Token-level, on the same positions as KD/LM (position t counts when labels[:, t+1] is valid), each
returning (sum over valid positions, {"count": positions}). Per position the error is averaged over the
hidden dimension, so values do not grow with the width.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dsdistill.losses.lm import shifted_mask, upcast


def normalize(h: torch.Tensor) -> torch.Tensor:
    """Layer normalisation without learned scale (hidden states of different layers and models have very
    different magnitudes)."""
    h = upcast(h)
    return F.layer_norm(h, (h.size(-1),))


def _per_position(s: torch.Tensor, t: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "mse":
        return (s - t).pow(2).mean(-1)
    if metric == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"unknown feature metric {metric!r}; expected mse or cosine")


def feature_loss(
    pairs, labels: torch.Tensor, *, ignore_index: int = -100, metric: Literal["mse", "cosine"] = "mse", normalized: bool = True
):
    """Projected student hidden states vs teacher hidden states, averaged over the mapped layer pairs.

    pairs: list of (student_projected [B, S, Dt], teacher_hidden [B, S, Dt]).
    """
    mask = shifted_mask(labels, ignore_index)
    total = 0.0
    for s, t in pairs:
        s, t = upcast(s[:, :-1]), upcast(t[:, :-1]).detach()
        if normalized:
            s, t = normalize(s), normalize(t)
        total = total + _per_position(s, t, metric)[mask].sum()
    return total / max(len(pairs), 1), {"count": int(mask.sum())}


def layerwise_loss(pairs, labels: torch.Tensor, *, ignore_index: int = -100):
    """Every student layer (projected) against its mapped teacher layer, both normalised, MSE averaged
    over layers."""
    return feature_loss(pairs, labels, ignore_index=ignore_index, metric="mse", normalized=True)


def routed_targets(teacher_hidden: list[torch.Tensor], gates: torch.Tensor) -> list[torch.Tensor]:
    """The router's target per student layer: the gate-weighted mixture of normalised teacher hidden states.

    teacher_hidden: Lt tensors [B, S, Dt]; gates: [Ls, Lt] or [B, Ls, Lt] (rows sum to 1).
    Returns Ls tensors [B, S, Dt].
    """
    stack = torch.stack([normalize(h).detach() for h in teacher_hidden], dim=0)  # [Lt, B, S, D]
    if gates.dim() == 2:
        mixed = torch.einsum("lj,jbsd->lbsd", gates.to(stack.dtype), stack)
    else:
        mixed = torch.einsum("blj,jbsd->lbsd", gates.to(stack.dtype), stack)
    return list(mixed.unbind(0))


def routing_feature_loss(
    student_projected: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    gates: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
):
    """Each student layer (projected, normalised) against its routed mixture of teacher layers (MSE)."""
    targets = routed_targets(teacher_hidden, gates)
    mask = shifted_mask(labels, ignore_index)
    total = 0.0
    for s, t in zip(student_projected, targets):
        total = total + (normalize(s[:, :-1]) - t[:, :-1]).pow(2).mean(-1)[mask].sum()
    return total / max(len(student_projected), 1), {"count": int(mask.sum())}


def load_balance_loss(gates: torch.Tensor):
    """Switch-Transformer-style balance over teacher layers: Lt * sum_j f_j * P_j, where P_j is the mean
    gate on teacher layer j and f_j the fraction of student layers (x sequences) whose largest gate is j.
    Equals 1 when usage is uniform; larger when a few teacher layers take everything.
    gates: [Ls, Lt] or [B, Ls, Lt]. Returns (value, {"count": 1}) -- one unit per micro-batch."""
    g = gates.reshape(-1, gates.size(-1))
    n_experts = g.size(-1)
    mean_prob = g.mean(0)
    frac = F.one_hot(g.argmax(-1), n_experts).to(g.dtype).mean(0)
    return n_experts * (frac.detach() * mean_prob).sum(), {"count": 1}


def gate_usage(gates: torch.Tensor) -> list[float]:
    """Mean gate per teacher layer (sums to 1), for the metrics stream and the dashboard."""
    return gates.detach().reshape(-1, gates.size(-1)).float().mean(0).tolist()
