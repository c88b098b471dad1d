"""The training loop: `Session.fit` runs one optimizer step at a time through `Trainer.step`, then logs,
evaluates at the same step's curriculum, saves and applies the stop policy. The parts it runs come from
build.py, what it says from records.py, where it stands from state.py."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from dsdistill import checkpoint
from dsdistill.config import RunConfig
from dsdistill.data import MixedStream, eval_batches
from dsdistill.dist import agree, init_distributed
from dsdistill.errors import DistillError, PeerFailed, one_line
from dsdistill.metrics import MetricsWriter
from dsdistill.preempt import LauncherWatch, StopRequest
from dsdistill.preflight import preflight
from dsdistill.probe import on_policy_probe
from dsdistill.run.build import build_parts
from dsdistill.run.records import Records, say
from dsdistill.run.state import RunState, Windows
from dsdistill.rundir import RunLock
from dsdistill.schema import RunEnd
from dsdistill.teachers.base import TeacherUnavailable
from dsdistill.teachers.mixture import members_of
from dsdistill.trainer import EarlyStopping, EvalResult, NonFiniteGuard, Pace, StepResult, StopPolicy, StopReason


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
    """A run's live parts around its frozen `Plan`, its state and its records. `fit()` trains it."""

    def __init__(self, cfg: RunConfig, stop: StopRequest, held: list[RunLock]):
        rank, world = init_distributed()
        torch.manual_seed(cfg.train.seed)
        self.stop = stop
        # every rank checks the same inputs; agreeing on failure keeps a rank that failed alone from leaving the
        # others waiting in the next collective, and the first error is printed once
        plan, data = agree(lambda: preflight(cfg, world=world, rank=rank), what="preflight")
        self.plan, self.data = plan, data
        # one training per run directory: a second one would interleave its records and checkpoints
        lock = agree(lambda: RunLock(Path(plan.run_dir)).acquire() if rank == 0 else None, what="locking the run directory")
        if lock is not None:
            held.append(lock)
        self.writer = MetricsWriter(plan.run_dir, enabled=rank == 0)
        self.records = Records(plan, self.writer)
        if cfg.loss.fused_logits and plan.fused_off is not None:
            say(rank, f"note: fused KD/LM is off because {plan.fused_off}; using full logits")
        parts = build_parts(plan, data)
        self.student, self.teacher, self.objective = parts.student, parts.teacher, parts.objective
        self.forward, self.trainer, self.evaluator = parts.forward, parts.trainer, parts.evaluator
        self.state = RunState(plan, data, self.student)
        self.teacher_ppl = float("nan")
        self.teacher_ppl_by_source: dict[str, float] = {}
        self.teacher_ppls: dict[str, float] = {}
        """`teachers:`: each teacher's own perplexity on the eval split (empty with one teacher)."""
        self.teacher_exact: Optional[float] = None
        """Share of eval tokens whose teacher log-prob is exact (None: all of them)."""
        self.last_eval: Optional[EvalResult] = None
        self.pace = Pace()
        self.stopped_by: Optional[str] = None
        """Why the teacher could not go on, when that stopped the run (it saved first)."""

    def fit(self) -> Summary:
        """Train to the end (or to a stop); the run's records go to its metrics stream."""
        plan, cfg, engine, state = self.plan, self.plan.cfg, self.student, self.state
        early = EarlyStopping(
            metric=cfg.eval.early_stopping.metric,
            patience=cfg.eval.early_stopping.patience,
            min_delta=cfg.eval.early_stopping.min_delta,
        )
        try:
            resumed = self._start(early)
        except TeacherUnavailable as e:  # a remote teacher gone before the first step: nothing to lose
            self.stopped_by = str(e)
            return self._finish("interrupted", early)
        guard = NonFiniteGuard(max_bad_steps=cfg.train.max_bad_steps, fp16=plan.precision == "fp16", resume_hint=state.latest)
        policy = StopPolicy(total_steps=plan.total_steps, stop_at_step=cfg.train.stop_at_step)
        batches = iter(self.data.stream)
        self.records.progress(done=engine.global_steps)
        reason: Optional[StopReason] = self._evaluate(early) if cfg.eval.at_start and resumed is None else None
        engine.train()
        reason = reason or ("completed" if policy.finished(engine.global_steps) else None)
        self.pace = Pace()
        state.last_save = time.monotonic()
        # a remote teacher is asked for the next window while this one computes (a cache decodes it): windows
        # are drawn one ahead
        caps = self.teacher.capabilities()
        ahead = caps.remote or caps.reads_ahead
        drawn = Windows(self.data.stream, batches, cfg.train.grad_accum)
        while reason is None:
            window, before, after = drawn.next()
            upcoming = drawn.peek() if ahead else None
            mark = state.mark(stream=before)
            state.position = after  # what a save after this step records, whatever was drawn ahead
            # one optimizer step over one accumulation window; every rank learns of any stop request
            r = self.trainer.step(
                window,
                stop_requested=lambda: self.stop.signal is not None,
                save_due=state.save_due,
                upcoming=upcoming,
            )
            if r.abandoned:  # a stop mid-window, or a teacher that cannot serve it: the save records the position before it
                state.abandoned, reason, self.stopped_by = mark, "interrupted", r.teacher_unavailable
                break
            state.tokens_seen += r.tokens
            self.pace.add(r.tokens)
            done = engine.global_steps
            self.records.bar.update(1)
            # a non-finite step is skipped on every rank; too many in a row end the run
            self._guard(guard, r)
            self.records.train(r, done=done, tokens_seen=state.tokens_seen, tokens_per_s=self.pace.rate())
            # evaluation at the same step's curriculum; patience (or a teacher gone) may end the run here
            if (cfg.eval.every and done % cfg.eval.every == 0) or done == plan.total_steps:
                reason = self._evaluate(early)
                if reason is not None:
                    break
            # periodic checkpoints are what a preemption without warning falls back to
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0 or r.save_due) and done < plan.total_steps:
                self._save(early)
            reason = policy.after_step(done=done, stop_requested=r.stop_requested)
        self.records.bar.close()
        if isinstance(self.data.stream, MixedStream):
            self.data.stream.close()  # a block read ahead is let finish, not cut at the interpreter's exit
        guard.check_trained()
        return self._finish(reason, early)

    def _start(self, early: EarlyStopping) -> Optional[dict[str, Any]]:
        """Resume (or start), announce the run, and measure the teacher's own perplexity (once per run: it
        is what the student's is compared with)."""
        plan = self.plan
        resumed = self.state.resume(early)
        step = self.student.global_steps
        if resumed is not None:
            say(plan.rank, f"resumed from {checkpoint.checkpoint_dir(plan.run_dir) / resumed['tag']} at optimizer step {step}")
        from dsdistill.models import param_counts

        s_params, _ = param_counts(self.student.module.model)
        self.records.start(step=step, resumed=resumed is not None, data=self.data, teacher=self.teacher, student_params=s_params)
        if resumed is not None and resumed.get("carried"):  # another ZeRO stage, world, precision or components
            self.records.alert(step, "info", "resume_carried", resumed["carried"])
        members = members_of(self.teacher)
        if len(members) > 1:  # each teacher's own; the run's is exp of their share-weighted cross-entropy
            self.teacher_ppls = {n: self.evaluator.teacher_perplexity(self.eval_batches(), t) for n, _, t in members}
            self.teacher_ppl = math.exp(sum(share * math.log(self.teacher_ppls[n]) for n, share, _ in members))
        else:
            self.teacher_ppl = self.evaluator.teacher_perplexity(self.eval_batches())
        exact = self.teacher.exact_share()
        self.teacher_ppl_by_source = {
            name: self.evaluator.teacher_perplexity(self.eval_batches(rows))
            for name, rows in self.data.splits.eval_by_source.items()
        }
        say(
            plan.rank,
            f"teacher perplexity on the eval split: {self.teacher_ppl:.3f}"
            + (" (" + ", ".join(f"teacher {n} {p:.3f}" for n, p in self.teacher_ppls.items()) + ")" if self.teacher_ppls else "")
            + "".join(f"; {n} {p:.3f}" for n, p in self.teacher_ppl_by_source.items()),
        )
        self.teacher_exact = exact
        if exact is not None:
            caps = self.teacher.capabilities()
            self.records.alert(
                step,
                "info",
                "teacher_ppl_from_cache",
                f"teacher perplexity is from the offline cache: exact for the {exact:.1%} of eval tokens whose label is in "
                f"the cached top-{caps.top_k}, estimated from the rest mass for the others",
            )
        return resumed

    def _guard(self, guard: NonFiniteGuard, r: StepResult) -> None:
        alert = guard.observe(r)
        if alert is not None:
            level, message = alert
            self.records.alert(
                r.step, level, "step_skipped" if level == "info" else "nonfinite_step", message, say_it=level != "info"
            )
        if r.step == 0 and r.lr == 0.0:
            self.records.alert(
                r.step,
                "warning",
                "lr_zero_first_step",
                "the LR schedule gave the first optimizer step LR 0 (warmup starts at 0); that step changed nothing",
            )

    def eval_batches(self, rows=None):
        """This rank's share of the held-out split (or of `rows`, one source's)."""
        c, splits = self.plan.cfg, self.data.splits
        return eval_batches(
            splits.eval if rows is None else rows,
            micro_batch=c.eval.micro_batch_size or c.train.micro_batch_size,
            rank=self.plan.rank,
            world=self.plan.world,
            ignore_index=c.loss.ignore_index,
            max_batches=c.eval.max_batches,
            # eval rows are numbered after the training rows (what a teacher that reads rows by number uses)
            row_offset=None if splits.streamed or rows is not None else len(splits.train),
        )

    def evaluate(self, *, step: int) -> EvalResult:
        """The objective on the held-out split at the curriculum of optimizer step `step`."""
        return self.evaluator.evaluate(self.eval_batches(), step=step)

    def _evaluate(self, early: EarlyStopping) -> Optional[StopReason]:
        """Evaluate at the engine's step, keep the best checkpoint, write the record; why the run stops now
        (early stopping, or a remote teacher that stopped answering: then the save follows), else None."""
        try:
            stop = self._evaluate_now(early)
        except TeacherUnavailable as e:
            self.stopped_by = str(e)
            return "interrupted"
        if stop:
            say(
                self.plan.rank,
                f"early stopping: eval {early.metric} has not improved by more than "
                f"{early.min_delta} for {early.patience} evaluations (best {early.best:.4g})",
            )
            return "early_stopping"
        return None

    def _evaluate_now(self, early: EarlyStopping) -> bool:
        """Evaluate at the engine's step, keep the best checkpoint, write the record; True: stop early."""
        step = self.student.global_steps
        self.last_eval = r = self.evaluate(step=step)
        # a mixture: each source's held-out data on its own, at the same step's curriculum
        by_source = {}
        for name, rows in self.data.splits.eval_by_source.items():
            part = self.evaluator.evaluate(self.eval_batches(rows), step=step)
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
        n = self.plan.cfg.generation.prompts(self.plan.curriculum.ever_on_policy)
        self.records.eval(
            r,
            teacher_ppl=self.teacher_ppl,
            teacher_ppls=self.teacher_ppls,
            teacher_ppl_exact_share=self.teacher_exact,
            best=early.best,
            bad_evals=early.bad_evals,
            early_stop_metric=early.metric,
            sources=by_source,
            on_policy=on_policy_probe(self, step=step, prompts=n) if self.trainer.rollouts is not None and n else {},
        )
        self.pace.pause_ended()  # eval time is not training throughput
        return stop

    def _save(self, early: EarlyStopping, mark_best: bool = False) -> None:
        self.state.save(early, mark_best)
        self.pace.pause_ended()

    def _finish(self, reason: StopReason, early: EarlyStopping) -> Summary:
        plan, step = self.plan, self.student.global_steps
        if reason == "paused":
            say(plan.rank, f"stopping at optimizer step {step} (train.stop_at_step); relaunch to resume")
        why = self.stopped_by or self.stop.signal or "a stop request on another rank"
        if reason == "interrupted":
            say(plan.rank, f"stopping at optimizer step {step} ({why}); saving a checkpoint")
        if (plan.cfg.checkpoint.save_final or reason in ("paused", "interrupted")) and checkpoint.latest_tag(
            plan.run_dir
        ) != f"step{step}":
            self._save(early)
        self.stop.leaving()  # saved: a launcher's follow-up signals have nothing left to interrupt
        message = f"{why}; checkpoint at step {step}; relaunch to resume" if reason == "interrupted" else ""
        self.writer.write(RunEnd(step=step, reason=reason, best=early.best, message=message))
        # leave together: a launcher that sees one rank exit stops the others, which must not be before rank 0
        # has written run_end
        if dist.is_initialized() and plan.world > 1:
            dist.barrier()
        if self.stopped_by and plan.rank == 0:
            print(f"dsdistill: {self.stopped_by}", file=sys.stderr, flush=True)  # the line a launcher's log ends with
        return Summary(step, plan.total_steps, reason, self.teacher_ppl, self.last_eval, str(plan.run_dir))


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
