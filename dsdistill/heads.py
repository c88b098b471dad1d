"""`SwitchHead`: stands in for a causal LM's lm_head (same weight parameter) so the fused KD+LM loss runs
inside the head's own forward.

Running inside a module forward keeps DeepSpeed ZeRO-3 semantics intact: the engine gathers the head's
weight for the forward and again for the backward (its hooks see the head's output), exactly as for the
plain Linear it replaces. Modes:
- "logits": a plain linear layer (the default; used by generation and export paths);
- "hidden": returns its input (the teacher runs only up to its final hidden state);
- "fused":  consumes `pending` (a `FusedArgs`) and returns the differentiable weighted KD+LM scalar in
            place of logits; the component sums are left in `last_metrics`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dsdistill.losses.fused import KDOptions, fused_kd_lm


@dataclass
class FusedArgs:
    labels: torch.Tensor
    teacher_hidden: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]
    coef_kd: float
    coef_lm: float
    options: KDOptions
    vocab: int
    ignore_index: int = -100


class SwitchHead(nn.Module):
    def __init__(self, linear: nn.Linear, mode: str = "logits"):
        super().__init__()
        self.weight = linear.weight  # the same Parameter object (keeps ZeRO partitioning and tying)
        self.bias = linear.bias
        self.mode = mode
        self.pending: Optional[FusedArgs] = None
        self.last_metrics: Optional[dict] = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "hidden":
            return hidden
        args, self.pending = self.pending, None
        if self.mode == "logits" or args is None:
            return F.linear(hidden, self.weight, self.bias)
        if self.bias is not None:
            raise ValueError("fused KD does not support an lm_head with a bias; set loss.fused_logits: false")
        combined, metrics = fused_kd_lm(hidden, self.weight[: args.vocab], args.teacher_hidden,
                                        None if args.teacher_weight is None else args.teacher_weight[: args.vocab],
                                        args.labels, coef_kd=args.coef_kd, coef_lm=args.coef_lm, options=args.options,
                                        ignore_index=args.ignore_index)
        self.last_metrics = metrics
        return combined


def fused_supported(model: nn.Module) -> Optional[str]:
    """None if the model's logits are exactly lm_head(final hidden state); else the reason they are not."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales its logits"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, (nn.Linear, SwitchHead)):
        return "the model has no linear lm_head"
    if getattr(head, "bias", None) is not None:
        return "the lm_head has a bias"
    return None


class PassThrough(nn.Module):
    """Replaces the teacher's lm_head: the teacher then returns its final hidden state as `logits`."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def full_weight(weight: torch.Tensor) -> torch.Tensor:
    """A full, detached copy of a (possibly ZeRO-3-partitioned) weight: gathered once, then released."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.data.detach().clone()
    return weight.detach()
