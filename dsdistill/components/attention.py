"""Attention: student vs teacher attention distributions on mapped layers (`loss.attention.layers`),
rebuilt from captured post-RoPE queries and keys while both models run their own attention kernels."""

from __future__ import annotations

from pydantic import Field

from dsdistill.components.base import Component, ComponentOptions, Inputs, Needs
from dsdistill.components.feature import LayerPairs
from dsdistill.losses.attention import attention_loss, segments_of


class AttentionOptions(ComponentOptions):
    """`loss.attention`: which layers' attention is compared (the router's alignment term uses them too)."""

    layers: LayerPairs = None
    """(student, teacher) layer pairs; default [[-1, -1]]."""
    chunk: int = Field(128, ge=1, le=1 << 20)
    """Query rows per chunk when rebuilding attention distributions (bounds memory)."""


class Attention(Component):
    name = "attention"
    Options = AttentionOptions

    def needs(self, layers):
        return Needs(student_qk=frozenset(s for s, _ in layers.attention), teacher_qk=frozenset(t for _, t in layers.attention))

    def compute(self, x: Inputs):
        pairs = [(x.student.qk[si], x.teacher.qk[ti]) for si, ti in x.layers.attention]
        return attention_loss(
            pairs,
            x.labels,
            ignore_index=x.ignore_index,
            chunk=self.options_of(x.loss).chunk,
            segments=segments_of(x.position_ids),
        )
