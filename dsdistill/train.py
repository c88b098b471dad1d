"""Distillation training: `deepspeed dsdistill/train.py --config run.yaml [--set a.b=value ...]`.

`Session` holds a run's live parts around its frozen plan; `Session.fit` is the loop: one optimizer step
at a time through `Trainer.step` (dsdistill/trainer.py), then logging, evaluation at the same step's
curriculum, checkpoints and the stop policy. docs/architecture.md shows how the types fit together.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Started as a script path (the deepspeed launcher does this): import this package, and keep this
    # directory off sys.path so our module names cannot shadow anything.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import torch
import torch.distributed as dist

from dsdistill import checkpoint
from dsdistill.cache import CachedTeacher
from dsdistill.capture import QKCapture
from dsdistill.components.base import Build
from dsdistill.config import RunConfig, dump_config, load_config
from dsdistill.data import data_fingerprint, eval_batches, plan_json
from dsdistill.dist import agree, free_port, unlink_shm_buffers_at_exit
from dsdistill.ds_config import lr_schedule, zero_stage
from dsdistill.engines import build_student_engine, build_teacher_engine
from dsdistill.errors import DistillError, PeerFailed, one_line
from dsdistill.heads import head_options
from dsdistill.losses.kd import T2_SCALED, TOP_K_SUPPORT
from dsdistill.metrics import MetricsWriter
from dsdistill.models import DTYPES, load_causal_lm, param_counts
from dsdistill.objective import Objective
from dsdistill.packing import check_separation
from dsdistill.preempt import EXIT_PREEMPTED, LauncherWatch, StopRequest
from dsdistill.preflight import Plan, RunData, estimate_memory, preflight, skipped_warnings
from dsdistill.probe import on_policy_probe
from dsdistill.report import eval_line, train_line
from dsdistill.rollout import StudentSampler
from dsdistill.rundir import RunLock, write_atomic
from dsdistill.schema import AlertRecord, EvalRecord, RunEnd, RunStart, TrainRecord
from dsdistill.student import DistillStudent
from dsdistill.system import gpu_peak_gib, system_record
from dsdistill.teacher import LiveTeacher, TeacherModel, TeacherSource
from dsdistill.trainer import (
    EarlyStopping,
    EvalResult,
    Evaluator,
    NonFiniteGuard,
    Pace,
    PairForward,
    StepResult,
    StopPolicy,
    StopReason,
    Trainer,
)

# ---------------------------------------------------------------------------------------------- setup

SYSTEM_EVERY_LOGS = 10
"""A system record (every rank's memory, GPU use) with the first train record and every 10th after it."""


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); a plain `python` start is world 1."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        unlink_shm_buffers_at_exit()
    return dist.get_rank(), dist.get_world_size()


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


@dataclass(frozen=True)
class Summary:
    """How a run ended (rank 0's numbers; every rank gets the same)."""

    steps: int
    total_steps: int
    reason: StopReason
    teacher_ppl: float
    final_eval: Optional[EvalResult]
    run_dir: str


class Session:
    """The live side of a run around its frozen `Plan`: the two engines, the teacher source, the
    objective, the trainer and evaluator, and the metrics stream. `fit()` trains it."""

    def __init__(self, cfg: RunConfig, stop: StopRequest, held: list[RunLock]):
        rank, world = init_distributed()
        torch.manual_seed(cfg.train.seed)
        self.stop = stop
        # every rank checks the same inputs; agreeing on failure keeps a rank that failed alone from leaving the
        # others waiting in the next collective, and the first error is printed once
        plan, data = agree(lambda: preflight(cfg, world=world, rank=rank), what="preflight")
        self.plan: Plan = plan
        self.data: RunData = data
        # one training per run directory: a second one would interleave its records and checkpoints
        lock = agree(lambda: RunLock(Path(plan.run_dir)).acquire() if rank == 0 else None, what="locking the run directory")
        if lock is not None:
            held.append(lock)
        self.writer = MetricsWriter(plan.run_dir, enabled=rank == 0)
        self._at: Optional[dict[str, Any]] = None
        """The position before a window a stop abandoned (what the final save records), else None."""
        self._last_save = time.monotonic()
        if cfg.loss.fused_logits and plan.fused_off is not None:
            _say(rank, f"note: fused KD/LM is off because {plan.fused_off}; using full logits")
        self.objective = Objective(plan.curriculum, total_steps=plan.total_steps, layers=plan.layers)
        needs = self.objective.needs
        self.teacher_engine = None
        teacher_lm = None
        if data.cache is None:
            teacher_lm = agree(
                lambda: load_causal_lm(cfg.teacher, field="teacher", precision=plan.precision, zero3_ds_config=plan.ds_teacher),
                what="loading the teacher",
            )
            self.teacher_engine = build_teacher_engine(TeacherModel(teacher_lm), plan.ds_teacher)
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
            components=self.objective.components,
            build=build,
            vocab=plan.vocab,
            seed=cfg.train.seed,
            fused=plan.fused,
            touch_unused=zero_stage(plan.ds_student) not in (1, 2),
        )
        if plan.precision != "fp32":
            wrapped.aux.to(DTYPES[plan.precision])
        self.student = build_student_engine(wrapped, plan.ds_student, cfg, total_steps=plan.total_steps)
        self.teacher: TeacherSource
        if data.cache is not None:
            # the offline cache: the teacher's top-k distributions, read per packed row; no model
            self.teacher = CachedTeacher(data.cache, vocab=plan.vocab, ignore_index=cfg.loss.ignore_index)
        else:
            assert self.teacher_engine is not None and teacher_lm is not None
            self.teacher = LiveTeacher(
                self.teacher_engine,
                vocab=plan.vocab,
                fused=plan.fused,
                capture=QKCapture(teacher_lm, sorted(needs.teacher_qk)) if needs.teacher_qk else None,
                lm_options=lambda: head_options(plan, self.student.device, temperature=1.0, want_kd=False, want_lm=True),
                ignore_index=cfg.loss.ignore_index,
            )
        if data.splits.packing == "documents":
            agree(self._check_packing, what="checking packed attention")
        s_capture = QKCapture(student_lm, sorted(needs.student_qk)) if needs.student_qk else None
        self.forward = PairForward(plan, self.student, self.teacher, s_capture)
        rollouts = None
        if plan.curriculum.ever_on_policy or cfg.generation.probes(False):
            tok = data.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            vocab = tok.get_vocab()
            stops = tuple(vocab[t] for t in cfg.generation.stop_tokens)  # checked by preflight
            rollouts = StudentSampler(self.student, cfg.generation, eos=tok.eos_token_id, pad=pad, vocab=plan.vocab, stops=stops)
        self.trainer = Trainer(plan, self.student, self.objective, self.forward, rollouts)
        if rollouts is not None:
            self.trainer.pad = rollouts.pad
        eval_names = self.objective.names if "lm" in self.objective.names else (*self.objective.names, "lm")
        self.evaluator = Evaluator(
            plan, self.forward, Objective(plan.curriculum, total_steps=plan.total_steps, layers=plan.layers, names=eval_names)
        )
        # what the loop accumulates (set again by `fit`)
        self.tokens_seen = 0
        self.teacher_ppl = float("nan")
        self.teacher_exact: Optional[float] = None
        """Share of eval tokens whose teacher log-prob is exact (None: a live teacher, all of them)."""
        self.teacher_ppl_by_source: dict[str, float] = {}
        self.last_eval: Optional[EvalResult] = None
        self.pace = Pace()
        self.bar: Any = None
        self.logs = 0

    def _check_packing(self) -> None:
        """Both models keep packed examples apart (one tiny forward each, on every rank together)."""
        plan = self.plan
        half = plan.precision != "fp32"
        student, teacher = self.student, self.teacher_engine
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
            if teacher is not None:
                check_separation(
                    "teacher",
                    plan.teacher_config.model_type,
                    lambda ids, pos: teacher(ids, hidden_states=False, head=True, position_ids=pos)[0],
                    vocab=plan.vocab,
                    device=student.device,
                    half=half,
                )
        finally:
            if was_training:
                student.train()

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> Summary:
        """Train to the end (or to a stop); the run's records go to its metrics stream."""
        plan, cfg, engine = self.plan, self.plan.cfg, self.student
        early = EarlyStopping(
            metric=cfg.eval.early_stopping.metric,
            patience=cfg.eval.early_stopping.patience,
            min_delta=cfg.eval.early_stopping.min_delta,
        )
        resumed = self._resume(early)
        self._announce(resumed)
        # once per run: the teacher's own perplexity is what the student's is compared with
        self.teacher_ppl = self.evaluator.teacher_perplexity(self._eval_batches())
        if isinstance(self.teacher, CachedTeacher):
            self.teacher_exact = self.teacher.covered / max(self.teacher.covered + self.teacher.estimated, 1)
        self.teacher_ppl_by_source = {
            name: self.evaluator.teacher_perplexity(self._eval_batches(rows))
            for name, rows in self.data.splits.eval_by_source.items()
        }
        _say(
            plan.rank,
            f"teacher perplexity on the eval split: {self.teacher_ppl:.3f}"
            + "".join(f"; {n} {p:.3f}" for n, p in self.teacher_ppl_by_source.items()),
        )
        if isinstance(self.teacher, CachedTeacher):
            t, share = self.teacher, self.teacher_exact
            self._alert(
                engine.global_steps,
                "info",
                "teacher_ppl_from_cache",
                f"teacher perplexity is from the offline cache: exact for the {share:.1%} of eval tokens whose label is in "
                f"the cached top-{t.cache.k}, estimated from the rest mass for the others",
            )
        guard = NonFiniteGuard(
            max_bad_steps=cfg.train.max_bad_steps, fp16=plan.precision == "fp16", resume_hint=self._latest_checkpoint
        )
        policy = StopPolicy(total_steps=plan.total_steps, stop_at_step=cfg.train.stop_at_step)
        batches = iter(self.data.stream)
        self.bar = _progress_bar(plan, done=engine.global_steps)
        if cfg.eval.at_start and resumed is None:
            self._evaluate(early)
        engine.train()
        reason: Optional[StopReason] = "completed" if policy.finished(engine.global_steps) else None
        self.pace = Pace()
        self._last_save = time.monotonic()
        while reason is None:
            # where the run stands before this window: what a save records if a stop abandons the window
            mark = {"stream": self.data.stream.state(), "rng": checkpoint.rng_state(), "tokens_seen": self.tokens_seen}
            # one optimizer step over one accumulation window; every rank learns of any stop request
            r = self.trainer.step(
                [next(batches) for _ in range(cfg.train.grad_accum)],
                stop_requested=lambda: self.stop.signal is not None,
                save_due=self._save_due,
            )
            if r.abandoned:
                self._at = mark
                reason = "interrupted"
                break
            self.tokens_seen += r.tokens
            self.pace.add(r.tokens)
            done = engine.global_steps
            self.bar.update(1)
            # a non-finite step is skipped on every rank; too many in a row end the run
            self._guard(guard, r)
            self._log(r, done)
            # evaluation at the same step's curriculum; patience may end the run here
            if (cfg.eval.every and done % cfg.eval.every == 0) or done == plan.total_steps:
                if self._evaluate(early):
                    reason = "early_stopping"
                    _say(
                        plan.rank,
                        f"early stopping: eval {early.metric} has not improved by more than "
                        f"{early.min_delta} for {early.patience} evaluations (best {early.best:.4g})",
                    )
                    break
            # periodic checkpoints are what a preemption without warning falls back to
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 or r.save_due) and done < plan.total_steps:
                self._save(early)
            reason = policy.after_step(done=done, stop_requested=r.stop_requested)
        self.bar.close()
        guard.check_trained()
        return self._finish(reason, early)

    # ------------------------------------------------------------------------------------------ its parts

    def _layout(self) -> dict[str, Any]:
        """What fixes the meaning of a saved data position: resuming with any of it changed is refused."""
        c = self.plan.cfg
        return {
            "train.micro_batch_size": c.train.micro_batch_size,
            "train.seq_len": c.train.seq_len,
            "train.seed": c.train.seed,
            "world_size": self.plan.world,
            "data": data_fingerprint(self.data.splits, c),
            "zero_stage": zero_stage(self.plan.ds_student),
            "precision": self.plan.precision,
            "aux_modules": sorted(self.student.module.aux.keys()),
        }

    def _resume(self, early: EarlyStopping) -> Optional[dict[str, Any]]:
        plan, engine = self.plan, self.student
        self.tokens_seen = 0
        if plan.cfg.checkpoint.resume != "auto":
            return None
        resumed = agree(
            lambda: checkpoint.load(engine, plan.run_dir, tag=plan.cfg.checkpoint.resume_tag, expect=self._layout()),
            what="resuming",
        )
        if resumed is not None:
            self.data.stream.restore(resumed["stream"])
            early.restore(resumed["early_stopping"])
            self.tokens_seen = int(resumed["tokens_seen"])
            _say(
                plan.rank,
                f"resumed from {checkpoint.checkpoint_dir(plan.run_dir) / resumed['tag']} "
                f"at optimizer step {engine.global_steps}",
            )
        return resumed

    def _announce(self, resumed: Optional[dict[str, Any]]) -> None:
        """run_start, the resolved config.yaml, the header line and the plan's warnings."""
        plan, cfg, step = self.plan, self.plan.cfg, self.student.global_steps
        if self.teacher_engine is not None:
            t_params, _ = param_counts(self.teacher_engine.module)
        else:
            from dsdistill.preflight import count_params

            t_params = count_params(plan.teacher_config)
        s_params, _ = param_counts(self.student.module.model)
        cur = plan.curriculum
        self.writer.write(
            RunStart(
                step=step,
                config=dump_config(cfg),
                total_steps=plan.total_steps,
                world_size=plan.world,
                schedule=cur.definition(),
                global_batch=plan.global_batch,
                seq_len=cfg.train.seq_len,
                student_zero_stage=zero_stage(plan.ds_student),
                teacher_zero_stage=zero_stage(plan.ds_teacher),
                student_params=s_params,
                teacher_params=t_params,
                resumed=resumed is not None,
                data=plan_json(self.data.splits),
                kd=kd_semantics(cfg, cached=self.teacher_engine is None),
                lr_schedule=lr_schedule(cfg, plan.ds_student),
            )
        )
        if plan.rank == 0:
            _write_config(plan.run_dir / "config.yaml", dump_config(cfg))
        _say(
            plan.rank,
            f"dsdistill: {plan.total_steps} optimizer steps, world {plan.world}, global batch "
            f"{plan.global_batch} x {cfg.train.seq_len} tokens, teacher {t_params:,} params "
            f"({'ZeRO-3' if self.teacher_engine is not None else 'offline cache'}), student {s_params:,} params (ZeRO-{zero_stage(plan.ds_student)}), run dir {plan.run_dir}",
        )
        if cur.inactive:
            why = "; ".join(f"{n}: {plan.left_out[n]}" for n in cur.inactive if n in plan.left_out)
            self._alert(
                step,
                "info",
                "inactive_components",
                f"scheduled components not computed for this run (left out of the objective): "
                f"{', '.join(cur.inactive)}" + (f" ({why})" if why else ""),
            )
        for warning in skipped_warnings(self.data.splits, cfg):
            self._alert(step, "info", "skipped_documents", warning.removeprefix("warning: "))

    def _alert(self, step: int, level: Literal["info", "warning", "error"], code: str, message: str, *, say: bool = True) -> None:
        if say:
            _say(self.plan.rank, f"{level}: {message}")  # an error alert says error, an info says info
        self.writer.write(AlertRecord(step=step, level=level, code=code, message=message))

    def _latest_checkpoint(self) -> str:
        last = checkpoint.latest_tag(self.plan.run_dir)
        return f"Latest checkpoint: {checkpoint.checkpoint_dir(self.plan.run_dir) / last if last else 'none'}"

    def _guard(self, guard: NonFiniteGuard, r: StepResult) -> None:
        alert = guard.observe(r)
        if alert is not None:
            level, message = alert
            self._alert(r.step, level, "step_skipped" if level == "info" else "nonfinite_step", message, say=level != "info")
        if r.step == 0 and r.lr == 0.0:
            self._alert(
                r.step,
                "warning",
                "lr_zero_first_step",
                "the LR schedule gave the first optimizer step LR 0 (warmup starts at 0); that step changed nothing",
            )

    def _log(self, r: StepResult, done: int) -> None:
        plan = self.plan
        if done % plan.cfg.output.log_every and done != plan.total_steps:
            return
        rec = TrainRecord(
            step=r.step,
            weights=r.ctx.weights,
            losses=r.losses,
            weighted={n: r.ctx.weights[n] * v for n, v in r.losses.items()},
            objective=r.objective,
            lr=r.lr,
            temperature=r.ctx.temperature,
            tokens_per_s=self.pace.rate(),
            tokens=self.tokens_seen,
            progress=done / plan.total_steps,
            total_steps=plan.total_steps,
            grad_norm=r.grad_norm,
            extras={} if r.kd_kl is None else {"kd_kl": r.kd_kl},
            mem_gib=gpu_peak_gib(),
            gate_usage=r.gate_usage,
            on_policy=r.ctx.on_policy if plan.curriculum.ever_on_policy else None,
            rollout=_rollout_fields(r.rollout),
        )
        self.writer.write(rec)
        if plan.rank == 0:
            self.bar.write(train_line(rec), file=sys.stdout)
            sys.stdout.flush()
        self.logs += 1
        if self.logs % SYSTEM_EVERY_LOGS == 1:  # every rank at the same steps: the record is one collective
            usage = system_record(step=r.step, rank=plan.rank, world=plan.world, estimate_gib=self._memory_estimate())
            if usage is not None:
                self.writer.write(usage)

    def _memory_estimate(self) -> Optional[float]:
        """check's per-rank estimate in GiB (rank 0 writes the record)."""
        return estimate_memory(self.plan)["total"] if self.plan.rank == 0 else None

    def _on_policy_probe(self, step: int) -> dict[str, Any]:
        """On-policy runs: held-out prompts completed by the student, scored by the teacher (see probe.py)."""
        n = self.plan.cfg.generation.prompts(self.plan.curriculum.ever_on_policy)
        if self.trainer.rollouts is None or n == 0:
            return {}
        return on_policy_probe(self, step=step, prompts=n)

    def _eval_batches(self, rows=None):
        c, splits = self.plan.cfg, self.data.splits
        return eval_batches(
            splits.eval if rows is None else rows,
            micro_batch=c.eval.micro_batch_size or c.train.micro_batch_size,
            rank=self.plan.rank,
            world=self.plan.world,
            ignore_index=c.loss.ignore_index,
            max_batches=c.eval.max_batches,
            # eval rows are numbered after the training rows (what an offline cache reads by)
            row_offset=None if splits.streamed or rows is not None else len(splits.train),
        )

    def evaluate(self, *, step: int) -> EvalResult:
        """The objective on the held-out split at the curriculum of optimizer step `step`."""
        return self.evaluator.evaluate(self._eval_batches(), step=step)

    def _evaluate(self, early: EarlyStopping) -> bool:
        """Evaluate at the engine's step, keep the best checkpoint, write the record; True: stop early."""
        step = self.student.global_steps
        self.last_eval = r = self.evaluate(step=step)
        # a mixture: each source's held-out data on its own, at the same step's curriculum
        by_source = {}
        for name, rows in self.data.splits.eval_by_source.items():
            part = self.evaluator.evaluate(self._eval_batches(rows), step=step)
            by_source[name] = {
                "lm_ce": part.lm_ce,
                "ppl": part.ppl,
                "teacher_ppl": self.teacher_ppl_by_source.get(name, float("nan")),
                "tokens": float(part.tokens),
                "objective": part.objective,
            }
        best_before = early.best
        stop = early.update(r)
        if self.plan.cfg.checkpoint.keep_best and step > 0 and early.best != best_before:
            self._save(early, mark_best=True)
        rec = EvalRecord(
            step=r.step,
            weights=r.weights,
            losses=r.losses,
            weighted=r.weighted,
            objective=r.objective,
            temperature=r.temperature,
            lm_ce=r.lm_ce,
            ppl=r.ppl,
            teacher_ppl=self.teacher_ppl,
            teacher_ppl_exact_share=self.teacher_exact,
            tokens=r.tokens,
            best=early.best,
            bad_evals=early.bad_evals,
            early_stop_metric=early.metric,
            sources=by_source,
            on_policy=self._on_policy_probe(step),
        )
        self.writer.write(rec)
        if self.plan.rank == 0:
            self.bar.write(eval_line(rec), file=sys.stdout)
            sys.stdout.flush()
        self.pace.pause_ended()  # eval time is not training throughput
        return stop

    def _save_due(self) -> bool:
        """Rank 0's clock: a time-based checkpoint is due (the step's reduction makes every rank agree)."""
        every = self.plan.cfg.checkpoint.every_minutes
        return bool(every) and self.plan.rank == 0 and time.monotonic() - self._last_save >= 60 * every

    def _save(self, early: EarlyStopping, mark_best: bool = False) -> None:
        at = self._at  # an abandoned window: the state before it
        state = {
            "stream": at["stream"] if at else self.data.stream.state(),
            "early_stopping": early.state(),
            "tokens_seen": at["tokens_seen"] if at else self.tokens_seen,
            "layout": self._layout(),
        }
        checkpoint.save(
            self.student,
            self.plan.run_dir,
            state=state,
            keep_last=self.plan.cfg.checkpoint.keep_last,
            mark_best=mark_best,
            rng=at["rng"] if at else None,
        )
        self._last_save = time.monotonic()
        self.pace.pause_ended()

    def _finish(self, reason: StopReason, early: EarlyStopping) -> Summary:
        plan, step = self.plan, self.student.global_steps
        if reason == "paused":
            _say(plan.rank, f"stopping at optimizer step {step} (train.stop_at_step); relaunch to resume")
        if reason == "interrupted":
            _say(
                plan.rank,
                f"stopping at optimizer step {step} ({self.stop.signal or 'a stop request on another rank'}); "
                "saving a checkpoint",
            )
        if (plan.cfg.checkpoint.save_final or reason in ("paused", "interrupted")) and checkpoint.latest_tag(
            plan.run_dir
        ) != f"step{step}":
            self._save(early)
        self.stop.leaving()  # saved: a launcher's follow-up signals have nothing left to interrupt
        message = (
            f"{self.stop.signal or 'signal'}; checkpoint at step {step}; relaunch to resume" if reason == "interrupted" else ""
        )
        self.writer.write(RunEnd(step=step, reason=reason, best=early.best, message=message))
        # leave together: a launcher that sees one rank exit stops the others, which must not be before rank 0
        # has written run_end
        if dist.is_initialized() and plan.world > 1:
            dist.barrier()
        return Summary(
            steps=step,
            total_steps=plan.total_steps,
            reason=reason,
            teacher_ppl=self.teacher_ppl,
            final_eval=self.last_eval,
            run_dir=str(plan.run_dir),
        )


@contextmanager
def open_session(cfg: RunConfig) -> Iterator[Session]:
    """A run's session with stop signals handled from the start (a preemption during model loading still
    ends cleanly); a run that fails or is interrupted after its metrics stream opened still gets its
    run_end record. The engines stay usable after the block (for tests and tools); the stream is closed."""
    stop = StopRequest(cfg.train.signal_grace_s)
    stop.install()
    session: Optional[Session] = None
    watch: Optional[LauncherWatch] = None
    held: list[RunLock] = []
    try:
        session = Session(cfg, stop, held)
        watch = LauncherWatch(stop).start()
        yield session
    except BaseException as e:
        # the stream gets its run_end if this run wrote to it, or continues one (a failed resume)
        if session is not None and (session.writer.opened or session.writer.path.exists()) and not isinstance(e, PeerFailed):
            try:
                session.writer.write(
                    RunEnd(
                        step=session.student.global_steps,
                        reason="interrupted" if isinstance(e, KeyboardInterrupt) else "error",
                        message=one_line(f"{type(e).__name__}: {e}")[:500],
                    )
                )
            except DistillError:
                pass  # the stream itself cannot be written: the error being raised says so already
        raise
    finally:
        if watch is not None:
            watch.close()
        stop.uninstall()
        if session is not None:
            session.writer.close()
        for lock in held:
            lock.release()


def train(cfg: RunConfig) -> Summary:
    """Run a whole distillation; returns how it ended."""
    with open_session(cfg) as session:
        return session.fit()


def _rollout_fields(r: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    if r is None:
        return None
    seqs, tokens, secs = r["sequences"], r["tokens"], r["seconds"]
    return {
        "sequences": seqs,
        "rollout_tokens": tokens,
        "generation_s": secs,
        "tokens_per_s": tokens / secs if secs > 0 else 0.0,
        "mean_completion": tokens / seqs if seqs else 0.0,
        "stop_rate": r.get("ended", 0.0) / seqs if seqs else 0.0,
    }


def _progress_bar(plan: Plan, *, done: int):
    from tqdm import tqdm

    bar = tqdm(
        total=plan.total_steps, desc="distil", unit="step", dynamic_ncols=True, disable=plan.rank != 0 or not sys.stderr.isatty()
    )
    bar.update(done)
    return bar


def _write_config(path: Path, data: dict) -> None:
    """The resolved config, written whole or not at all (a full disk leaves the previous file intact)."""
    try:
        write_atomic(path, _yaml(data).encode())
    except OSError as e:
        raise DistillError(f"output.run_dir: cannot write '{path}' ({e.strerror or e}); files written before are kept") from None


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------------- entry


def build_parser(prog: str = "dsdistill/train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distil a frozen teacher into a student with DeepSpeed.")
    p.add_argument("--config", required=True, help="run config (YAML or JSON)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. --set train.max_steps=100",
    )
    p.add_argument(
        "--teacher-cache",
        metavar="DIR",
        default=None,
        help="instead of training, run the teacher over the run's data and write its top-k distributions to DIR",
    )
    p.add_argument("--top-k", type=int, default=128, help="with --teacher-cache: tokens kept per position (default 128)")
    p.add_argument(
        "--level-bits",
        type=_bits,
        default=None,
        help="with --teacher-cache: bits per kept probability (2..12), or auto (default: the fewest that add at most "
        "2%% to the top-k's truncation error on the first rows)",
    )
    p.add_argument("--shard-rows", type=int, default=64, help="with --teacher-cache: packed rows per shard file")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _bits(text: str) -> Optional[int]:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits or auto, got {text!r}") from None


def kd_semantics(cfg: RunConfig, *, cached: bool) -> dict[str, Any]:
    """What run_start says of KD: the divergence, whether it is T^2-scaled, and its top-k support."""
    c = cfg.loss
    support = "teacher" if cached or c.kd_top_k_support == "teacher" else TOP_K_SUPPORT[c.kd_divergence]
    return {
        "divergence": c.kd_divergence,
        "t2_scaled": c.kd_divergence in T2_SCALED,
        "top_k_support": support if (cached or c.kd_top_k is not None) else "full vocabulary",
    }


def write_teacher_cache(
    cfg: RunConfig, out: Path, *, top_k: int, level_bits: Optional[int] = None, shard_rows: int = 64
) -> dict[str, Any]:
    """`--teacher-cache`: the teacher's engine alone, over the run's packed rows, into an offline cache."""
    from dsdistill import cache

    rank, world = init_distributed()
    plan, data = agree(lambda: preflight(cfg, world=world, rank=rank, writing_cache=True), what="preflight")
    teacher_lm = agree(
        lambda: load_causal_lm(cfg.teacher, field="teacher", precision=plan.precision, zero3_ds_config=plan.ds_teacher),
        what="loading the teacher",
    )
    engine = build_teacher_engine(TeacherModel(teacher_lm), plan.ds_teacher)
    manifest = cache.write(
        (plan, data, engine, data.tokenizer),
        out,
        top_k=top_k,
        level_bits=level_bits,
        shard_rows=shard_rows,
        say=lambda t: _say(rank, t),
    )
    f = manifest["fidelity"]
    _say(
        rank,
        f"teacher-cache: {manifest['tokens']:,} positions, top-{top_k}, {manifest['bytes_per_token']:.1f} bytes per token "
        f"(plain: {manifest['plain_bytes_per_token']}); KL to the teacher: exact top-k {f['kl_top_k_exact']:.3g}, "
        f"cache {f['kl_cache']:.3g} ({f['quantisation_overhead']:+.1%}); written to {out}",
    )
    return manifest


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def report_error(err: DistillError) -> None:
    """Print a user error on one line, from the rank that found it (an error every rank raises alike is
    printed by rank 0 alone; a rank that stopped because another failed prints nothing)."""
    if isinstance(err, PeerFailed):
        return
    rank = _rank()
    if rank == 0 or not err.everywhere:
        where = f"rank {rank}: " if rank != 0 else ""
        print(f"dsdistill: error: {where}{one_line(str(err))}", file=sys.stderr, flush=True)


def _lost_peer(err: BaseException) -> bool:
    """A collective failed because another rank went away (it reports its own error)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(
        k in text
        for k in (
            "connection closed",
            "connection reset",
            "broken pipe",
            "distbackenderror",
            "gloo",
            "nccl error",
            "socket timeout",
            "timed out",
        )
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.teacher_cache is not None:
            write_teacher_cache(
                cfg, Path(args.teacher_cache), top_k=args.top_k, level_bits=args.level_bits, shard_rows=args.shard_rows
            )
            return 0
        summary = train(cfg)
    except DistillError as e:
        report_error(e)
        return e.exit_code
    except (RuntimeError, OSError) as e:
        if not _lost_peer(e):
            raise
        print(
            f"dsdistill: error: rank {_rank()}: stopped because another rank went away ({one_line(str(e))[:160]})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return EXIT_PREEMPTED if summary.reason == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
