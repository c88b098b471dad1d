"""Teacher sources: whatever turns a batch into the teacher's side of the objective.

The loop sees only `TeacherSource`: `begin_step` / `end_step` around an optimizer step (a source may
prepare something once per step, as the live teacher gathers its lm_head), `signal` per micro-batch and
`lm_sums` for the teacher's perplexity. `LiveTeacher` runs the frozen teacher in its optimizer-less
ZeRO-3 engine; an offline cache or a rollout scorer is another implementation of the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch
from torch import nn

from dsdistill.components.base import Needs
from dsdistill.losses import lm_loss
from dsdistill.losses.contrastive import mean_pool

if TYPE_CHECKING:
    from dsdistill.capture import QKCapture
    from dsdistill.losses.fused import KDOptions, SparseTeacher


@dataclass
class TeacherSignal:
    """The teacher's side of one micro-batch. Its distribution comes in one of two forms: dense `logits`,
    or `hidden` with `head` (the fused path forms the logits chunk by chunk, never whole)."""

    logits: Optional[torch.Tensor] = None
    """[B, S, V] logits cut to the shared vocabulary."""
    hidden: Optional[torch.Tensor] = None
    """[B, S, Dt] final hidden state (the input of the lm_head)."""
    head: Optional[torch.Tensor] = None
    """[V', Dt] lm_head weight, whole (V' >= V: padded embedding rows are cut by the consumer)."""
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    """Embeddings, then one hidden state per block."""
    pooled: Optional[torch.Tensor] = None
    """[B, Dt] final hidden state mean-pooled over loss-bearing positions."""
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Captured post-RoPE (q, k) by 1-based layer."""
    sparse: Optional["SparseTeacher"] = None
    """An offline cache's top-k (ids, log-probs, the rest's statistics) for the N loss-bearing positions in
    batch order (then `logits`, `hidden` and `head` are None)."""


class TeacherSource(Protocol):
    def begin_step(self, needs: Needs) -> None:
        """Called once before an optimizer step's (or an evaluation's) micro-batches."""

    def end_step(self) -> None:
        """Called once after them: release what `begin_step` prepared."""

    def signal(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        needs: Needs,
        *,
        position_ids: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> TeacherSignal:
        """The teacher's signal for one micro-batch (`valid`: [B, S] loss-bearing positions; `position_ids`:
        restarting per packed example, or None; `rows`: the packed rows' numbers, for a cache)."""

    def lm_sums(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, int]:
        """(summed next-token cross-entropy, loss-bearing tokens) of the teacher on one batch."""


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


class LiveTeacher:
    """The frozen teacher in its ZeRO-3 engine (no rank holds it whole)."""

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

    @property
    def head_weight(self) -> torch.Tensor:
        return self.engine.module.lm.get_output_embeddings().weight

    def begin_step(self, needs: Needs) -> None:
        # fused: the teacher's head is gathered once for all micro-batches of the step
        if self.fused and needs.teacher_logits:
            self._head = gather_full(self.head_weight)

    def end_step(self) -> None:
        self._head = None

    def signal(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        needs: Needs,
        *,
        position_ids: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> TeacherSignal:
        want_hidden = needs.teacher_hidden or needs.teacher_pooled
        if self.capture is not None:
            self.capture.want(needs.teacher_qk)  # a step whose attention terms weigh 0 keeps no q/k
        with torch.no_grad():
            head = not self.fused and needs.teacher_logits
            out, hidden_states = self.engine(input_ids, hidden_states=want_hidden, head=head, position_ids=position_ids)
            sig = TeacherSignal(hidden_states=hidden_states if want_hidden else None)
            if self.fused:
                if needs.teacher_logits:
                    if self._head is None:
                        raise RuntimeError("LiveTeacher.signal: begin_step was not called for this step")
                    sig.hidden, sig.head = out, self._head
            elif head:
                sig.logits = out[..., : self.vocab] if out.size(-1) != self.vocab else out
            if self.capture is not None:
                sig.qk = self.capture.collect()
            if needs.teacher_pooled:
                last = hidden_states[-1]
                sig.pooled = mean_pool(last.float(), valid).to(last.dtype)
        return sig

    def lm_sums(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        position_ids: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, int]:
        with torch.no_grad():
            out, _ = self.engine(input_ids, hidden_states=False, head=not self.fused, position_ids=position_ids)
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
