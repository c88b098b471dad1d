"""The live teacher: the frozen model in an optimizer-less ZeRO-3 engine inside the training job (no rank
holds it whole). `LivePlan` opens it from `teacher.path` (config and tokenizer only); `build` loads the
weights straight into their shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from dsdistill.losses import lm_loss
from dsdistill.losses.contrastive import mean_pool
from dsdistill.teachers.base import Capabilities, DenseLogits, HiddenHead, RunContext, TeacherInput, TeacherSignal

if TYPE_CHECKING:
    from dsdistill.capture import QKCapture
    from dsdistill.config import TeacherSpec
    from dsdistill.losses.fused import KDOptions
    from dsdistill.needs import Needs


class TeacherModel(nn.Module):
    """What the teacher's engine wraps: the causal LM, run either whole (dense logits) or up to its final
    hidden state (the fused path; its lm_head weight is then gathered once per step instead)."""

    def __init__(self, lm: Any):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, *, hidden_states: bool, head: bool, position_ids: Optional[torch.Tensor] = None):
        # no KV cache (nothing is generated here); without one, restarting positions also separate packed examples
        pos: dict[str, Any] = {"use_cache": False, **({} if position_ids is None else {"position_ids": position_ids})}
        if head:
            out = self.lm(input_ids=input_ids, output_hidden_states=hidden_states, **pos)
            return out.logits, out.hidden_states
        out = self.lm.base_model(input_ids=input_ids, output_hidden_states=hidden_states, **pos)
        return out.last_hidden_state, out.hidden_states


def gather_full(weight: torch.Tensor) -> torch.Tensor:
    """A full, detached copy of a (possibly ZeRO-3-partitioned) weight: gathered once, then released."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.data.detach().clone()
    return weight.detach()


class Replicated:
    """A frozen model whole on this rank's device, called as the teacher's ZeRO-3 engine would be (`module`,
    `device`, a call): no parameter is gathered in its forwards."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module = module.to(device).eval().requires_grad_(False)
        self.device = device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def choose_placement(asked: str, *, weight_bytes: int, device_bytes: Optional[int], share: float) -> str:
    """ "zero3" or "replicated" for `teacher.placement` `asked`: `auto` replicates a teacher whose weights take at
    most `share` of one GPU's memory (`device_bytes`; None on a CPU, where ranks share one memory: ZeRO-3)."""
    if asked != "auto":
        return asked
    if device_bytes is None:
        return "zero3"
    return "replicated" if weight_bytes <= share * device_bytes else "zero3"


def device_bytes() -> Optional[int]:
    """This rank's GPU memory, or None on a CPU."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


class LiveTeacher:
    """The frozen teacher in its ZeRO-3 engine (no rank holds it whole), or replicated on every rank."""

    def __init__(
        self,
        engine,
        *,
        vocab: int,
        fused: bool,
        capture: "Optional[QKCapture]",
        lm_options: "Callable[[], KDOptions]",
        ignore_index: int,
    ):
        self.engine = engine
        self.vocab = vocab
        self.fused = fused
        self.capture = capture
        self.lm_options = lm_options
        """Chunking of the fused LM sums (teacher perplexity on the fused path)."""
        self.ignore_index = ignore_index
        self._head: Optional[torch.Tensor] = None

    def capabilities(self) -> Capabilities:
        return LIVE

    @property
    def head_weight(self) -> torch.Tensor:
        return self.engine.module.lm.get_output_embeddings().weight

    def prepare(self, window: list[TeacherInput], needs) -> Optional[str]:
        return None  # it computes (or reads) each micro-batch's signal when asked

    def prefetch(self, window, needs) -> None:
        pass  # nothing to fetch ahead: each signal is computed (or read) when asked

    def begin_step(self, needs: "Needs") -> None:
        # fused: the teacher's head is gathered once for all micro-batches of the step
        if self.fused and needs.teacher_logits:
            self._head = gather_full(self.head_weight)

    def end_step(self) -> None:
        self._head = None

    def signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        want_hidden = needs.teacher_hidden or needs.teacher_pooled
        if self.capture is not None:
            self.capture.want(needs.teacher_qk)  # a step whose attention terms weigh 0 keeps no q/k
        with torch.no_grad():
            head = not self.fused and needs.teacher_logits
            out, hidden_states = self.engine(
                batch.input_ids, hidden_states=want_hidden, head=head, position_ids=batch.position_ids
            )
            sig = TeacherSignal(hidden_states=hidden_states if want_hidden else None)
            if self.fused:
                if needs.teacher_logits:
                    if self._head is None:
                        raise RuntimeError("LiveTeacher.signal: begin_step was not called for this step")
                    sig.distribution = HiddenHead(out, self._head)
            elif head:
                sig.distribution = DenseLogits(out[..., : self.vocab] if out.size(-1) != self.vocab else out)
            if self.capture is not None:
                sig.qk = self.capture.collect()
            if needs.teacher_pooled:
                last = hidden_states[-1]
                sig.pooled = mean_pool(last.float(), batch.valid).to(last.dtype)
        return sig

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            out, _ = self.engine(batch.input_ids, hidden_states=False, head=not self.fused, position_ids=batch.position_ids)
            if self.capture is not None:
                self.capture.collect()  # drop what the capture kept
            if not self.fused:
                s, m = lm_loss(out[..., : self.vocab], labels, ignore_index=self.ignore_index)
                return s, int(m["count"])  # evaluation: one read per batch
            from dsdistill.losses.fused import fused_kd_lm

            head = self._head if self._head is not None else gather_full(self.head_weight)
            _, m = fused_kd_lm(
                out,
                head[: self.vocab],
                None,
                None,
                labels,
                coef_kd=0.0,
                coef_lm=0.0,
                options=self.lm_options(),
                ignore_index=self.ignore_index,
            )
            return m["lm"], m["count"]

    def params(self) -> int:
        from dsdistill.models import param_counts

        return param_counts(self.engine.module)[0]

    def where(self) -> str:
        return "replicated" if isinstance(self.engine, Replicated) else "ZeRO-3"

    def exact_share(self) -> Optional[float]:
        return None

    def separation_forward(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda ids, pos: self.engine(ids, hidden_states=False, head=True, position_ids=pos)[0]


LIVE = Capabilities(
    distribution="dense", hidden_states=True, attention=True, scores_new_text=True, unfused=True, model_in_job=True
)


class LivePlan:
    """`teacher.path`: a model this job loads, sharded by ZeRO-3."""

    field = "teacher.path"
    noun = "a live model"

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "LivePlan":
        return cls(cfg.teacher, student_tokenizer)

    def __init__(self, spec: "TeacherSpec", student_tokenizer: Any):
        from dsdistill.models import load_config, load_tokenizer

        self.spec = spec
        self.source = str(spec.path)
        self.model_config = load_config(spec, field="teacher")
        has_own = spec.tokenizer is not None or (Path(str(spec.path)) / "tokenizer_config.json").exists()
        self.tokenizer = load_tokenizer(spec, field="teacher") if has_own else student_tokenizer

    def capabilities(self) -> Capabilities:
        return LIVE

    def verify(self, ctx: RunContext) -> None:
        pass  # a live model computes whatever a component asks of it

    def describe(self) -> str:
        t = self.model_config
        return f"{self.spec.path} ({getattr(t, 'num_hidden_layers', '?')} layers, width {getattr(t, 'hidden_size', '?')})"

    def placement(self, precision: str) -> str:
        """Where its weights live: "zero3" (sharded over the ranks) or "replicated" (whole on each)."""
        from dsdistill.models import DTYPES, count_params

        weight_bytes = count_params(self.model_config) * DTYPES[precision].itemsize
        return choose_placement(
            self.spec.placement, weight_bytes=weight_bytes, device_bytes=device_bytes(), share=self.spec.replicate_share
        )

    def plan_json(self) -> dict[str, Any]:
        return {"path": self.spec.path}

    def kd_semantics(self) -> dict[str, Any]:
        return {}

    def build(self, plan: Any, *, needs: "Needs") -> LiveTeacher:
        from dsdistill.capture import QKCapture
        from dsdistill.dist import agree
        from dsdistill.engines import build_teacher_engine
        from dsdistill.heads import head_options
        from dsdistill.models import load_causal_lm

        replicated = self.placement(plan.precision) == "replicated"
        lm = agree(
            lambda: load_causal_lm(
                self.spec, field="teacher", precision=plan.precision, zero3_ds_config=None if replicated else plan.ds_teacher
            ),
            what="loading the teacher",
        )
        if replicated:  # whole on this rank's device: its forwards gather nothing
            from deepspeed.accelerator import get_accelerator

            engine: Any = Replicated(TeacherModel(lm), torch.device(get_accelerator().current_device_name()))
        else:
            engine = build_teacher_engine(TeacherModel(lm), plan.ds_teacher)
        return LiveTeacher(
            engine,
            vocab=plan.vocab,
            fused=plan.fused,
            capture=QKCapture(lm, sorted(needs.teacher_qk)) if needs.teacher_qk else None,
            lm_options=lambda: head_options(
                plan.cfg.loss, plan.head_shape, engine.device, temperature=1.0, want_kd=False, want_lm=True
            ),
            ignore_index=plan.cfg.loss.ignore_index,
        )
