"""Attention components, rebuilt from captured queries and keys without eager attention.

The models run with SDPA/flash attention. For the selected layers, `dsdistill.capture` keeps the
post-RoPE queries [B, H, S, d] and keys [B, Hkv, S, d]; here the causal attention distributions are
rebuilt for those layers only, `chunk` query rows at a time, averaged over heads (so teacher and student
may have different head counts, and grouped-query attention is handled by sharing each key head across
its query group).

Memory bound: each chunk materialises B x H x chunk x S scores per model (plus Lt teacher layers for the
routed term). Chunks run under activation checkpointing, so backward keeps only the chunk inputs and
recomputes the scores: peak extra memory is O(B * H * chunk * S), not O(B * H * S^2).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from dsdistill.losses.lm import shifted_mask, upcast


def segments_of(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, S] index of the packed example each position belongs to (a new one wherever positions do not
    continue by 1, as transformers reads them), or None for unpacked rows."""
    if position_ids is None:
        return None
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1)


def _blocked(start: int, end: int, seq: int, device, segments: Optional[torch.Tensor]) -> torch.Tensor:
    """Keys a query row in [start, end) cannot see: [r, S] (future ones), or [B, r, S] with packed examples
    (also the other examples' keys)."""
    future = torch.arange(seq, device=device)[None, :] > torch.arange(start, end, device=device)[:, None]
    if segments is None:
        return future
    other = segments[:, start:end, None] != segments[:, None, :]
    return future[None] | other


def head_avg_log_probs(
    q: torch.Tensor, k: torch.Tensor, start: int, end: int, segments: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """log of the head-averaged causal attention distribution for query rows [start, end): [B, r, S].
    Keys a row cannot see get a large negative finite score, not -inf: with -inf the logsumexp over heads
    differentiates to exp(-inf - -inf) = NaN at those keys, and 0 x NaN poisons every gradient."""
    heads, d = q.size(1), q.size(-1)
    if k.size(1) != heads:
        k = k.repeat_interleave(heads // k.size(1), dim=1)
    scores = torch.matmul(upcast(q[:, :, start:end]), upcast(k).transpose(-1, -2)) / math.sqrt(d)
    blocked = _blocked(start, end, k.size(2), q.device, segments)
    scores = scores.masked_fill(blocked if blocked.dim() == 2 else blocked[:, None], -1e9)
    logp = torch.log_softmax(scores, dim=-1)
    return torch.logsumexp(logp, dim=1) - math.log(heads)


def _kl_rows(lp_t: torch.Tensor, lp_s: torch.Tensor, start: int, segments: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) per query row [B, r]; keys neither can see (probability 0 on both sides) add 0."""
    future = _blocked(start, start + lp_t.size(1), lp_t.size(-1), lp_t.device, segments)
    lp_t = lp_t.masked_fill(future, 0.0)
    lp_s = lp_s.masked_fill(future, 0.0)
    return (lp_t.exp().masked_fill(future, 0.0) * (lp_t - lp_s)).sum(-1)


def _chunks(seq: int, chunk: int):
    for start in range(0, seq, chunk):
        yield start, min(seq, start + chunk)


def attention_loss(
    pairs, labels: torch.Tensor, *, ignore_index: int = -100, chunk: int = 128, segments: Optional[torch.Tensor] = None
):
    """KL between head-averaged teacher and student attention rows on mapped layers, averaged over pairs.

    pairs: list of ((q_s, k_s), (q_t, k_t)). Query position t counts when labels[:, t+1] is valid (the
    KD/LM positions); `segments` ([B, S], from `segments_of`) keeps packed examples apart. Returns (sum over
    valid query positions, {"count": positions})."""
    mask = shifted_mask(labels, ignore_index)  # [B, S-1]
    rows = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).float()  # the last position predicts nothing
    total = 0.0
    for (qs, ks), (qt, kt) in pairs:
        qt, kt = qt.detach(), kt.detach()
        for start, end in _chunks(qs.size(2), chunk):

            def piece(qs_, ks_, start=start, end=end, qt=qt, kt=kt):
                lp_s = head_avg_log_probs(qs_, ks_, start, end, segments)
                with torch.no_grad():
                    lp_t = head_avg_log_probs(qt, kt, start, end, segments)
                return (_kl_rows(lp_t, lp_s, start, segments) * rows[:, start:end]).sum()

            part = (
                checkpoint(piece, qs, ks, use_reentrant=False) if torch.is_grad_enabled() and qs.requires_grad else piece(qs, ks)
            )
            total = total + part
    return total / max(len(pairs), 1), {"count": mask.sum()}


def routing_attention_loss(
    student_qk: list,
    teacher_qk: list,
    gates: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk: int = 128,
    segments: Optional[torch.Tensor] = None,
):
    """Student attention rows against the gate-weighted mixture of all teacher layers' attention rows.

    student_qk: for each routed student layer (q, k); teacher_qk: (q, k) for every teacher layer in gate
    order; gates: [Ls_routed, Lt] or [B, Ls_routed, Lt]. KL(mixture || student) per valid query row,
    averaged over student layers."""
    mask = shifted_mask(labels, ignore_index)
    rows = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).float()
    total = 0.0
    seq = labels.size(1)
    for i, (qs, ks) in enumerate(student_qk):
        g = gates[i] if gates.dim() == 2 else gates[:, i]  # [Lt] or [B, Lt]
        for start, end in _chunks(seq, chunk):
            with torch.no_grad():
                t_probs = torch.stack(
                    [head_avg_log_probs(qt.detach(), kt.detach(), start, end, segments).exp() for qt, kt in teacher_qk]
                )  # [Lt,B,r,S]

            def piece(qs_, ks_, g_, t_probs=t_probs, start=start, end=end):
                g_ = g_.to(t_probs.dtype)
                if g_.dim() == 1:
                    mix = torch.einsum("j,jbrs->brs", g_, t_probs)
                else:
                    mix = torch.einsum("bj,jbrs->brs", g_, t_probs)
                lp_t = torch.log(mix.clamp_min(1e-30))
                lp_s = head_avg_log_probs(qs_, ks_, start, end, segments)
                return (_kl_rows(lp_t, lp_s, start, segments) * rows[:, start:end]).sum()

            needs = torch.is_grad_enabled() and (qs.requires_grad or g.requires_grad)
            total = total + (checkpoint(piece, qs, ks, g, use_reentrant=False) if needs else piece(qs, ks, g))
    return total / max(len(student_qk), 1), {"count": mask.sum()}
