"""Layerwise: every student layer (projected) vs its mapped teacher layer (`loss.layerwise_layers`,
uniform by default), both normalised, MSE averaged over layers."""

from __future__ import annotations

from typing import cast

from torch import nn

from dsdistill.components.base import Build, Component, Inputs, Needs, StudentSide
from dsdistill.losses.hidden import layerwise_loss


class Layerwise(Component):
    name = "layerwise"
    options = ("layerwise_layers",)

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_hidden=True)

    def aux_modules(self, build: Build):
        return {
            "layerwise": lambda: nn.ModuleList(
                nn.Linear(build.student_width, build.teacher_width, bias=False) for _ in build.layers.layerwise
            )
        }

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        projections = cast(nn.ModuleList, aux["layerwise"])
        return {"layerwise": [proj(side.hidden[s]) for proj, (s, _) in zip(projections, side.layers.layerwise)]}

    def compute(self, x: Inputs):
        th = x.teacher.hidden_states
        assert th is not None, "the teacher source gave no hidden states"
        pairs = [(p, th[t]) for p, (_, t) in zip(x.student.side["layerwise"], x.layers.layerwise)]
        return layerwise_loss(pairs, x.labels, ignore_index=x.ignore_index)
