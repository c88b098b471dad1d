"""The kinds of teacher, by name: one `register(...)` line each, naming the `TeacherPlan` class that opens
it (`module:Class`, imported only when a config names the kind). `path`, `cache` and `url` are chosen by those
keys of `teacher:`; any other kind by `teacher.kind`, with its own options in `teacher.options`. Light: the
config reads names from here without loading torch."""

from __future__ import annotations

import importlib
from typing import Any

KINDS: dict[str, str] = {}


def register(name: str, implementation: str) -> None:
    """Add a kind of teacher (a test may register a toy one and remove it with `unregister`)."""
    if name in KINDS:
        raise ValueError(f"teacher kind {name!r} is registered already")
    KINDS[name] = implementation


def unregister(name: str) -> None:
    KINDS.pop(name, None)


def plan_class(name: str) -> Any:
    """The `TeacherPlan` class of a registered kind (ValueError naming the kinds for another name)."""
    if name not in KINDS:
        raise ValueError(f"unknown teacher kind {name!r}; expected one of: {', '.join(KINDS)}")
    module, _, attr = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


register("path", "dsdistill.teachers.live:LivePlan")
register("cache", "dsdistill.teachers.cached:CachePlan")
register("url", "dsdistill.teachers.remote:UrlPlan")
