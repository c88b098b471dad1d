"""KD: the divergence between the temperature-softened teacher and student distributions, x T^2 (tv: x 1)."""

from __future__ import annotations

from dsdistill.components.base import Component, Inputs, Needs
from dsdistill.losses import kd_loss


class KD(Component):
    name = "kd"
    reads_logits = True
    metrics = {"kd_kl": "unit"}  # the divergence without the T^2 factor, per loss-bearing token
    options = ("kd_divergence", "kd_beta", "kd_alpha", "kd_top_k", "kd_top_k_rest", "kd_top_k_support")

    def needs(self, layers):
        return Needs(teacher_logits=True)

    def compute(self, x: Inputs):
        fused = x.student.fused
        if fused is not None:  # the fused head computed it chunk by chunk
            return fused.kd, {"count": fused.tokens, "kd_kl": fused.kl}
        c = x.loss
        assert x.student.logits is not None and x.teacher.logits is not None, "KD needs both distributions"
        total, m = kd_loss(
            x.student.logits,
            x.teacher.logits,
            x.labels,
            temperature=x.temperature,
            ignore_index=x.ignore_index,
            top_k=c.kd_top_k,
            top_k_rest=c.kd_top_k_rest,
            top_k_support=c.kd_top_k_support,
            divergence_kind=c.kd_divergence,
            beta=c.kd_beta,
            alpha=c.kd_alpha,
        )
        return total, {"count": m["count"], "kd_kl": m["kl"]}
