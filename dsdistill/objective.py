"""The distillation objective: the curriculum-weighted sum of the active loss components.

Training and evaluation both go through `component_sums` (per-batch sums and unit counts) and
`objective_value` (weights x means), with weights taken from the curriculum at the same optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsdistill.config import LossConfig
from dsdistill.losses import kd_loss, lm_loss


@dataclass
class Sums:
    """Per-component sums over a set of micro-batches, plus the extra diagnostics."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab: int):
    """Cut both logits to the shared tokenizer vocabulary (embedding matrices are often padded)."""
    if student_logits.size(-1) != vocab:
        student_logits = student_logits[..., :vocab]
    if teacher_logits is not None and teacher_logits.size(-1) != vocab:
        teacher_logits = teacher_logits[..., :vocab]
    return student_logits, teacher_logits


def component_sums(
    names: tuple[str, ...],
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    loss_cfg: LossConfig,
) -> Sums:
    """Every named component on one micro-batch, as sums over its units (differentiable)."""
    out = Sums()
    for name in names:
        if name == "kd":
            total, m = kd_loss(
                student_logits,
                teacher_logits,
                labels,
                temperature=temperature,
                ignore_index=loss_cfg.ignore_index,
                top_k=loss_cfg.kd_top_k,
                top_k_rest=loss_cfg.kd_top_k_rest,
            )
            out.extras["kd_kl"] = m["kl"]
        elif name == "lm":
            total, m = lm_loss(student_logits, labels, ignore_index=loss_cfg.ignore_index)
        else:  # the curriculum only activates implemented components
            raise ValueError(f"component {name!r} is not computed by this version")
        out.sums[name] = total
        out.counts[name] = m["count"]
    return out


def weighted_sum(sums: Sums, *, weights: dict[str, float], normalizers: dict[str, float]) -> torch.Tensor:
    """sum_c w_c * sum_c / N_c: this micro-batch's share of the window objective (differentiable)."""
    terms = [sums.sums[n] * (weights[n] / max(normalizers[n], 1)) for n in sums.sums]
    return torch.stack(terms).sum()


def objective_value(means: dict[str, float], weights: dict[str, float]) -> float:
    """The objective from component means: sum_c w_c * mean_c. Used for both train and eval records."""
    return float(sum(weights[n] * means[n] for n in weights if n in means))
