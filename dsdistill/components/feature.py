"""Feature: projected student hidden states vs teacher hidden states on mapped layers (`loss.feature_layers`).

`ProjectedPairs` is what feature and layerwise share: a learned projection student width -> teacher width
per mapped (student, teacher) layer pair, applied inside the student's forward."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from dsdistill.components.base import Build, Component, Inputs, Needs, StudentSide
from dsdistill.losses.hidden import feature_loss


class ProjectedPairs(Component):
    """Compares the student's projected hidden state with the teacher's on the pairs `LayerMap.<name>`."""

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_hidden=True)

    def aux_modules(self, build: Build):
        pairs = getattr(build.layers, self.name)
        return {self.name: lambda: nn.ModuleList(nn.Linear(build.student_width, build.teacher_width, bias=False) for _ in pairs)}

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        projections = cast(nn.ModuleList, aux[self.name])
        return {self.name: [proj(side.hidden[s]) for proj, (s, _) in zip(projections, getattr(side.layers, self.name))]}

    def pairs(self, x: Inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(projected student hidden state, teacher hidden state) for every mapped pair."""
        th = x.teacher.hidden_states
        assert th is not None, "the teacher source gave no hidden states"
        return [(p, th[t]) for p, (_, t) in zip(x.student.side[self.name], getattr(x.layers, self.name))]


class Feature(ProjectedPairs):
    name = "feature"
    options = ("feature_layers", "feature_metric", "feature_normalize")

    def compute(self, x: Inputs):
        return feature_loss(
            self.pairs(x),
            x.labels,
            ignore_index=x.ignore_index,
            metric=x.loss.feature_metric,
            normalized=x.loss.feature_normalize,
        )
