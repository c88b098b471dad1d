"""Layerwise: every student layer (projected) vs its mapped teacher layer (`loss.layerwise.layers`,
uniform by default), both normalised, MSE averaged over layers."""

from __future__ import annotations

from dsdistill.components.base import ComponentOptions, Inputs
from dsdistill.components.feature import LayerPairs, ProjectedPairs
from dsdistill.losses.hidden import layerwise_loss


class LayerwiseOptions(ComponentOptions):
    """`loss.layerwise`: which layers are compared."""

    layers: LayerPairs = None
    """(student, teacher) layer pairs; default: every student layer, uniformly mapped."""


class Layerwise(ProjectedPairs):
    name = "layerwise"
    Options = LayerwiseOptions

    def compute(self, x: Inputs):
        return layerwise_loss(self.pairs(x), x.labels, ignore_index=x.ignore_index)
