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
    total: torch.Tensor | float = 0.0
    for s, t in pairs:
        s, t = upcast(s[:, :-1]), upcast(t[:, :-1]).detach()
        if normalized:
            s, t = normalize(s), normalize(t)
        total = total + torch.where(mask, _per_position(s, t, metric), 0.0).sum()  # static shapes: no device sync
    return total / max(len(pairs), 1), {"count": mask.sum()}


def layerwise_loss(pairs, labels: torch.Tensor, *, ignore_index: int = -100):
    """Every student layer (projected) against its mapped teacher layer, both normalised, MSE averaged
    over layers."""
    return feature_loss(pairs, labels, ignore_index=ignore_index, metric="mse", normalized=True)


def routing_feature_loss(
    student_projected: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    gates: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
):
    """Each student layer (projected, normalised) against every normalised teacher layer, the per-layer MSEs
    weighted by the gates: sum_j g_lj * MSE(s_l, t_j), averaged over student layers.

    Why not the MSE to the gate-weighted mixture of teacher layers: mixing shrinks the target's norm, so a
    router would be rewarded for averaging layers rather than for choosing the one the student matches (the
    audit's case: uniform gates scored lower than the matching layer). Here the loss is linear in the gates,
    so its minimum lies on the best-matching layer.

    teacher_hidden: Lt tensors [B, S, Dt]; gates: [Ls, Lt] or [B, Ls, Lt] (rows sum to 1).
    """
    mask = shifted_mask(labels, ignore_index)
    targets = torch.stack([normalize(h[:, :-1]).detach() for h in teacher_hidden], dim=0)  # [Lt, B, S-1, D]
    t_sq = targets.pow(2).mean(-1)  # [Lt, B, S-1]
    total: torch.Tensor | float = 0.0
    for li, s in enumerate(student_projected):
        a = normalize(s[:, :-1])
        # MSE(a, t_j) per position for every teacher layer j at once: |a|^2 + |t_j|^2 - 2 a.t_j, over D
        err = a.pow(2).mean(-1)[None] + t_sq - 2 * torch.einsum("bsd,jbsd->jbs", a, targets) / a.size(-1)
        g = gates[li] if gates.dim() == 2 else gates[:, li]  # [Lt] or [B, Lt]
        weighted = (
            torch.einsum("j,jbs->bs", g.to(err.dtype), err) if g.dim() == 1 else torch.einsum("bj,jbs->bs", g.to(err.dtype), err)
        )
        total = total + torch.where(mask, weighted, 0.0).sum()
    return total / max(len(student_projected), 1), {"count": mask.sum()}


def load_balance_loss(gates: torch.Tensor):
    """Switch-Transformer-style balance over teacher layers: Lt * sum_j f_j * P_j, where P_j is the mean
    gate on teacher layer j and f_j the fraction of student layers (x sequences) whose largest gate is j.
    Equals 1 when usage is uniform; larger when a few teacher layers take everything.
    gates: [Ls, Lt] or [B, Ls, Lt]. Returns (value, {"count": 1}) -- one unit per micro-batch."""
    g = gates.reshape(-1, gates.size(-1))
    n_experts = g.size(-1)
    mean_prob = g.mean(0)
    # one-hot of the argmax by a scatter (F.one_hot checks its input's range on the host: a device sync)
    frac = torch.zeros_like(g).scatter_(-1, g.argmax(-1, keepdim=True), 1.0).mean(0)
    return n_experts * (frac.detach() * mean_prob).sum(), {"count": 1}


def gate_usage(gates: torch.Tensor) -> torch.Tensor:
    """Mean gate per teacher layer (sums to 1), for the metrics stream and the dashboard (a device tensor:
    the trainer reads it once per step)."""
    return gates.detach().reshape(-1, gates.size(-1)).float().mean(0)
