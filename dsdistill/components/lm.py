"""LM: the student's next-token cross-entropy on the data's labels."""

from __future__ import annotations

from dsdistill.components.base import Component, Inputs
from dsdistill.losses import lm_loss


class LM(Component):
    name = "lm"
    reads_logits = True

    def compute(self, x: Inputs):
        fused = x.student.fused
        if fused is not None:  # the fused head computed it chunk by chunk
            return fused.lm, {"count": fused.tokens}
        assert x.student.logits is not None, "LM needs the student's logits"
        return lm_loss(x.student.logits, x.labels, ignore_index=x.ignore_index)
