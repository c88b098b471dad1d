"""The metrics stream contract: one JSON object per line in `<run_dir>/metrics.jsonl`.

Imported by both the trainer (which writes) and the monitor (which reads). Every record has `kind`,
`step` (the optimizer step, `engine.global_steps`, at which the curriculum was evaluated for it) and `time`
(unix seconds). A train record at step s and an eval record at step s used identical weights.
Non-finite floats are written as the JSON extensions NaN / Infinity, which Python's json reads back.
"""

from __future__ import annotations

import json
import time as _time
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
METRICS_FILE = "metrics.jsonl"


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    step: int = Field(ge=0)
    """Optimizer step (engine.global_steps) the curriculum was evaluated at."""
    time: float = Field(default_factory=_time.time)
    """Unix seconds when the record was written."""


class RunStart(_Record):
    """Written once when a run (or a resumed run) starts."""

    kind: Literal["run_start"] = "run_start"
    schema_version: int = SCHEMA_VERSION
    """Version of this schema."""
    config: dict[str, Any]
    """The resolved run config."""
    total_steps: int
    """Total optimizer steps of the run."""
    world_size: int
    """Number of data-parallel ranks."""
    schedule: dict[str, Any]
    """The full curriculum definition (see `Curriculum.definition`)."""
    global_batch: int = 0
    """Sequences per optimizer step over all ranks."""
    seq_len: int = 0
    """Tokens per sequence."""
    student_zero_stage: int = 0
    teacher_zero_stage: int = 3
    teacher_placement: list[str] = []
    """Where each teacher model of the job keeps its weights: "zero3" (sharded over the ranks, at
    `teacher_zero_stage`) or "replicated" (whole on each rank); empty when no teacher model is in the job."""
    student_params: int = 0
    teacher_params: int = 0
    resumed: bool = False
    """True when the run continued from a checkpoint at `step`."""
    data: dict[str, Any] = {}
    """The data plan: packing, examples, tokens, loss-bearing tokens and their share, per source (see
    `dsdistill.data.plan_json`; streamed sources' counts are estimates from their first examples)."""
    lr_schedule: str = ""
    """Which LR schedule runs: run.yaml's `scheduler`, or the DeepSpeed config's scheduler block."""
    kd: dict[str, Any] = {}
    """How KD enters the objective: `divergence`, `t2_scaled` (whether it is multiplied by T^2; tv is not),
    `top_k_support` (whose top-k tokens it compares, when `loss.kd.top_k` or a cache limits them)."""


class TrainRecord(_Record):
    """One optimizer step's (or log interval's last step's) training numbers."""

    kind: Literal["train"] = "train"
    weights: dict[str, float]
    """Curriculum weight per active component at `step`."""
    losses: dict[str, float]
    """Raw (unweighted) token-weighted mean per component over the step's accumulation window."""
    weighted: dict[str, float] = {}
    """weight x raw per component."""
    objective: float
    """sum of weighted components: the number the optimizer minimised."""
    lr: float
    """Learning rate the optimizer used for this step (read from the engine)."""
    temperature: float
    """KD temperature at `step`."""
    tokens_per_s: float
    """Training throughput over the log interval (tokens on all ranks per second)."""
    tokens: int = 0
    """Tokens trained on so far, all ranks."""
    progress: float = 0.0
    """Fraction of total optimizer steps done after this step."""
    total_steps: int = 0
    grad_norm: Optional[float] = None
    """Global gradient norm before clipping, if the engine reports it."""
    metrics: dict[str, float] = Field(default={}, validation_alias=AliasChoices("metrics", "extras"))
    """The computed components' diagnostics, by the names they declare (e.g. kd_kl: KD's divergence before
    T^2 scaling). Files written before 2026-12-05 call this `extras`."""
    mem_gib: Optional[float] = None
    """Peak accelerator memory on rank 0 since the run started, GiB (None on CPU)."""
    gate_usage: Optional[list[float]] = None
    """Router: mean gate per teacher layer (sums to 1), when the run has a router."""
    on_policy: Optional[float] = None
    """curriculum.on_policy at `step` (None when the run never samples from the student)."""
    rollout: Optional[dict[str, float]] = None
    """This step's on-policy sampling over all ranks: sequences, rollout_tokens, generation_s,
    tokens_per_s, mean_completion (None at on_policy 0)."""
    teacher_wait: Optional[float] = None
    """A remote teacher (a server): the share of rank 0's step spent waiting for its answers; an offline cache:
    the share its training thread spent getting the cache's rows (waiting for the read-ahead thread, or
    decoding them itself). Near 0 when the next window's signals are ready while this one computes (None:
    the teacher runs in the job)."""


class EvalRecord(_Record):
    """An evaluation at optimizer step `step`, with the curriculum at that same step."""

    kind: Literal["eval"] = "eval"
    on_policy: dict[str, Any] = {}
    """On-policy runs: held-out prompts completed by the student at this step and scored by the teacher:
    `completions`, `mean_length` (tokens), `stop_rate` (share that ended on a stop token), `reverse_kl` (per
    sampled token, E_student[log q - log p]: what on-policy distillation lowers) and a few `samples`
    ({prompt, completion, teacher_logprob}: the teacher's mean log-prob per completion token)."""
    weights: dict[str, float]
    losses: dict[str, float]
    weighted: dict[str, float] = {}
    objective: float
    """Objective at the current weights: comparable to the train objective at the same step."""
    temperature: float
    lm_ce: float
    """Token-weighted LM cross-entropy of the student."""
    ppl: float
    """exp(lm_ce)."""
    teacher_ppl: Optional[float] = None
    """Teacher perplexity on the same eval set (computed once). Several teachers: exp of their share-weighted
    cross-entropy (each one's own is in `teacher_ppls`)."""
    teacher_ppls: dict[str, float] = {}
    """`teachers:`: each teacher's perplexity on the same eval set, by name (empty with one teacher)."""
    teacher_ppl_exact_share: Optional[float] = None
    """Share of the eval tokens whose teacher log-prob is exact; below 1 for an offline cache, where a label
    outside the cached top-k is estimated from the rest mass (the monitor then draws no teacher reference
    line). None: every token exact (a live teacher)."""
    tokens: int = 0
    """Eval tokens over all ranks."""
    metrics: dict[str, float] = {}
    """Every component's diagnostics on the eval set, by the names they declare."""
    best: Optional[float] = None
    """Best value so far of the early-stopping metric."""
    bad_evals: int = 0
    """Evaluations since the last improvement."""
    early_stop_metric: str = "ppl"
    sources: dict[str, dict[str, float]] = {}
    """A mixture's eval per source: {name: {lm_ce, ppl, teacher_ppl, tokens, objective}} (empty for one source)."""


class AlertRecord(_Record):
    """Something a person watching the run should see."""

    kind: Literal["alert"] = "alert"
    level: Literal["info", "warning", "error"] = "warning"
    code: str
    """Stable identifier, e.g. lr_zero, nan_loss."""
    message: str


class RankUsage(BaseModel):
    """One rank's resources when a system record was written."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    rank: int
    rss_gib: float
    """Resident memory of the rank's process."""
    peak_rss_gib: Optional[float] = None
    """The process's largest resident memory since the rank's previous system record (Linux; elsewhere
    since the process started)."""
    gpu_mem_gib: Optional[float] = None
    """GPU memory the rank's allocator holds (reserved), None on CPU."""
    gpu_peak_gib: Optional[float] = None
    """The allocator's largest allocation total since the rank's previous system record, None on CPU."""
    gpu_mem_total_gib: Optional[float] = None
    gpu_util: Optional[float] = None
    """GPU utilisation in percent (None where the driver library is not available)."""


class SystemRecord(_Record):
    """Resources of every rank (gathered by rank 0) and of rank 0's host, written every few log steps."""

    kind: Literal["system"] = "system"
    ranks: list[RankUsage] = []
    host_mem_used_gib: Optional[float] = None
    host_mem_total_gib: Optional[float] = None
    estimate_gib: Optional[float] = None
    """`dsdistill check`'s memory estimate per rank (teacher shard, student states, logits; activations
    excluded), to read beside the measured peaks."""


class RunEnd(_Record):
    """Written once when a run stops, for any reason."""

    kind: Literal["run_end"] = "run_end"
    reason: Literal["completed", "early_stopping", "paused", "interrupted", "error"]
    """paused: train.stop_at_step reached, resumable."""
    message: str = ""
    best: Optional[float] = None


Record = Annotated[Union[RunStart, TrainRecord, EvalRecord, AlertRecord, SystemRecord, RunEnd], Field(discriminator="kind")]
_ADAPTER = TypeAdapter(Record)
KINDS: tuple[str, ...] = tuple(
    m.model_fields["kind"].default for m in (RunStart, TrainRecord, EvalRecord, AlertRecord, SystemRecord, RunEnd)
)
"""Every record kind this version writes (a reader skips others, from a newer writer, as unknown)."""


def parse_line(line: str | bytes) -> Optional[Record]:
    """A record from one line of metrics.jsonl, or None if the line is not a valid record.
    (JSON decoding and validation both run in pydantic-core: about 4 us a line.)"""
    try:
        return _ADAPTER.validate_json(line)
    except ValidationError:
        return None


def dumps(record: BaseModel) -> str:
    """One line of JSON for a record."""
    return json.dumps(record.model_dump(), separators=(",", ":"), allow_nan=True)
