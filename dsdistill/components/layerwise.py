"""Layerwise: every student layer (projected) vs its mapped teacher layer (`loss.layerwise_layers`,
uniform by default), both normalised, MSE averaged over layers."""

from __future__ import annotations

from dsdistill.components.base import Inputs
from dsdistill.components.feature import ProjectedPairs
from dsdistill.losses.hidden import layerwise_loss


class Layerwise(ProjectedPairs):
    name = "layerwise"
    options = ("layerwise_layers",)

    def compute(self, x: Inputs):
        return layerwise_loss(self.pairs(x), x.labels, ignore_index=x.ignore_index)
