"""`FusedKDLMHead`: the student's KD + LM computed chunk by chunk from the decoder's final hidden state,
with the student's own `lm_head.weight` (the same Parameter: tying, ZeRO partitioning and checkpoints
are untouched, and the lm_head stays in the model for generation and export).

It is a module of its own, called explicitly on the decoder's output. It does not register the weight as
its parameter (which would put a second name for it into every state dict); under ZeRO-3 it declares it
as an external parameter, so the engine gathers it once for the head's forward and once for its
backward, as it would for the lm_head. Its coefficients come from the objective (the
curriculum weight over the window's unit count), the one place they are set.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn

from dsdistill.components.base import FusedSums
from dsdistill.losses.fused import KDOptions, SparseTeacher, auto_chunk, default_budget, fixed_bytes, fused_kd_lm

if TYPE_CHECKING:
    from dsdistill.config import LossConfig


Group = tuple[Optional[torch.Tensor], float, bool]
"""(ordinals into the loss-bearing positions, or None for all; the KD weight; whether LM is taken there)."""
MixtureMember = tuple[str, float, Optional[torch.Tensor], Optional[torch.Tensor], Optional[SparseTeacher], tuple[Group, ...]]
"""(name, share, hidden, head, sparse, groups) of one of several teachers."""


@dataclass
class FusedCall:
    """One micro-batch's inputs of the fused head besides the student's hidden state."""

    labels: torch.Tensor
    teacher_hidden: Optional[torch.Tensor]
    """[B, S, Dt] the teacher's final hidden state (None: no KD)."""
    teacher_head: Optional[torch.Tensor]
    """The teacher's whole lm_head weight (None: no KD)."""
    coef_kd: float
    coef_lm: float
    options: KDOptions
    teacher_sparse: Optional[SparseTeacher] = None
    """An offline cache's top-k for the loss-bearing positions, instead of hidden and head."""
    positions: Optional[torch.Tensor] = None
    """Flat indices of the loss-bearing positions from the host batch (`objective.host_positions`): the
    head gathers by them without a device sync (None: it finds them with a boolean mask)."""
    kd_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(ordinals of the loss-bearing positions KD compares, of those it does not): a teacher with another
    tokenizer has no position for some; `teacher_sparse` holds the first's rows. LM is on both."""
    chunks: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """`chunk_likelihood` (a teacher with another tokenizer): (ordinals of the loss-bearing positions that lie
    in a chunk, each one's chunk); `teacher_sparse.logp[:, 0]` then holds the teacher's log-likelihood of each
    chunk, and KD is the chunks' divergence (dsdistill/losses/chunk_likelihood.py). LM is on every position."""
    mixture: tuple[MixtureMember, ...] = ()
    """Several teachers (`teachers:`), instead of the teacher_* fields: the head runs once per teacher and
    group of positions, and KD is the groups' weighted sum."""


class FusedKDLMHead(nn.Module):
    def __init__(self, lm_head: nn.Module, *, vocab: int, ignore_index: int):
        super().__init__()
        if getattr(lm_head, "bias", None) is not None:
            raise ValueError("fused KD does not support an lm_head with a bias; set loss.fused_logits: false")
        self._lm_head = (lm_head,)  # a reference, not a submodule: the lm_head stays where the model has it
        self.vocab = vocab
        self.ignore_index = ignore_index
        if hasattr(lm_head.weight, "ds_id"):  # ZeRO-3: gather the weight around this module's forward/backward
            import deepspeed

            deepspeed.zero.register_external_parameter(self, lm_head.weight)

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self._lm_head[0].weight)

    def forward(self, hidden: torch.Tensor, call: FusedCall) -> FusedSums:
        if call.mixture:
            return self._mixture(hidden, call)
        if call.chunks is not None:
            return self._chunked(hidden, call)
        if call.kd_rows is not None:
            return self._partial(hidden, call)
        combined, m = self._one(hidden, call, call.teacher_hidden, call.teacher_head, call.teacher_sparse)
        return FusedSums(kd=m["kd"], kl=m["kl"], lm=m["lm"], combined=combined, tokens=m["count"])

    def _one(self, hidden, call: FusedCall, t_hidden, t_head, t_sparse, *, share: float = 1.0, lm: bool = True, positions=None):
        return fused_kd_lm(
            hidden,
            self.weight[: self.vocab],
            t_hidden,
            None if t_head is None else t_head[: self.vocab],
            call.labels,
            coef_kd=share * call.coef_kd,
            coef_lm=call.coef_lm if lm else 0.0,
            options=call.options if lm else dataclasses.replace(call.options, want_lm=False),
            ignore_index=self.ignore_index,
            t_sparse=t_sparse,
            positions=call.positions if positions is None else positions,
        )

    def _partial(self, hidden: torch.Tensor, call: FusedCall) -> FusedSums:
        # KD + LM on the paired positions, LM alone on the others: the same rows pass the head once either way
        assert call.positions is not None and call.kd_rows is not None, "KD on some positions needs the host's positions"
        paired, alone = call.kd_rows
        runs = []
        if paired.numel() or not alone.numel():
            runs.append(
                self._one(hidden, call, None, None, call.teacher_sparse, positions=call.positions.index_select(0, paired))
            )
        if alone.numel():
            lm_only = dataclasses.replace(call, coef_kd=0.0, options=dataclasses.replace(call.options, want_kd=False))
            runs.append(self._one(hidden, lm_only, None, None, None, positions=call.positions.index_select(0, alone)))
        zero = torch.zeros_like(runs[0][1]["kd"])
        return FusedSums(
            kd=sum((m["kd"] for _, m in runs), zero),
            kl=sum((m["kl"] for _, m in runs), zero),
            lm=sum((m["lm"] for _, m in runs), zero),
            combined=sum((c for c, _ in runs), torch.zeros_like(runs[0][0])),
            tokens=sum(m["count"] for _, m in runs),
        )

    def _chunked(self, hidden: torch.Tensor, call: FusedCall) -> FusedSums:
        # LM on every loss-bearing position and the chunks' likelihoods against the teacher's, from one pair of
        # passes (both need only each row's log-probability of its label)
        from dsdistill.losses.chunk_likelihood import fused_chunk_likelihood

        assert call.positions is not None and call.chunks is not None and call.teacher_sparse is not None
        dev = hidden.device
        positions = call.positions.to(dev, non_blocking=True)
        members, chunk_ids = call.chunks
        chunk_of = torch.full((positions.numel(),), -1, dtype=torch.long)
        chunk_of[members] = chunk_ids
        rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, positions)
        objective, c = fused_chunk_likelihood(
            rows,
            self.weight[: self.vocab],
            call.labels.reshape(-1).index_select(0, positions + 1),
            chunk_of.to(dev, non_blocking=True),
            call.teacher_sparse.logp[:, 0],
            coef=call.coef_kd,
            coef_lm=call.coef_lm if call.options.want_lm else 0.0,
            temperature=call.options.temperature,
            chunk=call.options.chunk,
        )
        lm = c["lm"].float() if call.options.want_lm else torch.zeros((), device=dev)
        kd = c["kd"].to(lm.dtype)
        return FusedSums(kd=kd, kl=kd, lm=lm, combined=objective, tokens=int(positions.numel()))

    def _mixture(self, hidden: torch.Tensor, call: FusedCall) -> FusedSums:
        # one chunked pass per teacher and group of positions (the student's chunk logits are formed again for
        # each); LM is taken in exactly one group per position
        runs, per_teacher = [], {}
        for name, _, th, head, sparse, groups in call.mixture:
            own: tuple = (0.0, 0)
            for ordinals, weight, lm in groups:
                if ordinals is not None and ordinals.numel() == 0:
                    continue
                positions = None
                if ordinals is not None:
                    assert call.positions is not None, "routed teachers need the host's positions"
                    positions = call.positions.index_select(0, ordinals)
                sub = sparse if sparse is None or ordinals is None else sparse.take(ordinals)
                c, m = self._one(hidden, call, th, head, sub, share=weight, lm=lm, positions=positions)
                runs.append((c, m, weight, lm))
                own = (own[0] + m["kd"], own[1] + m["count"])
            per_teacher[name] = own
        if not runs:  # no loss-bearing position: one empty pass keeps every sum a tensor
            name, share, th, head, sparse, _ = call.mixture[0]
            c, m = self._one(hidden, call, th, head, sparse, share=share)
            runs.append((c, m, share, True))
        zero = torch.zeros_like(runs[0][1]["kd"])
        return FusedSums(
            kd=sum((w * m["kd"] for _, m, w, _ in runs), zero),
            kl=sum((w * m["kl"] for _, m, w, _ in runs), zero),
            lm=sum((m["lm"] for _, m, _, lm in runs if lm), zero),
            combined=sum((c for c, _, _, _ in runs), torch.zeros_like(runs[0][0])),
            tokens=sum(m["count"] for _, m, _, lm in runs if lm),
            per_teacher=per_teacher,
        )


def fused_supported(model: nn.Module) -> Optional[str]:
    """None if the model's logits are exactly lm_head(final hidden state); else the reason they are not."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None):
        return "the model soft-caps its logits"
    if getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return "the model scales its logits"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        return "the model has no linear lm_head"
    if getattr(head, "bias", None) is not None:
        return "the lm_head has a bias"
    return None


@dataclass(frozen=True)
class HeadShape:
    """What sizes the fused head's chunks: the run's shapes, fixed by its plan."""

    vocab: int
    s_width: int
    t_width: int
    """The teacher's hidden width (0: no teacher hidden state, e.g. a cache)."""
    t_bytes: int
    """Bytes per element of the teacher's hidden state."""
    tokens: int
    """Positions per micro-batch."""


def head_options(
    loss: "LossConfig", shape: HeadShape, device: torch.device, *, temperature: float, want_kd: bool, want_lm: bool
) -> KDOptions:
    """The fused head's options: KD settings from `loss.kd`, rows per chunk from `loss.fused_chunk` or the
    fused loss's memory model. On a GPU the budget is taken at every call, from the memory free then (after
    the optimizer's states and this micro-batch's activations exist, PyTorch's cached blocks counted as
    free), so a chunk never counts on memory the step itself is about to need; the rows are capped anyway
    (`fused.row_cap`)."""
    kd = loss.section("kd")
    chunk = loss.fused_chunk
    if not chunk:
        budget = loss.fused_chunk_mib << 20 if loss.fused_chunk_mib else default_budget(torch.device(device))
        chunk = _chunk_rows(shape.vocab, shape.s_width, shape.t_width, shape.t_bytes, shape.tokens, budget)
    return KDOptions(
        temperature=temperature,
        divergence=kd.divergence,
        beta=kd.beta,
        alpha=kd.alpha,
        top_k=kd.top_k,
        top_k_rest=kd.top_k_rest,
        top_k_support=kd.top_k_support,
        chunk=chunk,
        want_kd=want_kd,
        want_lm=want_lm,
        compile=loss.fused_compile,
    )


@functools.lru_cache(maxsize=64)
def _chunk_rows(vocab: int, s_width: int, t_width: int, t_bytes: int, tokens: int, budget: int) -> int:
    fixed = fixed_bytes(tokens=tokens, vocab=vocab, s_width=s_width, t_width=t_width, t_dtype_bytes=t_bytes, grads=True)
    return auto_chunk(vocab, s_width, budget_bytes=budget, fixed=fixed)
