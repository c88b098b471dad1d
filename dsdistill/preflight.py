"""Everything that can be checked before any weights load: the plan of a run.

`dsdistill check` prints it; training builds on it. Every failure is a one-line `DistillError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dsdistill.components.base import implementation
from dsdistill.config import RunConfig
from dsdistill.curriculum import Curriculum
from dsdistill.data import MixedStream, Splits, TrainStream, build_splits, make_stream, plan_json
from dsdistill.ds_config import lr_schedule, precision_of, resolve_student, resolve_teacher, zero_stage
from dsdistill.engines import warmup_steps_of
from dsdistill.errors import ConfigError, DataError, ModelError
from dsdistill.heads import HeadShape
from dsdistill.layers import LayerMap
from dsdistill.models import DTYPES, count_params, load_tokenizer, meta_model
from dsdistill.models import load_config as load_model_config
from dsdistill.rundir import LOCK_FILE, refuse_link
from dsdistill.teachers.base import Capabilities, RunContext, TeacherPlan
from dsdistill.teachers.build import check_serves, open_teacher
from dsdistill.teachers.mixture import plans_of


@dataclass(frozen=True)
class Plan:
    """The facts of a validated run: no engines, no data, nothing that changes while it trains."""

    cfg: RunConfig
    rank: int
    world: int
    run_dir: Path
    curriculum: Curriculum
    vocab: int
    """Tokens of the shared tokenizer (logits are cut to it: embedding matrices are often padded)."""
    teacher_config: Any
    student_config: Any
    total_steps: int
    precision: str
    ds_student: dict
    ds_teacher: dict
    layers: LayerMap
    left_out: dict
    """Scheduled components this run cannot compute for these models, with the reason (warned, not run)."""
    teacher: Capabilities
    """What the run's teacher can supply (its kind is never asked)."""
    teacher_names: tuple[str, ...] = ()
    """`teachers:`: their names, in config order (empty: one teacher)."""
    teacher_shards: tuple[tuple[Any, str], ...] = ()
    """(config, placement) of each teacher model whose weights this job holds, "zero3" (sharded over the ranks)
    or "replicated" (whole on each): what the memory estimate counts."""
    fused_off: Optional[str] = None
    """Why fused KD/LM cannot run for these models (then full logits are used), or None."""

    @property
    def fused(self) -> bool:
        """KD and LM run chunked from final hidden states (no [tokens, vocab] logits)."""
        return self.cfg.loss.fused_logits and self.fused_off is None

    @property
    def head_shape(self) -> HeadShape:
        """The shapes the fused head sizes its chunks by."""
        return HeadShape(
            vocab=self.vocab,
            s_width=self.student_config.hidden_size,
            t_width=getattr(self.teacher_config, "hidden_size", 0),
            t_bytes=DTYPES[self.precision].itemsize,
            tokens=self.cfg.train.micro_batch_size * self.cfg.train.seq_len,
        )

    @property
    def global_batch(self) -> int:
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum * self.world


@dataclass
class RunData:
    """The run's tokenizer and data: the packed splits and the (resumable) training stream of this rank."""

    tokenizer: Any
    splits: Splits
    stream: TrainStream | MixedStream
    teacher: TeacherPlan
    """The teacher, opened and checked against this run (no weights loaded)."""


def _placed(plan: Plan) -> str:
    """`, ZeRO-3, frozen` / `, replicated on each rank, frozen` for the teacher models this job holds."""
    where = {p for _, p in plan.teacher_shards}
    if not where:
        return ""
    said = {"zero3": f"ZeRO-{zero_stage(plan.ds_teacher)}", "replicated": "replicated on each rank"}
    return ", " + " and ".join(said[w] for w in sorted(where, reverse=True)) + ", frozen"


def describe(plan: Plan, data: RunData) -> str:
    """A few lines a person reads before launching."""
    c = plan.cfg
    s = plan.student_config
    steps = f"{plan.total_steps} optimizer steps"
    if data.stream.batches_per_epoch is not None:
        steps += f" ({data.stream.batches_per_epoch // c.train.grad_accum} per epoch)"
    lines = [
        f"world size {plan.world}; global batch {plan.global_batch} sequences = micro {c.train.micro_batch_size}"
        f" x accumulation {c.train.grad_accum} x world {plan.world}; {plan.global_batch * c.train.seq_len:,} tokens per optimizer step",
        f"training: {steps}; eval: {len(data.splits.eval)} sequences",
        *describe_data(data.splits, c.train.seq_len),
        *separator_lines(c, data.tokenizer),
        *generation_lines(plan),
        f"{'teachers' if plan.teacher_names else 'teacher'}: {data.teacher.describe()}" + _placed(plan),
        *getattr(data.teacher, "plan_lines", list)(),
        f"student: {c.student.path} ({getattr(s, 'num_hidden_layers', '?')} layers, width {getattr(s, 'hidden_size', '?')}), ZeRO-{zero_stage(plan.ds_student)}, precision {plan.precision}",
        f"LR schedule: {lr_schedule(c, plan.ds_student)}",
        f"curriculum: computes {', '.join(plan.curriculum.active)}"
        + (f"; scheduled but not computed: {', '.join(plan.curriculum.inactive)}" if plan.curriculum.inactive else ""),
        *(f"warning: {name} is left out: {why}" for name, why in plan.left_out.items()),
        *(
            [f"note: fused KD/LM is off because {plan.fused_off}; full logits are used"]
            if c.loss.fused_logits and plan.fused_off
            else []
        ),
        *skipped_warnings(data.splits, c),
        *(
            [f"warning: {data.splits.unknown_share:.1%} of the training tokens are the tokenizer's unknown token"]
            if data.splits.unknown_share > 0.01
            else []
        ),
        f"run dir: {plan.run_dir}",
    ]
    m = estimate_memory(plan)
    logits_how = (
        f"fused: chunks of {m['chunk_rows']} positions x {plan.vocab} vocab"
        if c.loss.fused_logits
        else f"{c.train.micro_batch_size} x {c.train.seq_len} x {plan.vocab} vocab"
    )
    lines.append(
        f"memory per {_device_word()} (estimate, activations excluded): teacher shard {_size(m['teacher_shard'])}, "
        f"student weights+grads+optimizer {_size(m['student_states'])}, logits {_size(m['logits'])} "
        f"({logits_how}), total {_size(m['total'])}"
    )
    return "\n".join(lines)


def show_examples(cfg: RunConfig, tokenizer, *, count: int = 1) -> list[str]:
    """The first `count` examples of each source as the run renders them, with «» around the tokens that
    carry loss (what `check --show-example` prints)."""
    from dsdistill.data import load_source, source_names
    from dsdistill.formats import renderer

    sources = cfg.data.resolved_sources()
    out = []
    for name, src in zip(source_names(sources), sources):
        ds = load_source(src.path, "train", field="data.path", streaming=True)
        rows = [r for _, r in zip(range(count), ds)]
        if not rows:
            continue
        render = renderer(src, tokenizer, field="data", where=name, ignore_index=cfg.loss.ignore_index, columns=list(rows[0]))
        batch = {k: [r.get(k) for r in rows] for k in rows[0]}
        for i, ex in enumerate(render(batch, list(range(len(rows))))):
            out.append(f"example {i} of {name} ({src.format}; «» marks the tokens that carry loss):")
            if ex is None:
                out.append("  (renders to nothing: no token carries loss, or empty)")
                continue
            out.append(_marked(tokenizer, ex.ids, ex.loss))
    return out


def _marked(tokenizer, ids: list[int], loss: list[bool]) -> str:
    """Decoded text with «» around each run of loss-bearing tokens; control characters other than newlines
    and tabs shown escaped (this goes to a terminal)."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or loss[i] != loss[start]:
            text = tokenizer.decode(ids[start:i])
            parts.append(f"«{text}»" if loss[start] else text)
            start = i
    text = "".join(parts)
    return "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def separator_lines(cfg: RunConfig, tokenizer) -> list[str]:
    """Which token closes each text document, per text source (the EOS of an instruct tokenizer is often its
    end-of-turn token: the user should see which one is used)."""
    from dsdistill.data import source_names
    from dsdistill.formats import separator_id

    sources = cfg.data.resolved_sources()
    out = []
    for name, src in zip(source_names(sources), sources):
        if src.format == "text":
            sid = separator_id(src, tokenizer, field="data")
            token = tokenizer.convert_ids_to_tokens(sid) if sid is not None else None
            how = "data.separator" if src.separator is not None else "the tokenizer's EOS; set data.separator to change it"
            out.append(f"  {name}: documents end with {token!r} (id {sid}, {how})")
    return out


def generation_lines(plan: "Plan") -> list[str]:
    """On-policy sampling, when the curriculum ever asks for it: the schedule and the generation settings."""
    cur, g = plan.curriculum, plan.cfg.generation
    if not cur.ever_on_policy:
        if g.probes(False):
            return [
                f"probe: each eval completes {g.prompts(False)} held-out prompts per rank with the student (length, stop rate, reverse KL)"
            ]
        return []
    sched = cur.config.on_policy
    what = (
        f"{sched.value:g} of each step's sequences"
        if sched.kind == "constant"
        else f"{sched.kind} {sched.start_value:g} -> {sched.end_value:g} over progress {sched.start:g}-{sched.end:g}"
    )
    return [
        f"on-policy: {what} sampled from the student and scored by the teacher; generation: max_new_tokens "
        f"{g.max_new_tokens}, temperature {g.temperature:g}, top_p {g.top_p:g}, top_k {g.top_k or 'off'}, "
        f"{g.samples_per_prompt} sample(s) per prompt, stop on EOS {'yes' if g.stop_on_eos else 'no'}"
        + (f" and on {', '.join(map(repr, g.stop_tokens))}" if g.stop_tokens and g.stop_on_eos else "")
        + (
            f"; each eval completes {g.prompts(True)} held-out prompts per rank (length, stop rate, reverse KL)"
            if g.probes(True)
            else ""
        )
    ]


def describe_data(splits: Splits, seq_len: int) -> list[str]:
    """The data plan: per source, examples, tokens, loss-bearing tokens and their share, what packing did."""
    lines = [
        f"data: packing {splits.packing}" + (", streamed (counts estimated from the first examples)" if splits.streamed else "")
    ]
    for s in splits.sources:
        t = s.train
        how = f"first {s.sampled:,} examples" if s.estimated else f"{t.examples:,} examples"
        if s.rows is not None and s.estimated:
            how += f" of {s.rows:,}"
        lines.append(
            f"  {s.name} ({s.format}{', weight ' + format(s.weight, 'g') if len(splits.sources) > 1 else ''}): {how}, "
            f"{t.tokens:,} tokens in {t.sequences:,} sequences of {seq_len}, {t.loss_tokens:,} carry loss ({t.loss_share:.1%})"
            + (f"; {t.truncated:,} overlong truncated" if t.truncated else "")
            + (f"; {t.dropped:,} overlong dropped" if t.dropped else "")
            + (f"; {t.emptied:,} left out: truncation cut away all their loss-bearing tokens" if t.emptied else "")
            + f"; eval {s.eval.sequences:,} sequences"
        )
    return lines


def skipped_warnings(splits: Splits, cfg: RunConfig) -> list[str]:
    out = []
    for s in splits.sources:
        n = s.train.skipped + s.eval.skipped
        if not n:
            continue
        what = (
            f"documents with a null or empty '{cfg.data.text_field}'"
            if s.format == "text" and len(splits.sources) == 1
            else f"examples of {s.name} with no token that carries loss (or empty)"
        )
        out.append(f"warning: {n} {what} are skipped" + (" (in the sample)" if s.estimated else ""))
    return out


def plan_dict(plan: "Plan", data: RunData) -> dict[str, Any]:
    """The whole plan as JSON-able data (`dsdistill check --json`)."""
    c = plan.cfg
    return {
        "world_size": plan.world,
        "global_batch": plan.global_batch,
        "micro_batch_size": c.train.micro_batch_size,
        "grad_accum": c.train.grad_accum,
        "seq_len": c.train.seq_len,
        "tokens_per_step": plan.global_batch * c.train.seq_len,
        "total_steps": plan.total_steps,
        "steps_per_epoch": None if data.stream.batches_per_epoch is None else data.stream.batches_per_epoch // c.train.grad_accum,
        "precision": plan.precision,
        "vocab": plan.vocab,
        "teacher": {
            **data.teacher.plan_json(),
            **({"zero_stage": zero_stage(plan.ds_teacher)} if data.teacher.capabilities().model_in_job else {}),
            **({"placement": [p for _, p in plan.teacher_shards]} if plan.teacher_shards else {}),
        },
        "student": {"path": c.student.path, "zero_stage": zero_stage(plan.ds_student)},
        "components": list(plan.curriculum.active),
        "left_out": dict(plan.left_out),
        "fused": plan.fused,
        "data": plan_json(data.splits),
        "memory_gib": {
            k: v for k, v in estimate_memory(plan).items() if k in ("teacher_shard", "student_states", "logits", "total")
        },
        "run_dir": str(plan.run_dir),
        "lr_schedule": lr_schedule(c, plan.ds_student),
    }


def estimate_memory(plan: "Plan") -> dict[str, float]:
    """Per-GPU GiB for the teacher shard, the student's ZeRO-partitioned states and the logits of one
    micro-batch (both models' logits, their fp32 log-softmax and the student's logit gradient)."""
    gib = 2.0**30
    width = 2 if plan.precision in ("bf16", "fp16") else 4
    world = plan.world
    teacher = sum(count_params(c) for c, _ in plan.teacher_shards)
    per_device = sum(count_params(c) / (1 if where == "replicated" else plan.world) for c, where in plan.teacher_shards)
    student = count_params(plan.student_config)
    zero = plan.ds_student.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    weights, grads = float(student * width), float(student * width)
    optim = float(student * (12 if width == 2 else 8))  # fp32 master copy (mixed precision) + Adam m and v
    if stage >= 1:
        optim /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
        optim = 0
    if stage >= 3 and (zero.get("offload_param") or {}).get("device", "none") != "none":
        weights = 0
    import torch

    from dsdistill.losses.fused import BYTES_PER_LOGIT, auto_chunk, default_budget, fixed_bytes

    tokens = plan.cfg.train.micro_batch_size * plan.cfg.train.seq_len
    logits = tokens * plan.vocab * BYTES_PER_LOGIT  # both models' logits, softmax intermediates, gradient
    chunk_rows = 0
    if plan.cfg.loss.fused_logits:  # one chunk's worth at a time, plus the call's fixed buffers
        mib = plan.cfg.loss.fused_chunk_mib
        budget = mib << 20 if mib else default_budget(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        fixed = fixed_bytes(
            tokens=tokens,
            vocab=plan.vocab,
            s_width=getattr(plan.student_config, "hidden_size", 0),
            t_width=getattr(plan.teacher_config, "hidden_size", 0),
            t_dtype_bytes=width,
            grads=True,
        )
        chunk_rows = min(tokens, plan.cfg.loss.fused_chunk or auto_chunk(plan.vocab, 0, budget_bytes=budget, fixed=fixed))
        logits = chunk_rows * plan.vocab * BYTES_PER_LOGIT + fixed
    out = {
        "teacher_shard": per_device * width / gib,
        "student_states": (weights + grads + optim) / gib,
        "logits": logits / gib,
        "teacher_params": teacher,
        "student_params": student,
        "chunk_rows": chunk_rows,
    }
    out["total"] = out["teacher_shard"] + out["student_states"] + out["logits"]
    return out


def _device_word() -> str:
    """What one rank runs on: a GPU, or (DS_ACCELERATOR=cpu, no CUDA) a CPU process."""
    import torch

    return "GPU" if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" else "CPU rank"


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB" if gib * 1024 >= 0.1 else f"{gib * 2**20:.0f} KiB"


def check_run_dir(run_dir: Path) -> None:
    """The run directory exists and accepts files, or can be made (checked without making it: `check` leaves
    no trace), and none of dsdistill's own files in it is a link (see dsdistill/rundir.py)."""
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise ConfigError(f"output.run_dir: '{run_dir}' is not a directory")
        if not os.access(run_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"output.run_dir: '{run_dir}' is not writable")
    else:
        parent = next((p for p in run_dir.absolute().parents if p.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"output.run_dir: '{run_dir}' is not writable ('{parent}' is not a writable directory)")
        return
    for name in ("metrics.jsonl", "config.yaml", "checkpoints", LOCK_FILE):
        refuse_link(run_dir / name)
    for name in ("metrics.jsonl", "config.yaml"):
        target = run_dir / name
        if target.exists() and not target.is_file():
            raise ConfigError(f"output.run_dir: '{target}' is not a regular file; expected the run's {name} (or nothing) there")
        if target.is_file() and not os.access(target, os.W_OK):
            raise ConfigError(f"output.run_dir: '{target}' is not writable")


def _same_vocab(a, b) -> bool:
    return a is b or a.get_vocab() == b.get_vocab()


def preflight(cfg: RunConfig, *, world: int, rank: int = 0, writing_cache: bool = False) -> tuple[Plan, RunData]:
    """Validate the run against the data, models (configs and tokenizers only) and world size
    (`writing_cache`: for `dsdistill teacher-cache`, which needs the teacher model itself). The checks run
    in the order a person fixes things: config, models, data, then what the run asks of its teacher."""
    run_dir = Path(cfg.output.run_dir)
    check_run_dir(run_dir)
    curriculum = _curriculum(cfg)
    metric = cfg.eval.early_stopping.metric
    if metric not in ("ppl", "lm_ce", "objective") and metric not in curriculum.active:
        raise ConfigError(
            f"eval.early_stopping.metric: '{metric}' is not computed in this run; expected ppl, lm_ce, objective or one of {', '.join(curriculum.active)}"
        )
    student_cfg = load_model_config(cfg.student, field="student")
    tokenizer = load_tokenizer(cfg.student, field="student")
    if writing_cache:
        cfg.one_teacher("teacher-cache")
    teacher = open_teacher(cfg, tokenizer, rank=rank)
    if writing_cache and not teacher.capabilities().model_in_job:
        raise ConfigError(
            f"teacher-cache: the config's teacher is {teacher.noun} ({teacher.field}); give the model in teacher.path"
        )
    _check_vocabularies(cfg, curriculum, tokenizer, teacher, student_cfg)
    splits = build_splits(cfg, tokenizer)
    stream = make_stream(cfg, splits, tokenizer, rank=rank, world=world)
    total_steps = _total_steps(cfg, splits, stream, world)
    teacher_cfg = teacher.model_config
    ds_teacher = resolve_teacher(cfg, model_config=teacher_cfg)
    ds_student = resolve_student(
        cfg,
        world_size=world,
        total_steps=total_steps,
        warmup_steps=warmup_steps_of(cfg.scheduler, total_steps),
        hidden_size=getattr(student_cfg, "hidden_size", None),
    )
    layers = LayerMap.build(cfg.loss, _n_layers(student_cfg, "student"), _n_layers(teacher_cfg, "teacher"))
    _check_architectures(cfg, teacher, student_cfg)
    _check_trainable(cfg, curriculum, splits)
    left_out = _uncomputable(cfg, curriculum, layers, teacher_cfg, student_cfg)
    members = plans_of(teacher, cfg)
    fused_off = (
        next((why for _, p, _ in members if (why := _fused_off(p.model_config, student_cfg))), None)
        if cfg.loss.fused_logits
        else None
    )
    components = {n: implementation(n) for n in curriculum.active}
    ctx = RunContext(cfg, splits, components, layers, total_steps, rank)
    check_serves(teacher, ctx, fused_off=fused_off, samples=_check_sampling(cfg, curriculum, splits))
    if left_out:
        curriculum = _curriculum(cfg, active=tuple(n for n in curriculum.active if n not in left_out))
    plan = Plan(
        cfg=cfg,
        rank=rank,
        world=world,
        run_dir=run_dir,
        curriculum=curriculum,
        vocab=len(tokenizer),
        teacher_config=teacher_cfg,
        student_config=student_cfg,
        total_steps=total_steps,
        precision=precision_of(cfg),
        ds_student=ds_student,
        ds_teacher=ds_teacher,
        layers=layers,
        left_out=left_out,
        teacher=teacher.capabilities(),
        teacher_names=tuple(t.name for t in cfg.teachers or ()),
        teacher_shards=tuple(
            (p.model_config, _placement(p, precision_of(cfg))) for _, p, _ in members if p.capabilities().model_in_job
        ),
        fused_off=fused_off,
    )
    return plan, RunData(tokenizer, splits, stream, teacher)


def _placement(teacher: TeacherPlan, precision: str) -> str:
    """Where a teacher model in the job keeps its weights ("zero3" unless its kind can place it otherwise)."""
    placement = getattr(teacher, "placement", None)
    return placement(precision) if placement is not None else "zero3"


def _curriculum(cfg: RunConfig, active: Optional[tuple[str, ...]] = None) -> Curriculum:
    try:
        return Curriculum(cfg.curriculum) if active is None else Curriculum(cfg.curriculum, active=active)
    except ValueError as e:
        raise ConfigError(f"curriculum.weights: {e}") from None


def _check_vocabularies(cfg: RunConfig, curriculum: Curriculum, tokenizer, teacher: TeacherPlan, student_cfg) -> None:
    """ignore_index, stop tokens, one shared vocabulary where the run needs it, and models that cover it."""
    vocab = len(tokenizer)
    if 0 <= cfg.loss.ignore_index < vocab:
        raise ConfigError(
            f"loss.ignore_index: {cfg.loss.ignore_index} is a token id of this vocabulary (0..{vocab - 1}), so that token "
            "would never be trained on; expected a value outside it, such as -100"
        )
    unknown = [t for t in cfg.generation.stop_tokens if t not in tokenizer.get_vocab()]
    if unknown:
        raise ConfigError(
            f"generation.stop_tokens: {unknown[0]!r} is not a token of the tokenizer's vocabulary; expected single "
            f"tokens such as {tokenizer.eos_token!r}"
        )
    formats = sorted({s.format for s in cfg.data.resolved_sources()} - {"text"})
    if cfg.teacher is not None and cfg.teacher.cross_tokenizer is not None:
        # each side reads its own tokens of the same text: each model covers its own tokenizer
        _check_covers(cfg, len(teacher.tokenizer), "teacher", "teacher.path", teacher.model_config)
        _check_covers(cfg, vocab, "student", "student.path", student_cfg)
        return
    for at, member, _ in plans_of(teacher, cfg):
        teacher_tok = member.tokenizer
        if formats and not _same_vocab(tokenizer, teacher_tok):
            raise ModelError(
                f"{at}.tokenizer: teacher and student vocabularies differ ({len(teacher_tok)} vs {vocab} tokens); "
                f"{', '.join(formats)} data is rendered once and both models read the same ids; set teacher.cross_tokenizer: "
                "{} to give the teacher its own tokens of the same text"
            )
        if curriculum.ever_nonzero("kd") and not _same_vocab(tokenizer, teacher_tok):
            raise ModelError(
                f"{at}.tokenizer: teacher and student vocabularies differ ({len(teacher_tok)} vs {vocab} tokens); "
                "logit KD needs a shared vocabulary: set teacher.cross_tokenizer: {} to pair them by text, or the kd "
                "weight to 0 to distil without it"
            )
        _check_covers(cfg, vocab, at, member.field, member.model_config)
    _check_covers(cfg, vocab, "student", "student.path", student_cfg)


def _check_covers(cfg: RunConfig, vocab: int, role: str, where: str, mc) -> None:
    """The model's embedding covers the shared vocabulary and its positions the rows."""
    mv = getattr(mc, "vocab_size", None)
    if mv is not None and mv < vocab:
        raise ModelError(f"{where}: model vocab_size {mv} is smaller than the tokenizer's {vocab} tokens")
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.train.seq_len > limit:
        raise ConfigError(f"train.seq_len: {cfg.train.seq_len} exceeds the {role}'s max_position_embeddings ({limit})")


def _total_steps(cfg: RunConfig, splits: Splits, stream, world: int) -> int:
    """The run's optimizer steps: train.max_steps, or epochs of the packed data."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    if stream.batches_per_epoch is None:
        if cfg.train.max_steps is None:
            why = "data.streaming" if cfg.data.sources is None else "a mixture (data.sources)"
            raise ConfigError(f"train.max_steps: required with {why}: a stream has no epoch length to count epochs in")
        steps_per_epoch = cfg.train.max_steps
    else:
        steps_per_epoch = stream.batches_per_epoch // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise DataError(
            f"data.path: '{cfg.data.path}' packs into {len(splits.train)} sequences of {cfg.train.seq_len} tokens; "
            f"one optimizer step needs {per_step} (micro_batch_size*grad_accum*world_size)"
        )
    return cfg.train.max_steps or (cfg.train.epochs or 1) * steps_per_epoch


def _check_architectures(cfg: RunConfig, teacher: TeacherPlan, student_cfg) -> None:
    """Both are causal LMs; an attention implementation a family lacks is refused here, not at load."""
    models = [
        (at, p.model_config, p.source, alone.teacher, p.capabilities().model_in_job) for at, p, alone in plans_of(teacher, cfg)
    ]
    for field, mc, path, spec, loads in [*models, ("student", student_cfg, str(cfg.student.path), cfg.student, True)]:
        _check_causal_lm(mc, field, path)
        if spec.attn_implementation == "sdpa" and loads:
            # what loading would refuse, said by check: a family without SDPA needs eager
            if getattr(type(meta_model(mc)), "_supports_sdpa", True) is False:
                raise ConfigError(
                    f"{field}.attn_implementation: {type(meta_model(mc)).__name__} does not support 'sdpa'; set "
                    f"{field}.attn_implementation: eager (attention terms on its layers are then left out)"
                )


def _check_trainable(cfg: RunConfig, curriculum: Curriculum, splits: Splits) -> None:
    """Some training token carries loss (unless the student writes its own completions)."""
    train_stats = splits.totals()
    if train_stats.loss_tokens == 0 and not curriculum.ever_on_policy:
        raise DataError(
            "data: no training token carries loss "
            + (
                f"in the first examples read ({train_stats.examples:,})"
                if splits.streamed
                else f"({train_stats.examples:,} examples)"
            )
            + "; chat data needs assistant turns (or data.loss_on: all), prompt_completion data non-empty completions"
        )


def _check_sampling(cfg: RunConfig, curriculum: Curriculum, splits: Splits) -> Optional[str]:
    """The field that makes the run sample completions (None: it samples none), after checking the data
    allows it."""
    if not (curriculum.ever_on_policy or cfg.generation.probes(False)):
        return None
    # generation.eval_prompts set in an off-policy run probes it with the same sampler and rows
    field = "curriculum.on_policy" if curriculum.ever_on_policy else "generation.eval_prompts"
    if splits.streamed or splits.packing != "none":
        raise ConfigError(
            f"{field}: a sampled completion replaces one example's; set data.packing: none "
            "(one example per sequence) and read the data whole"
        )
    if any(s.format == "text" for s in cfg.data.resolved_sources()):
        raise ConfigError(f"{field}: prompts come from chat or prompt_completion data; data.format is text")
    return field


def _check_causal_lm(model_config, field: str, path: str) -> None:
    """A decoder-only causal LM with a linear output head, or a one-line error naming what it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(model_config, "model_type", "?")
    if getattr(model_config, "is_encoder_decoder", False):
        raise ModelError(f"{field}.path: '{path}' is a {kind} encoder-decoder model; expected a decoder-only causal LM")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model_config, "is_decoder", False):
        raise ModelError(f"{field}.path: '{path}' is a {kind} model (a bidirectional encoder); expected a decoder-only causal LM")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(model_config, "auto_map", None):
        raise ModelError(f"{field}.path: '{path}' has model_type '{kind}', which transformers has no causal LM for")


def _fused_off(teacher_cfg, student_cfg) -> Optional[str]:
    from dsdistill.heads import fused_supported

    for role, mc in (("teacher", teacher_cfg), ("student", student_cfg)):
        why = fused_supported(meta_model(mc))
        if why is not None:
            return f"{why} ({role})"
    return None


def _uncomputable(cfg: RunConfig, curriculum: Curriculum, layers: LayerMap, teacher_cfg, student_cfg) -> dict[str, str]:
    """{component: why} for scheduled components these architectures cannot provide inputs for (today:
    queries and keys that cannot be captured), from what each component declares it needs."""
    from dsdistill.capture import unsupported_reason

    out: dict[str, str] = {}
    for name in curriculum.active:
        needs = implementation(name).needs(layers)
        s_layers, t_layers = sorted(needs.student_qk), sorted(needs.teacher_qk)
        if not (s_layers or t_layers):
            continue
        for role, spec, mc, needed in (
            ("teacher", cfg.teacher, teacher_cfg, t_layers),
            ("student", cfg.student, student_cfg, s_layers),
        ):
            if spec is None:
                continue  # several teachers: refused with their reason by check_serves
            why = unsupported_reason(meta_model(mc), needed, spec.attn_implementation, seq_len=cfg.train.seq_len)
            if why is not None:
                out[name] = f"the {role}'s attention cannot be captured ({why})"
                break
    return out


def _n_layers(model_config, field: str) -> int:
    n = getattr(model_config, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{field}.path: the model config has no num_hidden_layers; hidden-state losses need a decoder stack")
    return n
