"""Curriculum: each loss component's weight, and the KD temperature, as a function of the optimizer step.

There is no default schedule position anywhere: every query takes the engine's optimizer step
(`engine.global_steps`) and the run's total optimizer steps as required keyword arguments. Train and eval
call the same methods with the same step, so their objectives are comparable by construction.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsdistill import registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class Constant(_Strict):
    """A value that does not change during training."""

    kind: Literal["constant"] = "constant"
    """Schedule type."""
    value: float = Field(ge=0)
    """The value at every step (>= 0)."""

    def at(self, progress: float) -> float:
        return self.value

    def breakpoints(self) -> tuple[float, ...]:
        return ()


class Ramp(_Strict):
    """`start_value` until progress `start`, then a linear or cosine ramp to `end_value` at progress `end`."""

    kind: Literal["linear", "cosine"]
    """Shape of the ramp between `start` and `end`."""
    start: float = Field(ge=0, le=1)
    """Training progress (fraction of total optimizer steps, 0..1) where the ramp begins."""
    end: float = Field(ge=0, le=1)
    """Training progress (0..1) where the ramp reaches `end_value`; must be >= `start`."""
    start_value: float = Field(ge=0)
    """Value before and at `start` (>= 0)."""
    end_value: float = Field(ge=0)
    """Value at and after `end` (>= 0)."""

    @model_validator(mode="after")
    def _ordered(self) -> "Ramp":
        if self.end < self.start:
            raise ValueError(f"ramp end ({self.end}) must be >= start ({self.start})")
        return self

    def at(self, progress: float) -> float:
        if progress <= self.start:
            return self.start_value
        if progress >= self.end:
            return self.end_value
        frac = (progress - self.start) / (self.end - self.start)
        if self.kind == "cosine":
            frac = 0.5 - 0.5 * math.cos(math.pi * frac)
        return self.start_value + (self.end_value - self.start_value) * frac

    def breakpoints(self) -> tuple[float, ...]:
        return (self.start, self.end)


Schedule = Annotated[Union[Constant, Ramp], Field(discriminator="kind")]


def _coerce_schedule(value):
    """A bare number is shorthand for a constant schedule."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"kind": "constant", "value": value}
    return value


def default_weights() -> dict[str, Constant | Ramp]:
    """The default schedule of every registered component that has one (its `default` in the registry:
    kd 0.9 and lm 0.1 throughout, the feature-level terms ramping in; see dsdistill/registry.py). The seed
    design had kd 0.7 / lm 0.3 at temperature 3; on the demo that student ended barely ahead of the same
    student trained without the teacher, and kd 0.9 / lm 0.1 at temperature 1 is what made distillation
    pay (docs/quality.md)."""
    from pydantic import TypeAdapter

    adapter: TypeAdapter = TypeAdapter(Schedule)
    return {
        n: adapter.validate_python(_coerce_schedule(r.default)) for n, r in registry.COMPONENTS.items() if r.default is not None
    }


class CurriculumConfig(_Strict):
    """Weights of the loss components and the KD temperature over training."""

    weights: dict[str, Schedule] = Field(default_factory=default_weights)
    """Schedule per component name (from the loss registry). Giving this replaces the default schedule
    entirely; components left out have weight 0. A bare number means a constant weight."""
    temperature: Schedule = Constant(value=1.0)
    """KD temperature schedule (must stay > 0); a bare number means constant. The default 1 matches the
    teacher's own distribution; a higher temperature flattened it and hurt on the demo (docs/quality.md)."""
    on_policy: Schedule = Constant(value=0.0)
    """Fraction (0..1) of each step's sequences whose completions are sampled from the current student
    (settings in `generation`); the rest keep the dataset's completions. 0 is plain off-policy distillation."""

    @field_validator("weights", mode="before")
    @classmethod
    def _shorthand_weights(cls, value):
        if isinstance(value, dict):
            return {k: _coerce_schedule(v) for k, v in value.items()}
        return value

    @field_validator("temperature", "on_policy", mode="before")
    @classmethod
    def _shorthand_temperature(cls, value):
        return _coerce_schedule(value)

    @field_validator("weights")
    @classmethod
    def _known_names(cls, value):
        for name in value:
            registry.check_name(name)
        if not value:
            raise ValueError("at least one component needs a schedule")
        return value

    @model_validator(mode="after")
    def _always_something(self) -> "CurriculumConfig":
        probes = _probe_points([*self.weights.values(), self.temperature, self.on_policy])
        for p in probes:
            if not 0.0 <= self.on_policy.at(p) <= 1.0:
                raise ValueError(f"on_policy must stay within [0, 1]; it is {self.on_policy.at(p)} at progress {p:.3g}")
            if self.temperature.at(p) <= 0:
                raise ValueError(f"temperature must be > 0 at every step; it is {self.temperature.at(p)} at progress {p:.3g}")
            if sum(s.at(p) for s in self.weights.values()) <= 0:
                raise ValueError(f"every component weight is 0 at progress {p:.3g}; at least one must be non-zero at every step")
        return self


def _probe_points(schedules) -> list[float]:
    """Progress values at which a piecewise-monotone schedule set is checked: every breakpoint and the
    midpoint of every segment between breakpoints (sufficient because each schedule is monotone there)."""
    pts = sorted({0.0, 1.0, *(b for s in schedules for b in s.breakpoints())})
    mids = [(a + b) / 2 for a, b in zip(pts, pts[1:])]
    return sorted(pts + mids)


def progress_of(*, step: int, total_steps: int) -> float:
    """Fraction of training done at optimizer step `step` (0 before the first update, 1 after the last)."""
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be the engine's integer optimizer step, got {step!r}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return min(1.0, step / total_steps)


class Curriculum:
    """Evaluates a validated `CurriculumConfig` at optimizer steps."""

    def __init__(self, config: CurriculumConfig, *, active: Optional[tuple[str, ...]] = None):
        self.config = config
        can = registry.NAMES if active is None else active
        self.active = tuple(n for n in registry.NAMES if n in config.weights and n in can)
        """Components this run computes (scheduled and computable for its models), in registry order."""
        self.inactive = tuple(n for n in registry.NAMES if n in config.weights and n not in can)
        """Scheduled components this run cannot compute (see the plan's `left_out`); they are left out of the
        objective."""
        for p in _probe_points(config.weights[n] for n in self.active):
            if sum(config.weights[n].at(p) for n in self.active) <= 0:
                raise ValueError(
                    f"every computed component ({', '.join(self.active) or 'none'}) has weight 0 at progress {p:.3g};"
                    f" scheduled but not computed by this version: {', '.join(self.inactive) or 'none'}"
                )

    def weights_at(self, *, step: int, total_steps: int) -> dict[str, float]:
        """Weight of every active component at optimizer step `step` of `total_steps`."""
        p = progress_of(step=step, total_steps=total_steps)
        return {n: self.config.weights[n].at(p) for n in self.active}

    def temperature_at(self, *, step: int, total_steps: int) -> float:
        """KD temperature at optimizer step `step` of `total_steps`."""
        return self.config.temperature.at(progress_of(step=step, total_steps=total_steps))

    def temperatures(self, *, total_steps: int, limit: int) -> Optional[tuple[float, ...]]:
        """Every distinct KD temperature the run uses (at optimizer steps 0..total_steps, train and eval
        alike), sorted; None when there are more than `limit` (a ramp over many steps)."""
        sched = self.config.temperature
        if isinstance(sched, Constant):
            return (sched.value,)
        seen: set[float] = set()
        for step in range(total_steps + 1):
            seen.add(self.temperature_at(step=step, total_steps=total_steps))
            if len(seen) > limit:
                return None
        return tuple(sorted(seen))

    def on_policy_at(self, *, step: int, total_steps: int) -> float:
        """Fraction of the window's sequences sampled from the student at optimizer step `step`."""
        return self.config.on_policy.at(progress_of(step=step, total_steps=total_steps))

    @property
    def ever_on_policy(self) -> bool:
        return any(self.config.on_policy.at(p) > 0 for p in _probe_points([self.config.on_policy]))

    def ever_nonzero(self, name: str) -> bool:
        """Whether component `name` has a non-zero weight at any point of the run."""
        sched = self.config.weights.get(name)
        return sched is not None and any(sched.at(p) > 0 for p in _probe_points([sched]))

    def definition(self) -> dict:
        """JSON-able schedule definition, as written to the run_start record."""
        return {
            "weights": {n: s.model_dump() for n, s in self.config.weights.items()},
            "temperature": self.config.temperature.model_dump(),
            "on_policy": self.config.on_policy.model_dump(),
            "active": list(self.active),
            "inactive": list(self.inactive),
        }
