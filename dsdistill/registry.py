"""The one registry of loss component names.

Every other module (curriculum, objective, metrics schema, monitor) takes component names from here;
nothing matches components by substring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Component:
    """A named term of the distillation objective."""

    name: str
    unit: Literal["token", "sequence", "layer"]
    """What the component is averaged over: valid tokens, sequences, or (for router terms) layers."""
    implemented: bool
    """Whether this version computes it. Scheduled but unimplemented components are reported as inactive."""
    description: str


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("kd", "token", True, "KL divergence between temperature-softened teacher and student logits, x T^2"),
        Component("lm", "token", True, "cross-entropy of the student on the next token"),
        Component("feature", "token", True, "projected student hidden state vs teacher hidden state"),
        Component("attention", "token", True, "student vs teacher attention distributions on mapped layers"),
        Component("layerwise", "token", True, "every student layer vs its mapped teacher layer"),
        Component("contrastive", "sequence", True, "InfoNCE between pooled student and teacher representations"),
        Component("routing_feature", "token", True, "student hidden vs router-gated mixture of teacher layers"),
        Component("routing_load_balance", "layer", True, "keeps every teacher layer in use by the router"),
        Component("routing_attention_alignment", "token", True, "student attention vs gated teacher attention"),
    )
}

NAMES: tuple[str, ...] = tuple(COMPONENTS)
IMPLEMENTED: tuple[str, ...] = tuple(n for n, c in COMPONENTS.items() if c.implemented)


def check_name(name: str) -> str:
    """Return `name` if it is a registered component, else raise ValueError naming the valid ones."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown loss component {name!r}; expected one of: {', '.join(NAMES)}")
    return name
