"""KD: the divergence between the temperature-softened teacher and student distributions, x T^2 (tv: x 1)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from dsdistill.components.base import Component, ComponentOptions, Inputs, Needs
from dsdistill.losses import kd_loss
from dsdistill.losses.kd import DIVERGENCES
from dsdistill.teachers.base import DenseLogits


class KDOptions(ComponentOptions):
    """`loss.kd`: how the teacher's and the student's token distributions are compared."""

    divergence: str = "forward_kl"
    """Divergence between teacher and student token distributions at temperature T (x T^2 in the objective,
    except tv, which is bounded by 1 and enters unscaled): forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, tv."""
    beta: float = Field(0.5, ge=0, le=1)
    """jsd: mixture weight; 0 is forward KL, 1 is reverse KL, 0.5 the symmetric JSD."""
    alpha: float = Field(0.1, ge=0, le=1)
    """skew_kl: KL(teacher || alpha * teacher + (1 - alpha) * student); skew_rkl: KL(student || alpha *
    student + (1 - alpha) * teacher)."""
    top_k: Optional[int] = Field(None, ge=1)
    """If set, KD compares only top-k tokens per position, renormalised: the teacher's for forward_kl, the
    student's for reverse_kl and skew_rkl, the union of both for jsd, skew_kl and tv."""
    top_k_rest: bool = False
    """With `top_k`: add a bucket holding the remaining probability mass on both sides."""
    top_k_support: Literal["auto", "teacher"] = "auto"
    """With `top_k`: `auto` compares each divergence on the support it needs (above); `teacher` always on the
    teacher's top-k, which is what an offline cache holds (then every divergence but forward_kl needs
    `top_k_rest`, or the student's mass outside the teacher's top-k would be ignored)."""

    @field_validator("divergence")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DIVERGENCES:
            raise ValueError(f"expected one of {', '.join(DIVERGENCES)}")
        return value

    @model_validator(mode="after")
    def _support_sees_the_student(self) -> "KDOptions":
        if self.top_k_support == "teacher" and self.divergence != "forward_kl" and not self.top_k_rest:
            raise ValueError(
                f"top_k_support 'teacher' with {self.divergence} needs top_k_rest: true (else the student's "
                "mass outside the teacher's top-k is ignored)"
            )
        return self


class KD(Component):
    name = "kd"
    reads_logits = True
    metrics = {"kd_kl": "unit"}  # the divergence without the T^2 factor, per loss-bearing token
    Options = KDOptions

    def needs(self, layers):
        return Needs(teacher_logits=True)

    def declared_metrics(self, teachers: tuple[str, ...]) -> dict:
        # several teachers: each one's KD (x T^2) per loss-bearing token, `kd` being their share-weighted sum
        return {**self.metrics, **{f"kd.{name}": "own" for name in teachers}}

    def compute(self, x: Inputs):
        fused = x.student.fused
        if fused is not None:  # the fused head computed it chunk by chunk
            per = {f"kd.{n}": v for n, v in (fused.per_teacher or {}).items()}
            return fused.kd, {"count": fused.tokens, "kd_kl": fused.kl, **per}
        mixture = x.teacher.mixture
        if mixture is None:
            assert x.teacher.logits is not None, "KD needs the teacher's logits"
            return self._one(x, x.teacher.logits)
        total, kl, metrics, counted = None, None, {}, {}
        for i, (name, share, dist) in enumerate(mixture.members):
            assert isinstance(dist, DenseLogits), f"teacher {name}: KD on full logits needs its logits"
            own, own_count = 0.0, 0
            for group, labels, weight in _groups(x, i, share):  # the tokens routed to it, and those shared by all
                t, m = self._one(x, dist.logits, labels)
                total = t * weight if total is None else total + t * weight
                kl = m["kd_kl"] * weight if kl is None else kl + m["kd_kl"] * weight
                own, own_count = own + t.detach(), own_count + m["count"]
                counted[group] = m["count"]  # each group's tokens, once
            metrics[f"kd.{name}"] = (own, own_count)
        return total, {"count": sum(counted.values()), "kd_kl": kl, **metrics}

    def _one(self, x: Inputs, teacher_logits, labels=None):
        c: KDOptions = self.options_of(x.loss)
        assert x.student.logits is not None, "KD needs the student's logits"
        total, m = kd_loss(
            x.student.logits,
            teacher_logits,
            x.labels if labels is None else labels,
            temperature=x.temperature,
            ignore_index=x.ignore_index,
            top_k=c.top_k,
            top_k_rest=c.top_k_rest,
            top_k_support=c.top_k_support,
            divergence_kind=c.divergence,
            beta=c.beta,
            alpha=c.alpha,
        )
        return total, {"count": m["count"], "kd_kl": m["kl"]}


def _groups(x: Inputs, member: int, share: float):
    """(group, labels keeping only the group's targets, weight) of teacher `member`'s KD groups: every token by its
    share, or with routed sources the tokens routed to it (weight 1) and the unrouted ones (its share)."""
    if x.route is None:
        yield -1, x.labels, share
        return
    for wanted, weight in ((member, 1.0), (-1, share)):
        keep = x.route == wanted
        yield wanted, x.labels.masked_fill(~keep, x.ignore_index), weight
