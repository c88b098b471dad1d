"""The teacher from `teacher:`: which kind of `TeacherPlan` it is, and the checks every kind shares (what
the run's components and curriculum ask of it, against its `Capabilities`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from dsdistill.errors import ConfigError
from dsdistill.teachers.base import RunContext, TeacherPlan
from dsdistill.teachers.kinds import plan_class


def open_teacher(cfg: Any, student_tokenizer: Any, *, rank: int) -> TeacherPlan:
    """The teacher the config names, opened (config, tokenizer, index; no weights): the plan class of its
    kind (teachers/kinds.py), or every one of `teachers:`."""
    if cfg.teachers is not None:
        from dsdistill.teachers.mixture import MixturePlan

        return MixturePlan.open(cfg, student_tokenizer, rank=rank)
    if cfg.teacher.cross_tokenizer is not None:  # a model teacher reading its own tokens of the same text
        from dsdistill.teachers.cross import CrossPlan

        return CrossPlan.open(cfg, student_tokenizer, rank=rank)
    return plan_class(cfg.teacher.chosen).open(cfg, student_tokenizer, rank=rank)


def check_serves(teacher: TeacherPlan, ctx: RunContext, *, fused_off: Optional[str], samples: Optional[str]) -> None:
    """Refuse, in one line naming the field, a run that asks this teacher for what it cannot supply
    (`samples`: the field that makes the run sample completions, or None)."""
    from dsdistill.teachers.mixture import MixturePlan, errors_named

    if isinstance(teacher, MixturePlan):  # each teacher first, as the only one of its run
        for i, (_, _, member, alone) in enumerate(teacher.members):
            with errors_named(f"teachers.{i}"):
                check_serves(member, dataclasses.replace(ctx, cfg=alone), fused_off=fused_off, samples=samples)
    caps, cfg = teacher.capabilities(), ctx.cfg
    internals = [
        name
        for name, c in ctx.components.items()
        for need in [c.needs(ctx.layers)]
        if ((need.teacher_hidden or need.teacher_pooled) and not caps.hidden_states) or (need.teacher_qk and not caps.attention)
    ]
    if internals:
        import yaml

        keep = {
            n: (sch.value if sch.kind == "constant" else sch.model_dump())
            for n, sch in cfg.curriculum.weights.items()
            if n not in internals
        }
        line = yaml.safe_dump(keep, default_flow_style=True, sort_keys=False, width=10**9).strip()
        raise ConfigError(
            f"{teacher.field}: {', '.join(internals)} need the teacher's hidden states or attention, which {teacher.noun} "
            f"does not hold; train with --set curriculum.weights='{line}'"
            + (" (or use teacher.path)" if teacher.field != "teacher.cross_tokenizer" else "")
        )
    if samples is not None and not caps.scores_new_text:
        raise ConfigError(
            f"{samples}: sampled completions need a teacher that scores new text; use teacher.path, not {teacher.noun}"
        )
    if caps.distribution == "sparse":
        if cfg.loss.section("kd").top_k is not None:
            raise ConfigError(f"loss.kd.top_k: {teacher.noun} sets k ({caps.top_k}, with a rest bucket); leave it unset")
        if not cfg.loss.fused_logits or fused_off is not None:
            raise ConfigError(
                f"{teacher.field}: KD from {teacher.noun} runs on the fused path only; "
                + (f"it is off because {fused_off}" if fused_off else "set loss.fused_logits: true")
            )
    teacher.verify(ctx)
