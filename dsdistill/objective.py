"""The distillation objective: the curriculum-weighted sum of the active components, each averaged over
its own unit (loss-bearing tokens, sequences or micro-batches) counted over a whole accumulation window
on all ranks. Training and evaluation both count units with `count_units` and divide by them: one
normaliser path. The coefficients (curriculum weight / unit count) are set here alone, for the fused
head and the other components alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Optional

import numpy as np
import torch

from dsdistill import registry
from dsdistill.components.base import Component, Inputs, Needs, implementation
from dsdistill.curriculum import Curriculum
from dsdistill.layers import LayerMap
from dsdistill.losses import shifted_mask

UNITS = ("token", "pair", "sequence", "micro_batch")


def count_units(labels: torch.Tensor, ignore_index: int, pairs: Optional[torch.Tensor] = None) -> dict[str, int]:
    """Units in a micro-batch: loss-bearing tokens, those with a paired teacher position (`pairs`: a
    cross-tokenizer batch's `x_pos`, -1 where none; without it every loss-bearing token), sequences with any,
    and the micro-batch itself if it has any (the unit of per-batch terms such as the router's load balance).
    Counted on the host from the loader's batch (no device sync); labels already on a device are read back once."""
    lab = labels.detach().cpu().numpy()  # a no-op view for the loader's host tensors
    mask = lab[:, 1:] != ignore_index
    paired = int(mask.sum()) if pairs is None else int((mask & (pairs.numpy()[:, :-1] >= 0)).sum())
    return {"token": int(mask.sum()), "pair": paired, "sequence": int(mask.any(1).sum()), "micro_batch": int(mask.any())}


def host_positions(labels: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Flat indices b * S + t of the positions t whose next token carries loss, read from the loader's host
    batch: what the fused head gathers by (a boolean mask on the device would make the host wait for its
    count). None for labels already on an accelerator."""
    if labels.device.type != "cpu":
        return None
    lab = labels.numpy()
    b, t = np.nonzero(lab[:, 1:] != ignore_index)
    return torch.from_numpy(b * lab.shape[1] + t)


def shifted_valid(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[B, S] positions that carry loss (position t when labels[:, t+1] does): what pooling averages over."""
    return torch.cat([shifted_mask(labels, ignore_index), torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)


@dataclass(frozen=True)
class StepContext:
    """The curriculum at one optimizer step: evaluated once per window (and per evaluation)."""

    step: int
    weights: dict[str, float]
    temperature: float
    on_policy: float = 0.0
    """Fraction of the window's sequences whose completions the student samples."""


@dataclass
class Sums:
    """One micro-batch's component sums (tensors on the device) and diagnostics."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    """Everything components reported besides their count (`kd_kl`, `gate_usage`)."""
    fused: Optional[torch.Tensor] = None
    """Fused path: the differentiable KD+LM scalar (its kd/lm `sums` then carry no gradient)."""
    touch: Optional[torch.Tensor] = None
    """0 x the outputs of the student's modules no computed component used (see `DistillStudent.forward`)."""


class Objective:
    def __init__(
        self,
        curriculum: Curriculum,
        *,
        total_steps: int,
        layers: LayerMap,
        names: Optional[tuple[str, ...]] = None,
        teachers: tuple[str, ...] = (),
    ):
        """`names`: the components computed (default: the curriculum's active ones; evaluation adds lm,
        which perplexity needs, at weight 0 when it is not scheduled). `teachers`: the names of several
        teachers (whose own KD the records carry), or empty for one."""
        self.curriculum = curriculum
        self.teachers = teachers
        self.total_steps = total_steps
        self.names: tuple[str, ...] = curriculum.active if names is None else names
        self.components: dict[str, Component] = {n: implementation(n) for n in self.names}
        self.needs: Needs = reduce(lambda a, b: a | b, (c.needs(layers) for c in self.components.values()), Needs())
        self._needs_of: dict[tuple[str, ...], Needs] = {}

    def context(self, *, step: int) -> StepContext:
        """Weights and temperature at optimizer step `step` (required: there is no default position)."""
        return StepContext(
            step=step,
            weights=self.curriculum.weights_at(step=step, total_steps=self.total_steps),
            temperature=self.curriculum.temperature_at(step=step, total_steps=self.total_steps),
            on_policy=self.curriculum.on_policy_at(step=step, total_steps=self.total_steps),
        )

    def live(self, ctx: StepContext) -> tuple[str, ...]:
        """The components a training step computes: those weighted above 0 at its step. A component at weight
        0 adds nothing to the objective or its gradient, so its loss, its captures and the teacher outputs
        only it reads are skipped (evaluation computes every component, for the record)."""
        return tuple(n for n in self.names if ctx.weights.get(n, 0.0) != 0.0)

    def needs_of(self, names: tuple[str, ...], layers: LayerMap) -> Needs:
        """What the two forwards must produce for `names` (worked out once per set of names)."""
        if names not in self._needs_of:
            self._needs_of[names] = reduce(lambda a, b: a | b, (self.components[n].needs(layers) for n in names), Needs())
        return self._needs_of[names]

    def normalizers(self, units: dict[str, float]) -> dict[str, float]:
        """Each component's unit count (at least 1) from the units of a window or an evaluation."""
        return {n: max(units[registry.COMPONENTS[n].unit], 1.0) for n in self.names}

    def coefficients(self, ctx: StepContext, normalizers: dict[str, float]) -> dict[str, float]:
        """w_c / N_c: what each component's sum is multiplied by in the objective (and in the fused head)."""
        return {n: ctx.weights.get(n, 0.0) / normalizers[n] for n in self.names}

    def sums(self, x: Inputs, *, names: Optional[tuple[str, ...]] = None) -> Sums:
        """The components `names` (default: all of `self.names`) on one micro-batch."""
        out = Sums(touch=x.student.touch)
        for name in self.names if names is None else names:
            total, metrics = self.components[name].compute(x)
            if not torch.is_tensor(total):
                total = torch.tensor(float(total), device=x.labels.device)
            out.sums[name] = total
            out.extras.update((k, v) for k, v in metrics.items() if k != "count")
        if x.student.fused is not None:
            out.fused = x.student.fused.combined
        return out

    def loss(self, sums: Sums, coefficients: dict[str, float]) -> torch.Tensor:
        """sum_c (w_c / N_c) * sum_c: this micro-batch's share of the window objective (differentiable)."""
        terms = [sums.sums[n] * coefficients[n] for n in sums.sums if coefficients[n] != 0.0]
        if sums.fused is not None:
            # fused KD/LM: the value comes from their exact sums above; the gradient from the fused scalar,
            # whose coefficients are the same (its value is added as 0)
            terms.append(sums.fused - sums.fused.detach())
        if sums.touch is not None:
            terms.append(sums.touch)  # exactly 0 with exact zero gradients for modules nothing else used
        if not terms:
            return next(iter(sums.sums.values())) * 0.0
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def metric_specs(self, names: Optional[tuple[str, ...]] = None) -> dict[str, tuple[str, str]]:
        """{metric: (component, reduction)} declared by the components `names` (default: all)."""
        return {
            m: (n, how)
            for n in (self.names if names is None else names)
            for m, how in self.components[n].declared_metrics(self.teachers).items()
        }

    def metric_zeros(self, names: Optional[tuple[str, ...]] = None) -> dict[str, Any]:
        """The accumulators of the declared metrics: the same keys on every rank, whatever its batches held
        (the reduction over ranks matches them by name)."""
        specs = self.metric_specs(names)
        return {
            "metric_batches": 0.0,
            **{f"metric.{m}": 0.0 for m in specs},
            **{f"metric.{m}#count": 0.0 for m, (_, how) in specs.items() if how == "own"},
        }

    def add_metrics(self, acc: dict[str, Any], sums: Sums, names: Optional[tuple[str, ...]] = None) -> None:
        """Add one micro-batch's declared metrics into `acc` (kept on the device until the reduction)."""
        acc["metric_batches"] += 1.0
        for m, (_, how) in self.metric_specs(names).items():
            v = sums.extras.get(m)
            if v is None:
                continue
            if how == "own":  # (sum, count)
                v, n = v
                acc[f"metric.{m}#count"] += float(n)
            acc[f"metric.{m}"] = acc[f"metric.{m}"] + (v.detach() if torch.is_tensor(v) else float(v))

    def reduce_metrics(
        self, reduced: dict[str, float], normalizers: dict[str, float], names: Optional[tuple[str, ...]] = None
    ) -> dict[str, float]:
        """The declared metrics from the sums over every rank (`reduced`), by each one's reduction."""
        out = {}
        for m, (component, how) in self.metric_specs(names).items():
            if f"metric.{m}" in reduced:
                total = reduced[f"metric.{m}"]
                if how == "own":
                    out[m] = total / max(reduced[f"metric.{m}#count"], 1.0)
                else:
                    out[m] = total / normalizers[component] if how == "unit" else total / max(reduced["metric_batches"], 1.0)
        return out

    @staticmethod
    def value(means: dict[str, float], weights: dict[str, float]) -> float:
        """The objective from component means: sum_c w_c * mean_c (train and eval records alike)."""
        return float(sum(weights[n] * means[n] for n in weights if n in means))
