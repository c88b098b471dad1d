"""Toy loss components used by tests/test_trainer_core.py to show what adding a component takes: this
file, plus one `registry.register(...)` line. `HiddenEnergy` has its own options (`loss.hidden_energy`)
and a diagnostic (`hidden_peak`) that reaches the records and the monitor."""

from __future__ import annotations

import torch
from pydantic import Field

from dsdistill.components.base import Component, ComponentOptions, Inputs, Needs, StudentSide
from dsdistill.losses import shifted_mask

POISON = {"on": False}
"""While set, `Poison` returns a non-finite sum (a fault raised by the objective itself, not by a hook)."""


class HiddenEnergyOptions(ComponentOptions):
    """`loss.hidden_energy`."""

    power: float = Field(2.0, gt=0)
    """Exponent of |h| averaged over the hidden width."""


class HiddenEnergy(Component):
    """Mean of |h|^power of the student's final hidden state over loss-bearing positions; reports the
    micro-batch's largest per-position value as `hidden_peak`."""

    name = "hidden_energy"
    Options = HiddenEnergyOptions
    metrics = {"hidden_peak": "micro_batch"}

    def needs(self, layers):
        return Needs(student_hidden=True)

    def student_side(self, aux, side: StudentSide):
        return {"hidden_energy": side.hidden[-1].float()}  # [B, S, D]

    def compute(self, x: Inputs):
        power = self.options_of(x.loss).power
        mask = shifted_mask(x.labels, x.ignore_index)
        per_position = x.student.side["hidden_energy"][:, :-1].abs().pow(power).mean(-1)[mask]
        return per_position.sum(), {"count": int(mask.sum()), "hidden_peak": per_position.detach().max()}


class Poison(Component):
    name = "poison"

    def compute(self, x: Inputs):
        value = torch.tensor(float("nan") if POISON["on"] else 0.0, device=x.labels.device)
        return value, {"count": int(shifted_mask(x.labels, x.ignore_index).sum())}
