"""Contrastive: InfoNCE between pooled, projected student and teacher sequence representations, with
the other ranks' teachers as extra negatives (`loss.contrastive.gather`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from dsdistill.components.base import Build, Component, ComponentOptions, Inputs, Needs, StudentSide
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


class ContrastiveOptions(ComponentOptions):
    """`loss.contrastive`: the projection heads and the InfoNCE."""

    dim: int = Field(128, ge=1, le=1 << 16)
    """Width of the contrastive projection heads."""
    temperature: float = Field(0.1, gt=0)
    """InfoNCE temperature."""
    gather: bool = True
    """Use the other ranks' teacher embeddings as extra negatives."""


class Contrastive(Component):
    name = "contrastive"
    Options = ContrastiveOptions

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_pooled=True)

    def aux_modules(self, build: Build):
        dim = self.options_of(build.loss).dim
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
        o: ContrastiveOptions = self.options_of(x.loss)
        if o.gather and dist.is_initialized() and dist.get_world_size() > 1:
            negatives, negatives_valid, offset = _gather_teachers(t_emb, valid)
        return info_nce(
            s_emb,
            t_emb,
            temperature=o.temperature,
            valid=valid,
            teacher_negatives=negatives,
            negatives_valid=negatives_valid,
            offset=offset,
        )
