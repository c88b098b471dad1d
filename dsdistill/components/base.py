"""The component protocol: everything the trainer needs to know about one named term of the objective.

A component says what it reads from the two forwards (`needs`), which trainable modules it owns
(`aux_modules`, built once per key inside the student so ZeRO shards, optimises and checkpoints them),
what it computes inside the student's forward (`student_side`: projections must run there, because ZeRO-3
gathers a parameter only inside its module's forward), and its loss (`compute`: a pure function of the
`Inputs`, returning `(sum over its units, metrics)`). Its name, unit and description are its
registration line in `dsdistill/registry.py`. The registry, the captures, the auxiliary modules and the
objective are all derived from these declarations, and so are the diagnostics it reports (`metrics`). Two
names are known elsewhere: `kd` and `lm` share the fused KD+LM head (`dsdistill/heads.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, NamedTuple, Optional

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from dsdistill.needs import Needs

if TYPE_CHECKING:
    from dsdistill.config import LossConfig
    from dsdistill.layers import LayerMap
    from dsdistill.teachers.base import TeacherSignal


MetricReduction = Literal["unit", "micro_batch", "own"]


class ComponentOptions(BaseModel):
    """Base of a component's options model: strict (an unknown key is refused), finite numbers, and one
    docstring per field (what `check` and the README show)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Build:
    """What a component may use to size the modules it owns."""

    loss: "LossConfig"
    layers: "LayerMap"
    student_width: int
    teacher_width: int


@dataclass
class StudentSide:
    """The student forward's tensors, as a component sees them inside `DistillStudent.forward`."""

    hidden: tuple[torch.Tensor, ...]
    """Embeddings, then one hidden state per block."""
    valid: torch.Tensor
    """[B, S] positions that carry loss (position t when labels[:, t+1] does)."""
    teacher_pooled: Optional[torch.Tensor]
    layers: "LayerMap"
    shared: dict[str, Any] = field(default_factory=dict)
    """Results several components use (the router's gates), computed once by whichever asks first."""


class FusedSums(NamedTuple):
    """What the fused KD+LM head computed for one micro-batch (sums over loss-bearing tokens). A named
    tuple: ZeRO-3's module hooks see the tensors inside it."""

    kd: torch.Tensor
    """KD sum x T^2."""
    kl: torch.Tensor
    """KD sum without the T^2 factor."""
    lm: torch.Tensor
    combined: torch.Tensor
    """The differentiable coef_kd * kd + coef_lm * lm (its gradient is the objective's for both terms)."""
    tokens: int
    """Loss-bearing tokens (counted once by the head, so KD and LM need no second device sync)."""
    per_teacher: Optional[dict[str, tuple[torch.Tensor, int]]] = None
    """Several teachers: each one's (KD sum x T^2, positions) over the positions it scored (`kd` is the sum of
    each position's teacher's KD, or of every teacher's by its share)."""


@dataclass
class StudentOutputs:
    """One micro-batch's student forward."""

    logits: Optional[torch.Tensor]
    """[B, S, V] cut to the shared vocabulary (None on the fused path)."""
    fused: Optional[FusedSums]
    """KD and LM from the fused head (None on the full-logits path)."""
    hidden: Optional[tuple[torch.Tensor, ...]]
    side: dict[str, Any]
    """What components computed in the forward (`student_side` results), by their keys."""
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """Captured (q, k) of the layers the components need, 1-based."""
    touch: Optional[torch.Tensor] = None
    """0 x the outputs of modules no computed component reads this step, added to the loss: their parameters
    then get an exact zero gradient (ZeRO-3 would otherwise apply a parameter's last gradient again)."""


@dataclass
class Inputs:
    """Everything a component's `compute` may read for one micro-batch."""

    labels: torch.Tensor
    student: StudentOutputs
    teacher: "TeacherSignal"
    temperature: float
    loss: "LossConfig"
    layers: "LayerMap"
    position_ids: Optional[torch.Tensor] = None
    """[B, S] positions restarting per packed example (None for unpacked rows): which tokens see which."""
    route: Optional[torch.Tensor] = None
    """[B, S] with teachers routed per source: each token's teacher index (-1: every teacher by its share)."""

    @property
    def ignore_index(self) -> int:
        return self.loss.ignore_index


class Component:
    """Base class of a loss component; a subclass overrides what it uses (see the module docstring)."""

    name: str = ""
    """Its registered name (set by the subclass; the registry line gives unit and description)."""
    Options: ClassVar[Optional[type["ComponentOptions"]]] = None
    """Its options model: the config section `loss.<section>`, validated with the rest of the config (None:
    it has no options)."""
    section: ClassVar[str] = ""
    """The `loss.*` section its options live in (default: its name; the router's three terms share one)."""
    reads_logits: bool = False
    """It reads the student's logits (or the fused head's sums)."""
    metrics: dict[str, MetricReduction] = {}
    """Diagnostics its `compute` returns besides "count", by name (unique across components), with how each
    is reduced over a window's micro-batches and the ranks: "unit" (a sum over the component's units, divided
    by the window's count of them, as its loss is), "micro_batch" (a value per micro-batch, averaged) or
    "own" (`compute` gives (sum, count): the sums over the counts, e.g. one teacher's KD over its tokens).
    Train and eval records carry them in `metrics`; the monitor plots each one."""

    def declared_metrics(self, teachers: tuple[str, ...]) -> dict[str, MetricReduction]:
        """`metrics`, for a run whose teachers are named `teachers` (empty: one teacher)."""
        return dict(self.metrics)

    def options_of(self, loss: "LossConfig") -> Any:
        """Its options in this run's config (an instance of `Options`)."""
        return loss.section(self.section or self.name)

    def needs(self, layers: "LayerMap") -> Needs:
        return Needs()

    def aux_modules(self, build: Build) -> dict[str, Callable[[], nn.Module]]:
        """{key: factory} of the trainable modules it owns, in creation order (a key two components
        share is built once)."""
        return {}

    def student_side(self, aux: nn.ModuleDict, side: StudentSide) -> dict[str, Any]:
        """Tensors to compute inside the student's forward from its own modules, by key."""
        return {}

    def compute(self, x: Inputs) -> tuple[torch.Tensor, dict[str, Any]]:
        """(sum over the component's units in this micro-batch, metrics with at least "count")."""
        raise NotImplementedError


def implementation(name: str) -> Component:
    """A new instance of the component registered under `name` (its module is imported on first use)."""
    from dsdistill import registry

    cls: Any = registry.component_class(name)
    return cls()
