"""What every kind of teacher is: a `TeacherPlan` (opened and checked before any weights load) that builds a
`TeacherSource` (what the loop asks for the teacher's side of each micro-batch).

The run and preflight never ask which kind a teacher is; they ask its `Capabilities`. A new kind of teacher
is one module (its plan with its `Options` model, and its source) plus its `register(...)` line in kinds.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

import torch

from dsdistill.errors import DistillError

if TYPE_CHECKING:
    from dsdistill.losses.fused import SparseTeacher
    from dsdistill.needs import Needs


class TeacherUnavailable(DistillError):
    """A remote teacher stopped answering (after its retries): the run saves its state and stops, exit 75."""


@dataclass(frozen=True)
class Capabilities:
    """What a teacher can supply. Preflight refuses a run that asks for more, in one line."""

    distribution: str
    """How its token distribution comes: "dense" (the whole vocabulary: logits, or hidden state + head)
    or "sparse" (top-k log-probs plus the rest's statistics)."""
    top_k: Optional[int] = None
    """With "sparse": tokens kept per position."""
    hidden_states: bool = False
    """Every block's hidden state (feature, layerwise, contrastive, router terms)."""
    attention: bool = False
    """Post-RoPE q/k of chosen layers (attention terms)."""
    scores_new_text: bool = False
    """Scores sequences it has not seen before (on-policy rollouts, the on-policy probe)."""
    unfused: bool = False
    """Serves the full-logit (unfused) path; a sparse teacher needs the fused one."""
    temperatures: Optional[tuple[float, ...]] = None
    """Temperatures at which its KD is exact (None: any)."""
    model_in_job: bool = False
    """Its weights are sharded over this job's ranks (what the memory estimate counts)."""
    remote: bool = False
    """It asks another process for its signals: a window's are fetched before it runs (`prepare`), and a
    failure stops the run cleanly, every rank agreeing."""
    reads_ahead: bool = False
    """It prepares a window's signals on a thread while the window before it runs (`prefetch`): windows are
    drawn one ahead for it (a remote teacher always is)."""


@dataclass
class TeacherInput:
    """One micro-batch as a teacher sees it."""

    input_ids: torch.Tensor
    valid: torch.Tensor
    """[B, S] loss-bearing positions."""
    position_ids: Optional[torch.Tensor] = None
    """Restarting per packed example, or None."""
    rows: Optional[torch.Tensor] = None
    """The packed rows' numbers in the dataset (-1: an eval filler row): a batch's identity, for sources that
    look rows up rather than compute them."""
    cross: Optional["CrossInput"] = None
    """A cross-tokenizer run's micro-batch in the teacher's own tokens."""


@dataclass
class CrossInput:
    """A micro-batch of a cross-tokenizer run as its teacher reads it: its own rows of the same examples, and
    which of the student's loss-bearing positions have a teacher position that has read the same text (all
    worked out on the host from the loader's batch)."""

    ids: torch.Tensor
    """[B, Lt] the teacher's tokens."""
    labels: torch.Tensor
    """[B, Lt] its targets where its tokens lie in loss-bearing text (negative: none)."""
    position_ids: torch.Tensor
    """[B, Lt] restarting per packed example."""
    rows: torch.Tensor
    """[P] flat indices b * Lt + j of the teacher positions paired with the student's, in KD order."""
    contexts: Any
    """[P] each pair's context (numpy; an index into `crosstok.CONTEXTS`)."""
    kd: torch.Tensor
    """[P] the paired student positions, as ordinals into the loss-bearing ones (`objective.host_positions`)."""
    lm_only: torch.Tensor
    """The loss-bearing student positions with no pair (LM there, no KD)."""
    paired: torch.Tensor
    """[B, S] the student positions that carry loss and have a pair (what a cross-tokenizer cache holds rows for)."""
    chunks: Any = None
    """`crosstok.Chunks`: the text between consecutive pairs on each side (`chunk_likelihood` compares them)."""


@dataclass
class DenseLogits:
    logits: torch.Tensor
    """[B, S, V] logits cut to the shared vocabulary."""


@dataclass
class HiddenHead:
    """The fused path's form: the final hidden state and the whole lm_head weight; logits are formed chunk by
    chunk, never whole."""

    hidden: torch.Tensor
    """[B, S, Dt]."""
    head: torch.Tensor
    """[V', Dt] (V' >= V: padded embedding rows are cut by the consumer)."""


@dataclass
class Mixture:
    """Several teachers' distributions for one micro-batch (`teachers:`), with their shares of KD."""

    members: "tuple[tuple[str, float, Distribution], ...]"
    """(name, share, distribution) per teacher, in config order; the shares sum to 1."""


Distribution = Union[DenseLogits, HiddenHead, "SparseTeacher", Mixture]
"""The teacher's token distribution in one of its forms (`SparseTeacher`: top-k for the loss-bearing
positions in batch order, with the rest's statistics; `Mixture`: several teachers' own)."""


@dataclass
class TeacherSignal:
    """The teacher's side of one micro-batch: its distribution (if a live component reads it) and what the
    feature-level components read."""

    distribution: Optional[Distribution] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    """Embeddings, then one hidden state per block."""
    pooled: Optional[torch.Tensor] = None
    """[B, Dt] final hidden state mean-pooled over loss-bearing positions."""
    qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Captured post-RoPE (q, k) by 1-based layer."""
    kd_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """(the loss-bearing positions KD compares, those it leaves out) as ordinals into the loss-bearing ones,
    when KD is not on all of them (a teacher with another tokenizer); the distribution's rows are the first's."""
    chunks: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    """`chunk_likelihood`: (ordinals of the loss-bearing positions in a chunk, each one's chunk); the
    distribution's `logp[:, 0]` is then the teacher's log-likelihood of each chunk (`heads.FusedCall.chunks`)."""

    # readers of one form (None when the distribution has another form)
    @property
    def logits(self) -> Optional[torch.Tensor]:
        return self.distribution.logits if isinstance(self.distribution, DenseLogits) else None

    @property
    def hidden(self) -> Optional[torch.Tensor]:
        return self.distribution.hidden if isinstance(self.distribution, HiddenHead) else None

    @property
    def head(self) -> Optional[torch.Tensor]:
        return self.distribution.head if isinstance(self.distribution, HiddenHead) else None

    @property
    def sparse(self) -> "Optional[SparseTeacher]":
        d = self.distribution
        return None if d is None or isinstance(d, (DenseLogits, HiddenHead, Mixture)) else d

    @property
    def mixture(self) -> Optional[Mixture]:
        return self.distribution if isinstance(self.distribution, Mixture) else None


class TeacherSource(Protocol):
    """The teacher as the loop sees it."""

    def capabilities(self) -> Capabilities: ...

    def prepare(self, window: list[TeacherInput], needs: "Needs") -> Optional[str]:
        """Called with a training window's micro-batches before the first of them runs (a source that fetches
        its signals from elsewhere asks for all of them here). Returns why it cannot serve the window (the
        run then saves and stops, every rank agreeing), or None."""

    def prefetch(self, window: list[TeacherInput], needs: "Needs") -> None:
        """Called (for a remote or read-ahead teacher only) with the next training window while this one
        computes: a source that fetches from elsewhere starts asking now, and `prepare` takes what it got if
        given that window; a cache starts decoding its rows, and `signal` takes them."""

    def begin_step(self, needs: "Needs") -> None:
        """Called once before an optimizer step's (or an evaluation's) micro-batches."""

    def end_step(self) -> None:
        """Called once after them: release what `begin_step` prepared."""

    def signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        """The teacher's signal for one micro-batch."""

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed next-token cross-entropy, loss-bearing tokens) of the teacher on one batch."""

    def params(self) -> int:
        """The teacher model's parameter count (for the run's header)."""

    def where(self) -> str:
        """Where the teacher runs, a few words for the run's header ("ZeRO-3", "offline cache")."""

    def exact_share(self) -> Optional[float]:
        """Share of the teacher-perplexity tokens scored exactly so far (None: all of them)."""

    def separation_forward(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """(ids, position_ids) -> logits, to check the model keeps packed examples apart; None: no model here."""


class TeacherPlan(Protocol):
    """A teacher from the run's config, opened before any weights load."""

    field: str
    """The config field that names it, for error messages ("teacher.path", "teacher.cache")."""
    noun: str
    """What it is, for error messages ("a cache")."""
    source: str
    """Where it is: the model directory, cache directory or server URL the config names."""
    model_config: Any
    """The teacher's transformers config (shapes for the plan; no weights)."""
    tokenizer: Any
    """Its tokenizer, or None where it is checked against the student's another way (a cache's hash)."""

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "TeacherPlan":
        """Open the teacher `cfg.teacher` names (every rank; `rank` 0 alone does one-off checks)."""

    def capabilities(self) -> Capabilities: ...

    def verify(self, ctx: "RunContext") -> None:
        """Refuse, in one line, a run this teacher cannot serve (beyond what capabilities say)."""

    def describe(self) -> str:
        """One line for `dsdistill check`."""

    def plan_json(self) -> dict[str, Any]:
        """What `check --json` says of it."""

    def kd_semantics(self) -> dict[str, Any]:
        """Overrides of the KD semantics run_start records (a sparse teacher fixes the top-k support)."""

    def build(self, plan: Any, *, needs: "Needs") -> TeacherSource:
        """Load what the source needs (a model, a reader) and return it; every rank calls it together."""


@dataclass(frozen=True)
class RunContext:
    """What a teacher plan checks itself against: the run's config, data, components and length."""

    cfg: Any
    splits: Any
    components: dict[str, Any]
    layers: Any
    total_steps: int
    rank: int
