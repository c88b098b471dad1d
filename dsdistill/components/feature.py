"""Feature: projected student hidden states vs teacher hidden states on mapped layers (`loss.feature.layers`).

`ProjectedPairs` is what feature and layerwise share: a learned projection student width -> teacher width
per mapped (student, teacher) layer pair, applied inside the student's forward."""

from __future__ import annotations

from typing import Literal, Optional, cast

import torch
from torch import nn

from dsdistill.components.base import Build, Component, ComponentOptions, Inputs, Needs, StudentSide
from dsdistill.losses.hidden import feature_loss

LayerPairs = Optional[list[tuple[int, int]]]
"""(student layer, teacher layer) pairs, 1-based decoder block numbers; -1 means the last block."""


class FeatureOptions(ComponentOptions):
    """`loss.feature`: which hidden states are compared, and how."""

    layers: LayerPairs = None
    """(student, teacher) layer pairs; default [[-1, -1]] (last to last)."""
    metric: Literal["mse", "cosine"] = "mse"
    """Distance between projected student and teacher hidden states."""
    normalize: bool = True
    """Layer-normalise both sides (no learned scale) before the distance."""


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
    Options = FeatureOptions

    def compute(self, x: Inputs):
        o: FeatureOptions = self.options_of(x.loss)
        return feature_loss(self.pairs(x), x.labels, ignore_index=x.ignore_index, metric=o.metric, normalized=o.normalize)
