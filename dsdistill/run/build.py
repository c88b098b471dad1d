"""A validated plan turned into a run's live parts: the student's engine, the teacher source, the
objective, the trainer and the evaluator. Every rank builds them together (model loading is collective)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from dsdistill.capture import QKCapture
from dsdistill.components.base import Build
from dsdistill.dist import agree
from dsdistill.ds_config import zero_stage
from dsdistill.engines import build_student_engine
from dsdistill.models import DTYPES, load_causal_lm
from dsdistill.objective import Objective
from dsdistill.packing import check_separation
from dsdistill.preflight import Plan, RunData
from dsdistill.rollout import StudentSampler
from dsdistill.student import DistillStudent
from dsdistill.teachers.base import TeacherSource
from dsdistill.teachers.mixture import separation_forwards
from dsdistill.trainer import Evaluator, PairForward, Trainer


@dataclass
class Parts:
    plan: Plan
    data: RunData
    student: Any
    """The student's DeepSpeed engine (its module: `DistillStudent`)."""
    teacher: TeacherSource
    objective: Objective
    forward: PairForward
    trainer: Trainer
    evaluator: Evaluator


def build_parts(plan: Plan, data: RunData) -> Parts:
    cfg = plan.cfg
    objective = Objective(plan.curriculum, total_steps=plan.total_steps, layers=plan.layers, teachers=plan.teacher_names)
    needs = objective.needs
    # the teacher first: a live one loads its weights straight into their shards, a cache opens its reader
    teacher = data.teacher.build(plan, needs=needs)
    student_lm = agree(
        lambda: load_causal_lm(
            cfg.student,
            field="student",
            precision=plan.precision,
            zero3_ds_config=plan.ds_student if zero_stage(plan.ds_student) == 3 else None,
        ),
        what="loading the student",
    )
    build = Build(
        loss=cfg.loss,
        layers=plan.layers,
        student_width=plan.student_config.hidden_size,
        teacher_width=plan.teacher_config.hidden_size,
    )
    wrapped = DistillStudent(
        student_lm,
        components=objective.components,
        build=build,
        vocab=plan.vocab,
        seed=cfg.train.seed,
        fused=plan.fused,
        # ZeRO-3 (and no ZeRO) re-apply a stale gradient to a parameter that gets none: skipped components touch theirs
        touch_unused=zero_stage(plan.ds_student) not in (1, 2),
    )
    if plan.precision != "fp32":
        wrapped.aux.to(DTYPES[plan.precision])
    student = build_student_engine(wrapped, plan.ds_student, cfg, total_steps=plan.total_steps)
    if data.splits.packing == "documents":
        agree(lambda: check_packing(plan, student, teacher), what="checking packed attention")
    s_capture = QKCapture(student_lm, sorted(needs.student_qk)) if needs.student_qk else None
    forward = PairForward(plan, student, teacher, s_capture)
    rollouts = _sampler(plan, data, student)
    trainer = Trainer(plan, student, objective, forward, rollouts)
    if rollouts is not None:
        trainer.pad = rollouts.pad
    # evaluation always computes LM: perplexity is exp of its token-weighted mean
    names = objective.names if "lm" in objective.names else (*objective.names, "lm")
    evaluator = Evaluator(
        plan,
        forward,
        Objective(plan.curriculum, total_steps=plan.total_steps, layers=plan.layers, names=names, teachers=plan.teacher_names),
    )
    return Parts(plan, data, student, teacher, objective, forward, trainer, evaluator)


def _sampler(plan: Plan, data: RunData, student) -> Optional[StudentSampler]:
    """The student's sampler, for on-policy windows and the on-policy probe (None: neither runs)."""
    cfg = plan.cfg
    if not (plan.curriculum.ever_on_policy or cfg.generation.probes(False)):
        return None
    tok = data.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    vocab = tok.get_vocab()
    stops = tuple(vocab[t] for t in cfg.generation.stop_tokens)  # checked by preflight
    return StudentSampler(student, cfg.generation, eos=tok.eos_token_id, pad=pad, vocab=plan.vocab, stops=stops)


def check_packing(plan: Plan, student, teacher: TeacherSource) -> None:
    """Both models keep packed examples apart (one tiny forward each, on every rank together)."""
    half = plan.precision != "fp32"
    was_training = student.module.training
    student.eval()
    try:
        check_separation(
            "student",
            plan.student_config.model_type,
            lambda ids, pos: student(ids, valid=torch.zeros_like(ids, dtype=torch.bool), position_ids=pos)["logits"],
            vocab=plan.vocab,
            device=student.device,
            half=half,
        )
        for role, kind, forward in separation_forwards(teacher, plan.teacher_config.model_type):
            check_separation(role, kind, forward, vocab=plan.vocab, device=student.device, half=half)
    finally:
        if was_training:
            student.train()
