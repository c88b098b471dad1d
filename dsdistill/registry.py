"""The one registry of loss components: one `register(...)` line per component.

Each line gives the name, the unit it is averaged over, a description, and where its implementation
lives (`module:attribute`, imported by `component_class` only when a config or a run needs it). This module imports nothing
heavy, so the config, the curriculum and the monitor read names from here without loading torch.
Everything else about a component (what it needs from the two forwards, the modules it owns, how it is
computed) is in its own file under `dsdistill/components/`; see docs/architecture.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Optional

Unit = Literal["token", "pair", "sequence", "micro_batch"]


@dataclass(frozen=True)
class Registration:
    """A named term of the distillation objective, as registered (its code: `implementation`)."""

    name: str
    unit: Unit
    """What the component is averaged over: loss-bearing tokens, those whose position a teacher with another
    tokenizer has a position for (`pair`: every loss-bearing token when both read the same ids), sequences with
    any, or micro-batches with any (the router's load balance is one number per micro-batch)."""
    description: str
    implementation: str
    """`package.module:Class` of its `dsdistill.components.base.Component` subclass."""
    default: Optional[Any] = None
    """Its weight in the default curriculum: a number (constant) or a schedule mapping; None leaves it out."""


COMPONENTS: dict[str, Registration] = {}
NAMES: tuple[str, ...] = ()
"""Registered names in registration order (the order of records, plots and the objective)."""


def register(name: str, unit: Unit, description: str, implementation: str, *, default: Optional[Any] = None) -> Registration:
    """Add a component (a test may register a toy one and remove it with `unregister`); `default` is its
    weight in the default curriculum (None: not in it)."""
    global NAMES
    if name in COMPONENTS:
        raise ValueError(f"loss component {name!r} is registered already")
    COMPONENTS[name] = spec = Registration(name, unit, description, implementation, default)
    NAMES = tuple(COMPONENTS)
    return spec


def unregister(name: str) -> None:
    global NAMES
    COMPONENTS.pop(name, None)
    NAMES = tuple(COMPONENTS)


def component_class(name: str) -> Any:
    """The class registered under `name` (its module imported on first use; a plugin's code runs only when a
    run names it)."""
    module, _, attr = COMPONENTS[check_name(name)].implementation.partition(":")
    return getattr(importlib.import_module(module), attr)


def option_sections() -> dict[str, Any]:
    """{section: options model} of every registered component that has options (`loss.<section>`)."""
    out: dict[str, Any] = {}
    for name in NAMES:
        cls = component_class(name)
        if cls.Options is None:
            continue
        section = cls.section or name
        if out.setdefault(section, cls.Options) is not cls.Options:
            raise ValueError(f"loss.{section}: two components declare different options models for it")
    return out


def check_name(name: str) -> str:
    """Return `name` if it is a registered component, else raise ValueError naming the valid ones."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown loss component {name!r}; expected one of: {', '.join(NAMES)}")
    return name


# the default curriculum: kd 0.9 and lm 0.1 throughout; the feature-level terms ramp in from 0 over 10%-40%
# of the run, layerwise over 40%-70%, contrastive over 70%-100% (docs/quality.md says why kd 0.9 / lm 0.1)
EARLY = {"kind": "linear", "start": 0.1, "end": 0.4, "start_value": 0.0, "end_value": 0.1}

register(
    "kd",
    "pair",
    "divergence between temperature-softened teacher and student distributions, x T^2",
    "dsdistill.components.kd:KD",
    default=0.9,
)
register("lm", "token", "cross-entropy of the student on the next token", "dsdistill.components.lm:LM", default=0.1)
register(
    "feature",
    "token",
    "projected student hidden state vs teacher hidden state",
    "dsdistill.components.feature:Feature",
    default=EARLY,
)
register(
    "attention",
    "token",
    "student vs teacher attention distributions on mapped layers",
    "dsdistill.components.attention:Attention",
    default=EARLY,
)
register(
    "layerwise",
    "token",
    "every student layer vs its mapped teacher layer",
    "dsdistill.components.layerwise:Layerwise",
    default={"kind": "linear", "start": 0.4, "end": 0.7, "start_value": 0.0, "end_value": 0.05},
)
register(
    "contrastive",
    "sequence",
    "InfoNCE between pooled student and teacher representations",
    "dsdistill.components.contrastive:Contrastive",
    default={"kind": "linear", "start": 0.7, "end": 1.0, "start_value": 0.0, "end_value": 0.05},
)
register(
    "routing_feature",
    "token",
    "student hidden vs router-gated mixture of teacher layers",
    "dsdistill.components.routing:RoutingFeature",
    default=EARLY,
)
register(
    "routing_load_balance",
    "micro_batch",
    "keeps every teacher layer in use by the router",
    "dsdistill.components.routing:LoadBalance",
    default=EARLY,
)
register(
    "routing_attention_alignment",
    "token",
    "student attention vs gated teacher attention",
    "dsdistill.components.routing:AttentionAlignment",
    default=EARLY,
)
