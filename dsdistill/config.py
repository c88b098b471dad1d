"""Typed run configuration (pydantic v2), loaded from YAML or JSON with `--set a.b=value` overrides.

Every validation problem becomes a `ConfigError` whose message is one line naming the field path, the bad
value and what was expected.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from dsdistill.curriculum import CurriculumConfig
from dsdistill.errors import ConfigError, one_line


class _Strict(BaseModel):
    # every number finite: an inf learning rate, weight or temperature passed check and skipped every step
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ModelSpec(_Strict):
    """Where a model (and its tokenizer) is loaded from."""

    path: str
    """Local directory written by `save_pretrained`, or a Hub name."""
    tokenizer: Optional[str] = None
    """Tokenizer location if it differs from `path`."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) when `path` is a Hub name."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust the source."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to transformers."""


class CrossTokenizerConfig(_Strict):
    """`teacher.cross_tokenizer`: distil from a teacher whose tokenizer is not the student's. Each example is
    rendered as text (a chat with each model's own template, from the same messages), tokenised by both, and
    the positions that have read the same text are paired (dsdistill/crosstok.py); KD compares them."""

    method: Literal["shared_topk", "chunk_likelihood"] = "shared_topk"
    """How the two models are compared. `shared_topk` (GOLD's exact part and span merging): at each pair, the
    teacher's next-token distribution on the tokens whose text both vocabularies share (per context: after a
    space, inside a word, elsewhere), its top `top_k` of those against the student's same tokens, and every other
    token's mass, shared or not, as one rest bucket on each side; where the student's next token is one token
    that the teacher spells in several, that token gets the teacher's chain-rule probability of them (taken from
    where the first of them had it); then `loss.kd`'s divergence, temperature and T^2 as for any top-k + rest
    teacher. `chunk_likelihood` (ALM's binarised likelihood matching): the text between two consecutive
    pairs is a chunk; each model's log-likelihood of it (the sum over its own tokens of that text) is compared as
    two Bernoulli probabilities by the binary KL from teacher to student, with the likelihoods raised to 1/T
    (no T^2; `loss.kd`'s divergence must stay forward_kl). It needs no shared token and compares chunks of any
    number of tokens on either side, but sees one number per chunk, not the distribution over other text."""
    top_k: int = Field(64, ge=1, le=4096)
    """`shared_topk`: shared tokens kept per pair (fewer when a context shares fewer)."""
    chat_template: Optional[str] = None
    """The teacher's chat template (text, a file, or `chatml`); default: its tokenizer's own, else the data's."""


class TeacherSpec(ModelSpec):
    """The frozen teacher: a model (`path`), an offline cache of its top-k distributions (`cache`), a teacher
    server (`url`), or another registered kind of teacher (`kind`); `options` configure the chosen one."""

    path: Optional[str] = None  # type: ignore[assignment]
    """Local directory written by `save_pretrained`, or a Hub name."""
    cache: Optional[str] = None
    """A directory written by `dsdistill teacher-cache`: KD from the cached top-k, no teacher model loaded."""
    url: Optional[str] = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    """A teacher server: `dsdistill teacher-serve`'s address, http://HOST:PORT."""
    kind: Optional[str] = None
    """Another registered kind of teacher (dsdistill/teachers/kinds.py)."""
    options: dict[str, Any] = {}
    """Options of the chosen teacher, checked by its own options model (a server: top_k, timeout_s, retries)."""
    placement: Literal["auto", "zero3", "replicated"] = "auto"
    """A model teacher (`path`): sharded over the ranks by ZeRO-3 (`zero3`: no rank holds it whole), or whole on
    every rank's device (`replicated`: no gathers in its forwards). `auto`: replicated on a GPU when its weights
    take at most `replicate_share` of the device's memory, else ZeRO-3 (ZeRO-3 on a CPU)."""
    replicate_share: float = Field(0.25, gt=0, le=1)
    """`placement: auto`: the share of one GPU's memory a replicated teacher may take."""
    cross_tokenizer: Optional[CrossTokenizerConfig] = None
    """Set when the teacher's tokenizer is not the student's (a model, `path`; or a server, `url`, or a cache of
    one, `cache`, with a local copy of its tokenizer in `tokenizer`): see its fields."""

    @model_validator(mode="after")
    def _one_teacher(self) -> "TeacherSpec":
        if sum(v is not None for v in (self.path, self.cache, self.url, self.kind)) != 1:
            raise ValueError("set path (a model), cache (a teacher-cache directory), url (a teacher server) or kind, exactly one")
        if self.cross_tokenizer is not None and self.kind is not None:
            raise ConfigError(
                "teacher.cross_tokenizer: a teacher with another tokenizer is a model (teacher.path), a server "
                "(teacher.url) or a cache (teacher.cache); not a teacher.kind"
            )
        if self.cross_tokenizer is not None and self.path is None and self.tokenizer is None:
            where = "served" if self.url is not None else "cached"
            raise ConfigError(
                f"teacher.tokenizer: a {where} teacher with another tokenizer needs a local copy of that tokenizer "
                "(the data is tokenised here); set teacher.tokenizer to its directory"
            )
        if self.placement != "auto" and self.path is None:
            raise ConfigError(
                f"teacher.placement: {self.placement} places a model this job loads (teacher.path); this teacher has none"
            )
        from dsdistill.teachers.kinds import plan_class

        if self.kind in ("path", "cache", "url"):
            raise ConfigError(f"teacher.kind: {self.kind} is chosen by teacher.{self.kind} itself; leave kind unset")
        try:
            options_model = getattr(plan_class(self.chosen), "Options", None)
        except ValueError as e:
            raise ConfigError(f"teacher.kind: {e}") from None
        if options_model is None:
            if self.options:
                raise ValueError(f"options: a teacher given by {self.chosen} takes none")
            return self
        try:
            self.options = options_model.model_validate(self.options).model_dump()
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, prefix="teacher.options")) from None
        return self

    @property
    def chosen(self) -> str:
        """The kind of teacher this config chooses."""
        return self.kind or ("cache" if self.cache is not None else "url" if self.url is not None else "path")


class NamedTeacher(TeacherSpec):
    """One of several teachers (`teachers:`): a teacher as under `teacher:`, with a name and a weight."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    """Its name in records, console lines and the monitor (`kd.NAME`, `teacher_ppls.NAME`)."""
    weight: float = Field(1.0, gt=0)
    """Its share of the KD term is weight / the sum of the teachers' weights: KD = sum_i share_i KD_i, so the
    objective is the share-weighted sum of the objectives of single-teacher runs on the same batches."""

    @model_validator(mode="after")
    def _one_tokenizer(self) -> "NamedTeacher":
        if self.cross_tokenizer is not None:
            raise ValueError(
                "cross_tokenizer: several teachers read the student's tokens; a teacher with another tokenizer goes under teacher:"
            )
        return self


Format = Literal["text", "chat", "prompt_completion", "pretokenized"]
Packing = Literal["concat", "documents", "none"]


class FormatFields(_Strict):
    """How one data source's examples become token ids and loss masks."""

    format: Format = "text"
    """text: raw documents (every token carries loss); chat: message lists rendered with the chat template
    (loss on assistant turns); prompt_completion: loss on the completion; pretokenized: `input_ids` with
    optional `labels` or `loss_mask`."""
    text_field: str = "text"
    """text: column holding the raw text."""
    separator: Optional[str] = None
    """text: the token that closes each document (a token of the vocabulary, e.g. `<|endoftext|>`); default the
    tokenizer's EOS. For instruct tokenizers the EOS is often the end-of-turn token (`<|im_end|>`), which plain
    documents should not be taught to end with: name the document separator here."""
    messages_field: str = "messages"
    """chat: column holding the list of messages ({role, content}; roles system, user, assistant, tool)."""
    chat_template: Optional[str] = None
    """chat: a Jinja chat template, a path to a .jinja file, or `chatml`; default: the tokenizer's own."""
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """chat: which tokens carry loss: every assistant turn, only the last one, or the whole conversation."""
    prompt_field: str = "prompt"
    """prompt_completion: column holding the prompt text."""
    completion_field: str = "completion"
    """prompt_completion: column holding the completion text (the tokens that carry loss, EOS appended)."""
    input_ids_field: str = "input_ids"
    """pretokenized: column holding the token ids."""
    labels_field: Optional[str] = None
    """pretokenized: column of labels (the ignore index marks tokens without loss); default `labels` if present."""
    loss_mask_field: Optional[str] = None
    """pretokenized: column of 0/1 loss masks (exclusive with labels); default `loss_mask` if present."""


class SourceConfig(FormatFields):
    """One source of a data mixture (`data.sources`)."""

    path: str
    """Local .jsonl/.json/.txt/.csv/.parquet file or dataset directory, or a Hub dataset name."""
    name: Optional[str] = None
    """Name in plans and records; default: the file or directory name."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight: the source's share of training examples is weight / sum of weights."""
    split: str = "train"
    """Split of `path` used for training."""
    eval_path: Optional[str] = None
    """Separate file or dataset for this source's evaluation; default: `eval_split`, else a held-out part."""
    eval_split: Optional[str] = None
    """Split used for this source's evaluation (of `eval_path` if given, else of `path`)."""
    streaming: Optional[bool] = None
    """Read this source lazily (default: `data.streaming`)."""
    teacher: Optional[str] = None
    """With `teachers:`: the name of the one teacher whose KD this source's tokens get (default: every teacher,
    by its share)."""


class DataConfig(FormatFields):
    """Training and evaluation data: one source (`path` and the format fields here) or a mixture (`sources`)."""

    path: Optional[str] = None
    """Local .jsonl/.json/.txt/.csv/.parquet file or dataset directory, or a Hub dataset name."""
    sources: Optional[list[SourceConfig]] = Field(None, min_length=1)
    """A mixture sampled by weight (instead of `path`); each source has its own format fields."""
    split: str = "train"
    """Split of `path` used for training."""
    eval_path: Optional[str] = None
    """Separate file or dataset for evaluation; default: `eval_split` of `path`, else a held-out fraction."""
    eval_split: Optional[str] = None
    """Split used for evaluation (of `eval_path` if given, else of `path`)."""
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    """Fraction of training documents held out for evaluation when no eval split or file is given."""
    eval_examples: int = Field(1000, ge=1)
    """Streaming: examples held out from the start of the stream for evaluation when no eval split or file is
    given (and the most a streamed eval split is read to)."""
    max_documents: Optional[int] = Field(None, ge=1)
    """Use at most this many training documents (for quick runs)."""
    packing: Optional[Packing] = None
    """concat: documents joined and cut into seq_len blocks, attention across them (default for text);
    documents: whole examples packed per sequence, positions restarting and no attention across examples
    (default for the other formats, and for text with `teacher.cross_tokenizer`); none: one example per
    sequence, padded."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """documents/none packing: examples longer than seq_len are cut to seq_len or left out (both counted)."""
    streaming: bool = False
    """Read and tokenise lazily per rank (`datasets` streaming): startup time and memory do not grow with the
    corpus; needs `train.max_steps`."""
    shuffle_buffer: int = Field(10000, ge=1)
    """Streaming: examples in the seeded shuffle buffer."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.path is None) == (self.sources is None):
            raise ValueError("set path (one source) or sources (a mixture), exactly one")
        return self

    def resolved_sources(self) -> list[SourceConfig]:
        """The run's sources: `sources`, or the one source described by `path` and the fields here."""
        if self.sources is not None:
            return list(self.sources)
        fields = {k: getattr(self, k) for k in FormatFields.model_fields}
        assert self.path is not None
        return [SourceConfig(path=self.path, split=self.split, eval_path=self.eval_path, eval_split=self.eval_split, **fields)]


RENAMED_LOSS_KEYS: dict[str, tuple[str, str]] = {
    **{f"kd_{k}": ("kd", k) for k in ("divergence", "beta", "alpha", "top_k", "top_k_rest", "top_k_support")},
    **{f"feature_{k}": ("feature", k) for k in ("layers", "metric", "normalize")},
    "layerwise_layers": ("layerwise", "layers"),
    **{f"attention_{k}": ("attention", k) for k in ("layers", "chunk")},
    **{f"contrastive_{k}": ("contrastive", k) for k in ("dim", "temperature", "gather")},
    "router_conditioned": ("router", "conditioned"),
}
"""Flat `loss.*` keys of configs written before 2026-12-05 -> (section, key): still accepted, with a note."""


class LossConfig(_Strict):
    """Options of the loss: what every component shares here, and one section per component that has
    options (`loss.kd`, `loss.feature`, ...: each component's own options model, composed from the
    registry). Weights live in `curriculum`. Layers are 1-based decoder block numbers; -1 means the last."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True, allow_inf_nan=False)

    ignore_index: int = -100
    """Label value excluded from every token-level loss."""
    fused_logits: bool = True
    """KD and LM from final hidden states and lm_head weights in chunks, never materialising full
    [tokens, vocab] logits (falls back to plain logits for models that transform their logits)."""
    fused_chunk: Optional[int] = Field(None, ge=1)
    """Rows per fused chunk; default: sized by a memory model of every live buffer against `fused_chunk_mib`."""
    fused_chunk_mib: Optional[int] = Field(None, ge=1)
    """Memory budget of one fused KD/LM call (chunk buffers plus the gathered teacher head and the fp32
    gradient buffers), MiB; default: half of the GPU's free memory, or 256 MiB on CPU."""
    fused_compile: bool = False
    """torch.compile the fused head's per-chunk math (dense forward KL + LM: one fused kernel per chunk; other
    divergences and top-k run eagerly). Needs Triton on a GPU or a C++ compiler on CPU; the first step pays
    the compile (tens of seconds); where it cannot compile, a one-line note and the eager path."""
    _renamed: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data, renamed = dict(data), []
        for old, (section, key) in RENAMED_LOSS_KEYS.items():
            if old in data:
                part = data.get(section) or {}
                if not isinstance(part, dict) or key in part:
                    raise ConfigError(f"loss.{old}: given twice (also as loss.{section}.{key}); keep loss.{section}.{key}")
                data[section] = {**part, key: data.pop(old)}
                renamed.append(f"loss.{old} is now loss.{section}.{key}")
        if renamed:
            data["__renamed__"] = renamed
        return data

    @model_validator(mode="after")
    def _sections(self) -> "LossConfig":
        from dsdistill.registry import option_sections

        extra = dict(self.model_extra or {})
        self._renamed = list(extra.pop("__renamed__", []))
        sections = option_sections()
        for key in extra:
            if key not in sections:
                allowed = sorted([*type(self).model_fields, *sections])
                raise ConfigError(f"loss.{key}: unknown key; expected one of: {', '.join(allowed)}")
        self.__pydantic_extra__ = {}  # the sections in registry order, each its own model
        for name, model in sections.items():
            value = extra.get(name)
            try:
                section = value if isinstance(value, model) else model.model_validate({} if value is None else value)
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, prefix=f"loss.{name}")) from None
            setattr(self, name, section)
        return self

    def section(self, name: str) -> Any:
        """The options of `loss.<name>` (a component's options model, filled with its defaults if not given)."""
        return getattr(self, name)

    @property
    def renamed(self) -> list[str]:
        """Old flat keys this config used (each said once as a note when it is loaded)."""
        return self._renamed


class OptimizerConfig(_Strict):
    """Student optimizer, used when the DeepSpeed config has no `optimizer` block."""

    name: Literal["adamw"] = "adamw"
    """Optimizer type."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    """Adam betas, each in [0, 1)."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""


class SchedulerConfig(_Strict):
    """Learning-rate schedule over optimizer steps, used when the DeepSpeed config has no `scheduler`."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup length in optimizer steps; the first step already uses lr/warmup_steps, never 0."""
    warmup_ratio: Optional[float] = Field(None, ge=0, lt=1)
    """Warmup as a fraction of total optimizer steps (instead of `warmup_steps`)."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final LR as a fraction of the peak LR."""

    @model_validator(mode="after")
    def _one_warmup(self) -> "SchedulerConfig":
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class TrainConfig(_Strict):
    """Length, batch shape, precision and seed of training."""

    max_steps: Optional[int] = Field(None, ge=1, le=10**9)
    """Total optimizer steps. Exclusive with `epochs`; if neither is set, one epoch."""
    epochs: Optional[int] = Field(None, ge=1, le=100_000)
    """Passes over the training data (converted to optimizer steps)."""
    micro_batch_size: int = Field(4, ge=1)
    """Sequences per rank per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    seq_len: int = Field(512, ge=2)
    """Tokens per packed training sequence."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision of both engines; auto = bf16 on a GPU that supports it, else fp32."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seed for initialisation, data order and sampling (0 .. 2^32 - 1, what every RNG involved accepts)."""
    grad_clip: Optional[float] = Field(1.0, gt=0)
    """Global gradient-norm clip (None disables)."""
    max_bad_steps: int = Field(5, ge=1)
    """Stop the run after this many consecutive optimizer steps with a non-finite loss or gradient (each
    such step is skipped, weights untouched)."""
    stop_at_step: Optional[int] = Field(None, ge=1)
    """End this launch after this optimizer step, with a checkpoint, without changing the schedule (for
    time-boxed sessions such as notebooks); the next launch resumes."""
    signal_grace_s: float = Field(5.0, ge=0)
    """Seconds after a first SIGTERM/SIGINT/SIGHUP during which further stop signals count as the same
    preemption (the process group and the launcher both deliver it); a signal after that exits at once
    without saving."""

    @model_validator(mode="after")
    def _length(self) -> "TrainConfig":
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        return self


class EarlyStoppingConfig(_Strict):
    """Stop when an eval metric stops improving. The default metric is the student's eval perplexity:
    the curriculum-weighted objective is not used by default because its weights move during training,
    so a rising objective can mean a new component was switched on rather than a worse model."""

    metric: Literal["ppl", "lm_ce", "kd", "objective"] = "ppl"
    """Eval metric watched (lower is better)."""
    patience: Optional[int] = Field(None, ge=1)
    """Evaluations without improvement before stopping; None disables early stopping."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest decrease that counts as an improvement."""


class EvalConfig(_Strict):
    """Periodic evaluation on the held-out split."""

    every: int = Field(100, ge=0)
    """Evaluate every this many optimizer steps (0: only at the end)."""
    at_start: bool = True
    """Also evaluate before the first optimizer step (the baseline the run improves on)."""
    max_batches: Optional[int] = Field(None, ge=1)
    """Evaluate on at most this many micro-batches per rank."""
    micro_batch_size: Optional[int] = Field(None, ge=1)
    """Eval micro-batch size; default `train.micro_batch_size`."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Early-stopping rule."""


class GenerationConfig(_Strict):
    """How on-policy completions are sampled from the student (`curriculum.on_policy`)."""

    max_new_tokens: int = Field(64, ge=1)
    """Longest completion (also bounded by what is left of train.seq_len after the prompt)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens holding this much probability (1 keeps all)."""
    top_k: Optional[int] = Field(None, ge=1)
    """Sample among the k most likely tokens only (None: all)."""
    samples_per_prompt: int = Field(1, ge=1)
    """Completions sampled per prompt (each fills one of the step's on-policy sequences)."""
    stop_tokens: list[str] = []
    """Tokens that end a completion besides the EOS (with `stop_on_eos`): chat templates end a turn with a
    token that is often not the tokenizer's EOS, e.g. `<|im_end|>`. Each must be one token of the vocabulary."""
    eval_prompts: Optional[int] = Field(None, ge=0, le=4096)
    """Held-out prompts per rank the student completes at each evaluation, scored by the teacher (completion
    length, stop rate, reverse KL of the student's own samples). None: 8 in an on-policy run and none in an
    off-policy run; a number applies to either (an off-policy baseline for on-policy runs); 0 turns it off."""
    stop_on_eos: bool = True
    """End a completion at the tokenizer's EOS (which then carries loss)."""

    def prompts(self, on_policy: bool) -> int:
        """Held-out prompts per rank each evaluation completes (`eval_prompts`, resolved for the run)."""
        if self.eval_prompts is not None:
            return self.eval_prompts
        return 8 if on_policy else 0

    def probes(self, on_policy: bool) -> bool:
        """Whether evals complete held-out prompts with the student."""
        return self.prompts(on_policy) > 0


class DeepSpeedSection(_Strict):
    """DeepSpeed JSON for the two engines: a path, an inline mapping, or None for the built-in default.
    Values set to "auto" are filled from this run config."""

    student: Union[str, dict[str, Any], None] = None
    """Student engine config (ZeRO 1, 2 or 3, optional offload); default: ZeRO-2."""
    teacher: Union[str, dict[str, Any], None] = None
    """Teacher engine config; must be ZeRO stage 3 without optimizer; default: ZeRO-3 inference."""


class OutputConfig(_Strict):
    """Where the run writes, and how often it logs."""

    run_dir: str = Field("runs/default", min_length=1, pattern=r"\S")
    """Run directory: resolved config, metrics.jsonl, checkpoints."""
    log_every: int = Field(10, ge=1)
    """Print a log line and write a train record every this many optimizer steps."""


class CheckpointConfig(_Strict):
    """DeepSpeed checkpoints of the student (weights, optimizer, scheduler) plus the loop's own state."""

    every: int = Field(0, ge=0)
    """Save every this many optimizer steps (0: only at the end, if `save_final`)."""
    every_minutes: float = Field(30.0, ge=0)
    """Also save once this many minutes passed since the run started or last saved (rank 0's clock, agreed at
    a step), so a stop without warning (SIGKILL, a lost node) costs at most about this much; 0 disables."""
    save_final: bool = True
    """Save when the run ends (completed or early-stopped)."""
    keep_last: int = Field(3, ge=1)
    """Checkpoints kept in `<run_dir>/checkpoints`; older ones are deleted after a successful save."""
    keep_best: bool = True
    """Also keep a checkpoint of the best eval (by eval.early_stopping.metric); never pruned."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the run directory's latest checkpoint if there is one; never: start fresh."""
    resume_tag: Optional[str] = None
    """Resume from this checkpoint (`stepN` in `<run_dir>/checkpoints`) instead of the one `latest` names."""


class RunConfig(_Strict):
    """A distillation run."""

    teacher: Optional[TeacherSpec] = None
    """The frozen teacher (or give several in `teachers`)."""
    teachers: Optional[list[NamedTeacher]] = Field(None, min_length=2, max_length=8)
    """Several frozen teachers (instead of `teacher`), KD against each by its weight. They distil logits:
    components that read one teacher's hidden states or attention need `teacher`."""
    student: ModelSpec
    """The trainable student."""
    data: DataConfig
    """Training and eval text."""
    curriculum: CurriculumConfig = CurriculumConfig()
    """Component weights and temperature over training."""
    loss: LossConfig = LossConfig()
    """Loss options."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Student optimizer."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Student LR schedule."""
    train: TrainConfig = TrainConfig()
    """Training length and batch shape."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of on-policy completions (used when curriculum.on_policy is above 0)."""
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    """DeepSpeed engine configs."""
    output: OutputConfig = OutputConfig()
    """Run directory and logging."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Saving and resuming."""

    @model_validator(mode="after")
    def _one_kind_of_teacher(self) -> "RunConfig":
        if (self.teacher is None) == (self.teachers is None):
            raise ConfigError("teacher: set teacher (one teacher) or teachers (a list of named teachers), exactly one")
        names = [t.name for t in self.teachers or []]
        if len(set(names)) != len(names):
            raise ConfigError(f"teachers: names must differ; got {', '.join(names)}")
        for i, source in enumerate(self.data.sources or []):
            if source.teacher is not None and source.teacher not in names:
                expected = f"one of the teachers' names ({', '.join(names)})" if names else "the name of one of `teachers:`"
                raise ConfigError(f"data.sources.{i}.teacher: got {source.teacher!r}; expected {expected}")
        return self

    def routes(self) -> Optional[list[int]]:
        """Per data source, the index of the one teacher its tokens are distilled from (-1: every teacher by
        its share); None when no source names one."""
        if not any(s.teacher for s in self.data.sources or []):
            return None
        names = [t.name for t in self.teachers or []]
        return [names.index(s.teacher) if s.teacher else -1 for s in self.data.resolved_sources()]

    def one_teacher(self, command: str) -> TeacherSpec:
        """`teacher:` for a command that runs one teacher (a one-line error naming `command` with `teachers:`)."""
        if self.teacher is None:
            raise ConfigError(f"{command}: runs one teacher; give it as teacher: (the config lists teachers:)")
        return self.teacher


# ---------------------------------------------------------------------------------------------- loading

_UNION_TAGS = {"constant", "linear", "cosine", "str", "dict[str,any]", "function-after[_one_warmup(), SchedulerConfig]"}


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as Optional[list[Model]] (or None)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names accepted at the mapping that contains `loc[-1]` (for 'unknown key' messages)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (data.sources[0])
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        model = _model_in(fields[part].annotation)
    fields = getattr(model, "model_fields", None)
    return sorted(fields) if fields else []


def format_validation_error(err: ValidationError, *, prefix: str = "") -> str:
    """One line: `<field path>: got <value>; expected <what>` for the first error (+N more)."""
    errors = err.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
    path = ".".join(str(p) for p in loc) or "<top level>"
    if prefix:
        path = f"{prefix}.{path}" if loc else prefix
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        msg = f"{path}: unknown key" + (f"; expected one of: {', '.join(allowed)}" if allowed else "")
    elif kind == "missing":
        msg = f"{path}: required field is missing"
    else:
        text = first["msg"]
        text = text.removeprefix("Value error, ")
        if text.startswith("Input should be "):
            text = "expected " + text[len("Input should be ") :]
        value = first.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{path}: got {shown}; {text}"
    more = len(errors) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    return one_line(msg)


MAX_NODES = 1_000_000
"""Values a config may hold once its YAML aliases are expanded (a 240-byte alias bomb grew past 3 GB)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (lines {seen[key]} and {line}); give each key once", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(obj: Any, memo: dict[int, int]) -> int:
    """How many values `obj` holds with shared (aliased) parts counted each time they appear."""
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = MAX_NODES + 1  # a cycle (a recursive alias) counts as too large
    items = obj.values() if isinstance(obj, dict) else obj
    total = 1
    for v in items:
        total += _expanded_size(v, memo)
        if total > MAX_NODES:
            break
    memo[id(obj)] = total
    return total


def parse_yaml(text: str, *, where: str) -> Any:
    """YAML as plain data: no duplicate keys, and no alias expansion beyond MAX_NODES values."""
    data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass: plain data only
    if _expanded_size(data, {}) > MAX_NODES:
        raise ConfigError(f"{where}: its aliases expand to more than {MAX_NODES:,} values; refusing to expand them")
    return data


def _json_no_duplicates(text: str, where: str) -> Any:
    def pairs(items):
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                lines = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(re.escape(json.dumps(k)) + r"\s*:", text)][:2]
                at = f" (lines {lines[0]} and {lines[1]})" if len(lines) == 2 else ""
                raise ConfigError(f"{where}: duplicate key {k!r}{at}; give each key once")
            out[k] = v
        return out

    return json.loads(text, object_pairs_hook=pairs)


def read_mapping(path: str | Path, *, what: str = "config file") -> dict[str, Any]:
    """Read a YAML or JSON file that must hold a mapping; one-line `ConfigError` otherwise."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} '{p}' does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(one_line(f"{what} '{p}' cannot be read: {e}")) from None
    try:
        data = _json_no_duplicates(text, f"{what} '{p}'") if p.suffix == ".json" else parse_yaml(text, where=f"{what} '{p}'")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} '{p}': invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(one_line(f"{what} '{p}': invalid YAML{where}: {getattr(e, 'problem', e)}")) from None
    except RecursionError:
        raise ConfigError(f"{what} '{p}': nested too deeply") from None
    if data is None:
        raise ConfigError(f"{what} '{p}' is empty; expected a mapping")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}': expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML, so numbers, booleans and lists work)."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE")
        try:
            value = parse_yaml(raw, where=f"--set {key}") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


_SAID: set[str] = set()


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a plain mapping into a `RunConfig` (an old key gets a one-line note, from rank 0, once)."""
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    for note in cfg.loss.renamed:
        if note not in _SAID and os.environ.get("RANK", "0") == "0":
            _SAID.add(note)
            print(f"dsdistill: note: {note} (the old key still works)", file=sys.stderr, flush=True)
    return cfg


BUNDLED_DS_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"


def _resolve_ds_paths(data: dict[str, Any], config_dir: Path) -> dict[str, Any]:
    """A relative `deepspeed.student`/`teacher` path, as the config file means it: from the config file's
    folder, else from the bundled ds_configs/ (`zero3.json`), else from the current directory as given."""
    ds = data.get("deepspeed")
    if not isinstance(ds, dict):
        return data
    for key in ("student", "teacher"):
        value = ds.get(key)
        if not isinstance(value, str) or Path(value).expanduser().is_absolute():
            continue
        for base in (config_dir, BUNDLED_DS_CONFIGS):
            if (base / value).is_file():
                ds[key] = str((base / value).resolve())
                break
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a run config file."""
    data = apply_overrides(read_mapping(path), overrides or [])
    return validate(_resolve_ds_paths(data, Path(path).resolve().parent))


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain JSON-able data."""
    return cfg.model_dump(mode="json")
