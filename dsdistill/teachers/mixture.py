"""`teachers:`: several teachers, each of any kind, behind the one `TeacherPlan`/`TeacherSource` interface.

KD is the share-weighted sum of each teacher's KD (share = weight / sum of weights), so a run with several
teachers optimises the share-weighted sum of the objectives single-teacher runs would on the same batches.
The members are ordinary teachers, opened and checked as under `teacher:` (errors name `teachers.i`). They
supply token distributions only: a component that reads one teacher's hidden states or attention is
refused, since several teachers have no one layer to compare with.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from dsdistill.errors import DistillError
from dsdistill.teachers.base import Capabilities, Mixture, RunContext, TeacherInput, TeacherPlan, TeacherSignal, TeacherSource
from dsdistill.teachers.kinds import plan_class

if TYPE_CHECKING:
    from dsdistill.needs import Needs


def _renamed(e: DistillError, at: str) -> DistillError:
    """The same error naming `teachers.i` where a single teacher's message names `teacher`."""
    text = str(e)
    for head in ("teacher.", "teacher:"):
        if text.startswith(head):
            text = at + text[len("teacher") :]
            break
    else:
        text = f"{at}: {text}"
    renamed = type(e).__new__(type(e))
    Exception.__init__(renamed, text)
    renamed.__dict__.update(e.__dict__)  # what was set on it (`everywhere`) stays
    return renamed


@contextmanager
def errors_named(at: str) -> Iterator[None]:
    """A one-line error from one member, naming it (`teachers.i`)."""
    try:
        yield
    except DistillError as e:
        raise _renamed(e, at) from None


class MixturePlan:
    """`teachers:` opened: one `TeacherPlan` per named teacher (no weights loaded)."""

    field = "teachers"
    noun = "a mixture of teachers"

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "MixturePlan":
        members = []
        for i, spec in enumerate(cfg.teachers):
            at = f"teachers.{i}"
            # each member opens as the only teacher of a run: the kinds stay unaware of mixtures
            alone = cfg.model_copy(update={"teacher": spec, "teachers": None})
            with errors_named(at):
                plan = plan_class(spec.chosen).open(alone, student_tokenizer, rank=rank)
            plan.field = at + plan.field[len("teacher") :]
            members.append((spec.name, spec.weight, plan, alone))
        return cls(members, student_tokenizer)

    def __init__(self, members: list[tuple[str, float, TeacherPlan, Any]], student_tokenizer: Any):
        total = sum(w for _, w, _, _ in members)
        self.members = [(name, w / total, plan, alone) for name, w, plan, alone in members]
        first = members[0][2]
        self.source = ", ".join(plan.source for _, _, plan, _ in members)
        self.model_config = first.model_config
        """The first teacher's config: the plan's shapes (no component reads one teacher's layers here)."""
        self.tokenizer = first.tokenizer

    def capabilities(self) -> Capabilities:
        caps = [plan.capabilities() for _, _, plan, _ in self.members]
        temps = [set(c.temperatures) for c in caps if c.temperatures is not None]
        sparse = [c for c in caps if c.distribution == "sparse"]
        return Capabilities(
            distribution="sparse" if sparse else "dense",
            top_k=min((c.top_k or 0) for c in sparse) if sparse else None,
            scores_new_text=all(c.scores_new_text for c in caps),
            unfused=all(c.unfused for c in caps),
            temperatures=tuple(sorted(set.intersection(*temps))) if temps else None,
            model_in_job=any(c.model_in_job for c in caps),
            remote=any(c.remote for c in caps),
            reads_ahead=any(c.reads_ahead for c in caps),
        )

    def verify(self, ctx: RunContext) -> None:
        pass  # each member is checked as the only teacher of its run (`build.check_serves`)

    def describe(self) -> str:
        return "; ".join(f"{name} (share {share:.3g}): {plan.describe()}" for name, share, plan, _ in self.members)

    def plan_json(self) -> dict[str, Any]:
        return {"teachers": [{"name": n, "share": s, **plan.plan_json()} for n, s, plan, _ in self.members]}

    def kd_semantics(self) -> dict[str, Any]:
        return {"teachers": {n: {"share": s, **plan.kd_semantics()} for n, s, plan, _ in self.members}}

    def build(self, plan: Any, *, needs: "Needs") -> "TeacherMix":
        from dsdistill.ds_config import resolve_teacher

        sources = []
        for name, share, member, alone in self.members:
            own = dataclasses.replace(
                plan,
                cfg=alone,
                teacher_config=member.model_config,
                ds_teacher=resolve_teacher(alone, model_config=member.model_config),
                teacher=member.capabilities(),
            )
            sources.append((name, share, member.build(own, needs=needs)))
        return TeacherMix(
            sources, model_types={name: getattr(m.model_config, "model_type", "?") for name, _, m, _ in self.members}
        )


class TeacherMix:
    """Several teachers' sources asked together: each micro-batch's signal holds every teacher's distribution."""

    def __init__(self, members: list[tuple[str, float, TeacherSource]], model_types: Optional[dict[str, str]] = None):
        self.members = members
        self.model_types = model_types or {}

    def capabilities(self) -> Capabilities:
        caps = [s.capabilities() for _, _, s in self.members]
        return Capabilities(
            distribution="sparse" if any(c.distribution == "sparse" for c in caps) else "dense",
            scores_new_text=all(c.scores_new_text for c in caps),
            unfused=all(c.unfused for c in caps),
            model_in_job=any(c.model_in_job for c in caps),
            remote=any(c.remote for c in caps),
            reads_ahead=any(c.reads_ahead for c in caps),
        )

    def prepare(self, window: list[TeacherInput], needs: "Needs") -> Optional[str]:
        for name, _, source in self.members:
            problem = source.prepare(window, needs) if source.capabilities().remote else None
            if problem:
                return f"teacher {name}: {problem}"
        return None

    def prefetch(self, window: list[TeacherInput], needs: "Needs") -> None:
        for _, _, source in self.members:
            if source.capabilities().remote:
                source.prefetch(window, needs)

    def begin_step(self, needs: "Needs") -> None:
        for _, _, source in self.members:
            source.begin_step(needs)

    def end_step(self) -> None:
        for _, _, source in self.members:
            source.end_step()

    def signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        if not needs.teacher_logits:
            return TeacherSignal()
        members = []
        for name, share, source in self.members:
            d = source.signal(batch, needs).distribution
            assert d is not None, f"teacher {name} gave no distribution"
            members.append((name, share, d))
        return TeacherSignal(distribution=Mixture(tuple(members)))

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The share-weighted sum of the teachers' cross-entropy sums: exp of its mean is the share-weighted
        geometric mean of their perplexities (each one's own is in `teacher_ppls`)."""
        total, count = None, 0
        for _, share, source in self.members:
            s, count = source.lm_sums(batch, labels)
            total = s * share if total is None else total + s * share
        assert total is not None
        return total, count

    def params(self) -> int:
        return sum(source.params() for _, _, source in self.members)

    def where(self) -> str:
        return "; ".join(f"{name}: {source.where()}" for name, _, source in self.members)

    def exact_share(self) -> Optional[float]:
        shares = [s for s in (source.exact_share() for _, _, source in self.members) if s is not None]
        return min(shares) if shares else None

    def separation_forward(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        return None  # each member's is checked by `members_of` callers

    def __repr__(self) -> str:
        return f"TeacherMix({', '.join(n for n, _, _ in self.members)})"


def members_of(source: TeacherSource) -> list[tuple[str, float, TeacherSource]]:
    """(name, share, source) of each teacher behind `source` (one, "teacher", unless it is `teachers:`)."""
    return list(source.members) if isinstance(source, TeacherMix) else [("teacher", 1.0, source)]


def separation_forwards(source: TeacherSource, model_type: str) -> list[tuple[str, str, Callable]]:
    """(role, model type, forward) of each teacher behind `source` that runs a model in this job."""
    out = []
    for name, _, member in members_of(source):
        forward = member.separation_forward()
        if forward is not None:
            own = source.model_types.get(name, model_type) if isinstance(source, TeacherMix) else model_type
            out.append(("teacher" if name == "teacher" else f"teacher {name}", own, forward))
    return out


def plans_of(plan: TeacherPlan, cfg: Any) -> list[tuple[str, TeacherPlan, Any]]:
    """(config path, plan, the config it opened from) of each teacher behind `plan`: one, at "teacher", for
    a run with `teacher:`."""
    if isinstance(plan, MixturePlan):
        return [(f"teachers.{i}", member, alone) for i, (_, _, member, alone) in enumerate(plan.members)]
    return [("teacher", plan, cfg)]
