"""The learned teacher-layer router and its three terms: routed feature, load balance and attention
alignment. The router (soft gates over teacher layers for every student layer) is one module shared by
the three; whichever runs first in the student's forward computes the gates for all."""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import nn

from dsdistill.components.base import Build, Component, ComponentOptions, Inputs, Needs, StudentSide
from dsdistill.losses import shifted_mask
from dsdistill.losses.attention import routing_attention_loss, segments_of
from dsdistill.losses.contrastive import mean_pool
from dsdistill.losses.hidden import gate_usage, load_balance_loss, routing_feature_loss


class Router(nn.Module):
    """Soft gates over teacher layers for every student layer: softmax of learned logits, optionally
    shifted by a linear function of the student layer's mean-pooled hidden state."""

    def __init__(self, n_student: int, n_teacher: int, student_width: int, conditioned: bool):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_student, n_teacher))
        self.cond = nn.Linear(student_width, n_teacher) if conditioned else None
        if self.cond is not None:
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)

    def forward(self, pooled: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """[Ls, Lt] gates (unconditioned) or [B, Ls, Lt] (conditioned on pooled student states)."""
        if self.cond is None or pooled is None:
            return torch.softmax(self.logits.float(), dim=-1)
        shift = torch.stack([self.cond(p) for p in pooled], dim=1)  # [B, Ls, Lt]
        return torch.softmax((self.logits.unsqueeze(0) + shift).float(), dim=-1)


class RouterOptions(ComponentOptions):
    """`loss.router`: the router the three routing terms share."""

    conditioned: bool = False
    """Condition each student layer's router gates on its mean-pooled hidden state."""


class RouterTerm(Component):
    """A term of the router: its options are the shared `loss.router` section."""

    Options = RouterOptions
    section = "router"


def _router(build: Build):
    conditioned = build.loss.section("router").conditioned
    return lambda: Router(build.layers.n_student, build.layers.n_teacher, build.student_width, conditioned)


def _gates(aux: nn.ModuleDict, side: StudentSide) -> dict:
    if "gates" not in side.shared:
        router = cast(Router, aux["router"])
        pooled = None
        if router.cond is not None:
            pooled = [mean_pool(side.hidden[i], side.valid) for i in range(1, side.layers.n_student + 1)]
        side.shared["gates"] = router(pooled)
    return {"gates": side.shared["gates"]}


def _usage(x: Inputs) -> torch.Tensor:
    """Mean gate per teacher layer, once per micro-batch whichever router term asks."""
    if "gate_usage" not in x.student.side:
        x.student.side["gate_usage"] = gate_usage(x.student.side["gates"])
    return x.student.side["gate_usage"]


class RoutingFeature(RouterTerm):
    name = "routing_feature"

    def needs(self, layers):
        return Needs(student_hidden=True, teacher_hidden=True)

    def aux_modules(self, build: Build):
        return {
            "router": _router(build),
            "routing_proj": lambda: nn.ModuleList(
                nn.Linear(build.student_width, build.teacher_width, bias=False) for _ in range(build.layers.n_student)
            ),
        }

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        return {
            **_gates(aux, side),
            "routing_feature": [proj(side.hidden[i + 1]) for i, proj in enumerate(cast(nn.ModuleList, aux["routing_proj"]))],
        }

    def compute(self, x: Inputs):
        th = x.teacher.hidden_states
        assert th is not None, "the teacher source gave no hidden states"
        total, m = routing_feature_loss(
            x.student.side["routing_feature"], list(th[1:]), x.student.side["gates"], x.labels, ignore_index=x.ignore_index
        )
        return total, {**m, "gate_usage": _usage(x)}


class LoadBalance(RouterTerm):
    name = "routing_load_balance"

    def needs(self, layers):
        return Needs(student_hidden=True)

    def aux_modules(self, build: Build):
        return {"router": _router(build)}

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        return _gates(aux, side)

    def compute(self, x: Inputs):
        value, m = load_balance_loss(x.student.side["gates"])
        # a micro-batch without loss-bearing tokens is no unit (decided on the device: no sync)
        carries = shifted_mask(x.labels, x.ignore_index).any()
        return value * carries, {"count": carries.to(torch.long), "gate_usage": _usage(x)}


class AttentionAlignment(RouterTerm):
    """Uses `loss.attention`'s layers (through the layer map) and chunk besides the router's options."""

    name = "routing_attention_alignment"

    def needs(self, layers):
        return Needs(
            student_hidden=True,
            student_qk=frozenset(layers.routed_attention_students),
            teacher_qk=frozenset(range(1, layers.n_teacher + 1)),
        )

    def aux_modules(self, build: Build):
        return {"router": _router(build)}

    def student_side(self, aux: nn.ModuleDict, side: StudentSide):
        return _gates(aux, side)

    def compute(self, x: Inputs):
        rows = [si - 1 for si in x.layers.routed_attention_students]
        gates = x.student.side["gates"]
        gates = gates[rows] if gates.dim() == 2 else gates[:, rows]
        teacher_qk = [x.teacher.qk[j] for j in range(1, x.layers.n_teacher + 1)]
        student_qk = [x.student.qk[si] for si in x.layers.routed_attention_students]
        total, m = routing_attention_loss(
            student_qk,
            teacher_qk,
            gates,
            x.labels,
            ignore_index=x.ignore_index,
            chunk=x.loss.section("attention").chunk,
            segments=segments_of(x.position_ids),
        )
        return total, {**m, "gate_usage": _usage(x)}
