"""Next-token cross-entropy of the student."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax math (half precision is upcast, float64 kept)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def shifted_mask(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B, S-1] bool: positions whose next-token label counts (logit t predicts label t+1)."""
    return labels[:, 1:] != ignore_index


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100):
    """Summed next-token CE over valid positions.

    logits: [B, S, V] (any float dtype; computed in fp32); labels: [B, S] token ids, `ignore_index` masked.
    Returns (sum, {"count": valid tokens}).
    """
    target = labels[:, 1:].reshape(-1)
    pred = upcast(logits[:, :-1].reshape(-1, logits.size(-1)))
    total = F.cross_entropy(pred, target, ignore_index=ignore_index, reduction="sum")
    return total, {"count": (target != ignore_index).sum()}  # a tensor: reading it would wait for the device
