"""Feature: projected student hidden states vs teacher hidden states on mapped layers (`loss.feature_layers`)."""

from __future__ import annotations

from typing import cast

from torch import nn

from dsdistill.components.base import Build, Component, Inputs, Needs, StudentSide
from dsdistill.losses.hidden import feature_loss


class Feature(Component):
    name = "feature"
    options = ("feature_layers", "feature_metric", "feature_normalize")

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_hidden=True)

    def aux_modules(self, build: Build):
        # one projection student width -> teacher width per mapped pair
        return {
            "feature": lambda: nn.ModuleList(
                nn.Linear(build.student_width, build.teacher_width, bias=False) for _ in build.layers.feature
            )
        }

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        projections = cast(nn.ModuleList, aux["feature"])
        return {"feature": [proj(side.hidden[s]) for proj, (s, _) in zip(projections, side.layers.feature)]}

    def compute(self, x: Inputs):
        th = x.teacher.hidden_states
        assert th is not None, "the teacher source gave no hidden states"
        pairs = [(p, th[t]) for p, (_, t) in zip(x.student.side["feature"], x.layers.feature)]
        return feature_loss(
            pairs, x.labels, ignore_index=x.ignore_index, metric=x.loss.feature_metric, normalized=x.loss.feature_normalize
        )
