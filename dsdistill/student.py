"""The module the student engine trains: the HF causal LM plus the distillation-only parts.

Projections (student width -> teacher width), contrastive heads and the teacher-layer router are trained
with the student and saved in its checkpoints, but they are not part of the exported model (`.model`).
Under ZeRO-3 every parameter is gathered only inside its module's forward, so all of them are applied in
`DistillStudent.forward`; the losses themselves stay pure functions on the returned tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from dsdistill.config import LossConfig
from dsdistill.errors import ConfigError
from dsdistill.heads import FusedArgs, SwitchHead
from dsdistill.losses.contrastive import mean_pool

HIDDEN_COMPONENTS = ("feature", "layerwise", "contrastive", "routing_feature", "routing_load_balance", "routing_attention_alignment")
ROUTER_COMPONENTS = ("routing_feature", "routing_load_balance", "routing_attention_alignment")


def _resolve(layer: int, n: int, field_name: str, side: str) -> int:
    value = n if layer == -1 else layer
    if not 1 <= value <= n:
        raise ConfigError(f"{field_name}: {side} layer {layer} is out of range; the {side} has layers 1..{n} (or -1 for the last)")
    return value


def uniform_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i (1-based) -> teacher layer round(i * Lt / Ls): the last maps to the last."""
    return [(i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]


@dataclass
class LayerPlan:
    """Which layers each hidden-state and attention component compares (1-based block numbers)."""

    n_student: int
    n_teacher: int
    feature: list[tuple[int, int]] = field(default_factory=list)
    layerwise: list[tuple[int, int]] = field(default_factory=list)
    attention: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, loss: LossConfig, n_student: int, n_teacher: int) -> "LayerPlan":
        def pairs(value, default, name):
            raw = default if value is None else value
            return [(_resolve(s, n_student, name, "student"), _resolve(t, n_teacher, name, "teacher")) for s, t in raw]

        return cls(
            n_student=n_student,
            n_teacher=n_teacher,
            feature=pairs(loss.feature_layers, [(-1, -1)], "loss.feature_layers"),
            layerwise=pairs(loss.layerwise_layers, uniform_map(n_student, n_teacher), "loss.layerwise_layers"),
            attention=pairs(loss.attention_layers, [(-1, -1)], "loss.attention_layers"),
        )

    @property
    def routed_attention_students(self) -> list[int]:
        return sorted({s for s, _ in self.attention})


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


class DistillStudent(nn.Module):
    """HF causal LM (`.model`) + projections, contrastive heads and router (`.aux`)."""

    def __init__(self, model: nn.Module, *, loss: LossConfig, plan: LayerPlan, teacher_width: int, components: set[str],
                 seed: int = 0, fused: bool = False):
        super().__init__()
        self.model = model
        self.fused = fused
        if fused:
            model.lm_head = SwitchHead(model.lm_head, mode="fused")
        self.plan = plan
        self.components = set(components)
        width = model.config.hidden_size
        self.aux = nn.ModuleDict()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 1)  # same initial projections on every rank
        if "feature" in components:
            self.aux["feature"] = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in plan.feature)
        if "layerwise" in components:
            self.aux["layerwise"] = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in plan.layerwise)
        if "contrastive" in components:
            self.aux["contrastive_student"] = nn.Linear(width, loss.contrastive_dim, bias=False)
            self.aux["contrastive_teacher"] = nn.Linear(teacher_width, loss.contrastive_dim, bias=False)
        if self.components & set(ROUTER_COMPONENTS):
            self.aux["router"] = Router(plan.n_student, plan.n_teacher, width, loss.router_conditioned)
            if "routing_feature" in components:
                self.aux["routing_proj"] = nn.ModuleList(nn.Linear(width, teacher_width, bias=False) for _ in range(plan.n_student))
        torch.random.set_rng_state(gen_state)
        self.needs_hidden = bool(self.components & set(HIDDEN_COMPONENTS))

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, *, valid: Optional[torch.Tensor] = None,
                teacher_pooled: Optional[torch.Tensor] = None, fused: Optional[FusedArgs] = None) -> dict:
        """Student logits (or, fused, the weighted KD+LM scalar and sums), hidden states and every
        projection the active components need.

        valid: [B, S] positions that count (for pooling); teacher_pooled: [B, Dt] mean-pooled final teacher
        hidden state (for the contrastive teacher head); fused: the fused KD+LM inputs."""
        if self.fused:
            self.model.lm_head.pending = fused
        out = self.model(input_ids=input_ids, output_hidden_states=self.needs_hidden)
        if self.fused and fused is not None:
            res: dict = {"fused": (out.logits, self.model.lm_head.last_metrics)}
        else:
            res = {"logits": out.logits}
        if not self.needs_hidden:
            return res
        hidden = out.hidden_states  # embeddings, then one entry per block
        res["hidden"] = hidden
        if "feature" in self.aux:
            res["feature"] = [proj(hidden[s]) for proj, (s, _) in zip(self.aux["feature"], self.plan.feature)]
        if "layerwise" in self.aux:
            res["layerwise"] = [proj(hidden[s]) for proj, (s, _) in zip(self.aux["layerwise"], self.plan.layerwise)]
        if "contrastive_student" in self.aux:
            mask = valid if valid is not None else torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            res["contrastive"] = (self.aux["contrastive_student"](mean_pool(hidden[-1], mask)),
                                  self.aux["contrastive_teacher"](teacher_pooled) if teacher_pooled is not None else None)
        if "router" in self.aux:
            pooled = None
            if self.aux["router"].cond is not None:
                mask = valid if valid is not None else torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
                pooled = [mean_pool(hidden[i], mask) for i in range(1, self.plan.n_student + 1)]
            res["gates"] = self.aux["router"](pooled)
            if "routing_proj" in self.aux:
                res["routing_feature"] = [proj(hidden[i + 1]) for i, proj in enumerate(self.aux["routing_proj"])]
        return res


ATTENTION_COMPONENTS = ("attention", "routing_attention_alignment")
"""Components that need captured queries and keys."""


def capture_layers(layers: LayerPlan, active) -> tuple[list[int], list[int]]:
    """(student layers, teacher layers), 1-based, whose q/k the active attention components need."""
    s_layers, t_layers = set(), set()
    if "attention" in active:
        s_layers |= {si for si, _ in layers.attention}
        t_layers |= {ti for _, ti in layers.attention}
    if "routing_attention_alignment" in active:
        s_layers |= set(layers.routed_attention_students)
        t_layers |= set(range(1, layers.n_teacher + 1))
    return sorted(s_layers), sorted(t_layers)
