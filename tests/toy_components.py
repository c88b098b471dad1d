"""Toy loss components used by tests/test_trainer_core.py to show what adding a component takes: this
file, plus one `registry.register(...)` line."""

from __future__ import annotations

import torch

from dsdistill.components.base import Component, Inputs, Needs, StudentSide
from dsdistill.losses import shifted_mask

POISON = {"on": False}
"""While set, `Poison` returns a non-finite sum (a fault raised by the objective itself, not by a hook)."""


class HiddenEnergy(Component):
    """Mean square of the student's final hidden state over loss-bearing positions."""

    name = "hidden_energy"

    def needs(self, layers):
        return Needs(student_hidden=True)

    def student_side(self, aux, side: StudentSide):
        return {"hidden_energy": side.hidden[-1].float().pow(2).mean(-1)}  # [B, S]

    def compute(self, x: Inputs):
        mask = shifted_mask(x.labels, x.ignore_index)
        per_position = x.student.side["hidden_energy"][:, :-1]
        return per_position[mask].sum(), {"count": int(mask.sum())}


class Poison(Component):
    name = "poison"

    def compute(self, x: Inputs):
        value = torch.tensor(float("nan") if POISON["on"] else 0.0, device=x.labels.device)
        return value, {"count": int(shifted_mask(x.labels, x.ignore_index).sum())}
