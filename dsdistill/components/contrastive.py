"""Contrastive: InfoNCE between pooled, projected student and teacher sequence representations, with
the other ranks' teachers as extra negatives (`loss.contrastive_gather`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dsdistill.components.base import Build, Component, Inputs, Needs, StudentSide
from dsdistill.losses import shifted_mask
from dsdistill.losses.contrastive import info_nce, mean_pool


def _gather_teachers(t_emb: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' teacher embeddings (autograd-aware), which of them are valid, and this rank's offset."""
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(t_emb.contiguous())
    mine = valid.to(torch.uint8).contiguous()  # gloo gathers no bool tensors
    flags = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(flags, mine)
    return torch.cat(parts, dim=0), torch.cat(flags, dim=0).bool(), dist.get_rank() * t_emb.size(0)


class Contrastive(Component):
    name = "contrastive"
    options = ("contrastive_dim", "contrastive_temperature", "contrastive_gather")

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_pooled=True)

    def aux_modules(self, build: Build):
        dim = build.loss.contrastive_dim
        return {
            "contrastive_student": lambda: nn.Linear(build.student_width, dim, bias=False),
            "contrastive_teacher": lambda: nn.Linear(build.teacher_width, dim, bias=False),
        }

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        # the teacher's projection is trained with the student, so it too runs inside the student's forward
        pooled = side.teacher_pooled
        return {
            "contrastive": (
                aux["contrastive_student"](mean_pool(side.hidden[-1], side.valid)),
                aux["contrastive_teacher"](pooled) if pooled is not None else None,
            )
        }

    def compute(self, x: Inputs):
        s_emb, t_emb = x.student.side["contrastive"]
        valid = shifted_mask(x.labels, x.ignore_index).any(1)
        negatives, negatives_valid, offset = None, None, 0
        if x.loss.contrastive_gather and dist.is_initialized() and dist.get_world_size() > 1:
            negatives, negatives_valid, offset = _gather_teachers(t_emb, valid)
        return info_nce(
            s_emb,
            t_emb,
            temperature=x.loss.contrastive_temperature,
            valid=valid,
            teacher_negatives=negatives,
            negatives_valid=negatives_valid,
            offset=offset,
        )
