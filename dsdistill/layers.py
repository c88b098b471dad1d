"""Which student layer is compared with which teacher layer: a frozen fact of the run's plan."""

from __future__ import annotations

from dataclasses import dataclass

from dsdistill.config import LossConfig
from dsdistill.errors import ConfigError


def _resolve(layer: int, n: int, field_name: str, side: str) -> int:
    value = n if layer == -1 else layer
    if not 1 <= value <= n:
        raise ConfigError(
            f"{field_name}: {side} layer {layer} is out of range; the {side} has layers 1..{n} (or -1 for the last)"
        )
    return value


def uniform_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer i (1-based) -> teacher layer round(i * Lt / Ls): the last maps to the last."""
    return [(i, max(1, round(i * n_teacher / n_student))) for i in range(1, n_student + 1)]


@dataclass(frozen=True)
class LayerMap:
    """(student layer, teacher layer) pairs each hidden-state and attention component compares, as 1-based
    block numbers (hidden state i is the output of block i; 0 is the embeddings)."""

    n_student: int
    n_teacher: int
    feature: tuple[tuple[int, int], ...] = ()
    layerwise: tuple[tuple[int, int], ...] = ()
    attention: tuple[tuple[int, int], ...] = ()

    @classmethod
    def build(cls, loss: LossConfig, n_student: int, n_teacher: int) -> "LayerMap":
        def pairs(value, default, name) -> tuple[tuple[int, int], ...]:
            raw = default if value is None else value
            return tuple((_resolve(s, n_student, name, "student"), _resolve(t, n_teacher, name, "teacher")) for s, t in raw)

        return cls(
            n_student=n_student,
            n_teacher=n_teacher,
            feature=pairs(loss.section("feature").layers, [(-1, -1)], "loss.feature.layers"),
            layerwise=pairs(loss.section("layerwise").layers, uniform_map(n_student, n_teacher), "loss.layerwise.layers"),
            attention=pairs(loss.section("attention").layers, [(-1, -1)], "loss.attention.layers"),
        )

    @property
    def routed_attention_students(self) -> list[int]:
        """Student layers whose attention the router's alignment term compares (those of `attention`)."""
        return sorted({s for s, _ in self.attention})
