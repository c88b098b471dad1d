"""A toy kind of teacher, to show what adding one takes: this file, plus one `kinds.register(...)` line.

`uniform` gives every token the same probability: no model, no weights. Its plan borrows the shapes of a
model directory (`teacher.options.like`); its source supplies the distribution in the form the run asks for
(hidden state + head on the fused path, logits otherwise) and nothing else, which its capabilities say."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from dsdistill.components.base import ComponentOptions
from dsdistill.config import ModelSpec
from dsdistill.models import load_config
from dsdistill.teachers.base import Capabilities, DenseLogits, HiddenHead, RunContext, TeacherInput, TeacherSignal

UNIFORM = Capabilities(distribution="dense", scores_new_text=True, unfused=True)


class UniformOptions(ComponentOptions):
    like: str
    """A model directory whose config gives the teacher's shapes (vocabulary, layers)."""


class UniformTeacher:
    def __init__(self, vocab: int, fused: bool, ignore_index: int):
        self.vocab, self.fused, self.ignore_index = vocab, fused, ignore_index

    def capabilities(self) -> Capabilities:
        return UNIFORM

    def prepare(self, window: list[TeacherInput], needs) -> Optional[str]:
        return None  # it computes (or reads) each micro-batch's signal when asked

    def prefetch(self, window, needs) -> None:
        pass  # nothing to fetch ahead: each signal is computed (or read) when asked

    def begin_step(self, needs) -> None:
        pass

    def end_step(self) -> None:
        pass

    def signal(self, batch: TeacherInput, needs) -> TeacherSignal:
        b, s = batch.input_ids.shape
        dev = batch.input_ids.device
        if not needs.teacher_logits:
            return TeacherSignal()
        if self.fused:  # logits = hidden @ head.T = 0 everywhere
            return TeacherSignal(HiddenHead(torch.zeros(b, s, 1, device=dev), torch.zeros(self.vocab, 1, device=dev)))
        return TeacherSignal(DenseLogits(torch.zeros(b, s, self.vocab, device=dev)))

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        n = int((labels[:, 1:] != self.ignore_index).sum())
        return torch.tensor(n * math.log(self.vocab), dtype=torch.float64), n

    def params(self) -> int:
        return 0

    def where(self) -> str:
        return "uniform, no model"

    def exact_share(self) -> Optional[float]:
        return None

    def separation_forward(self) -> None:
        return None


class UniformPlan:
    field = "teacher.kind"
    noun = "a uniform teacher"
    Options = UniformOptions

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "UniformPlan":
        return cls(UniformOptions.model_validate(cfg.teacher.options), student_tokenizer)

    def __init__(self, options: UniformOptions, student_tokenizer: Any):
        self.source = options.like
        self.model_config = load_config(ModelSpec(path=options.like), field="teacher.options.like")
        self.tokenizer = student_tokenizer

    def capabilities(self) -> Capabilities:
        return UNIFORM

    def verify(self, ctx: RunContext) -> None:
        pass

    def describe(self) -> str:
        return f"uniform over the vocabulary (shapes of {self.source})"

    def plan_json(self) -> dict[str, Any]:
        return {"kind": "uniform"}

    def kd_semantics(self) -> dict[str, Any]:
        return {}

    def build(self, plan: Any, *, needs) -> UniformTeacher:
        return UniformTeacher(plan.vocab, plan.fused, plan.cfg.loss.ignore_index)
