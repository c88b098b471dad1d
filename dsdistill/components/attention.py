"""Attention: student vs teacher attention distributions on mapped layers (`loss.attention_layers`),
rebuilt from captured post-RoPE queries and keys while both models run their own attention kernels."""

from __future__ import annotations

from dsdistill.components.base import Component, Inputs, Needs
from dsdistill.losses.attention import attention_loss, segments_of


class Attention(Component):
    name = "attention"
    options = ("attention_layers", "attention_chunk")

    def needs(self, layers):
        return Needs(student_qk=frozenset(s for s, _ in layers.attention), teacher_qk=frozenset(t for _, t in layers.attention))

    def compute(self, x: Inputs):
        pairs = [(x.student.qk[si], x.teacher.qk[ti]) for si, ti in x.layers.attention]
        return attention_loss(
            pairs, x.labels, ignore_index=x.ignore_index, chunk=x.loss.attention_chunk, segments=segments_of(x.position_ids)
        )
