"""One optimizer step, and the small policies around it.

`Trainer.step(window)` runs one accumulation window: the curriculum once at the engine's step, the
window's units counted on all ranks, then for each micro-batch the teacher's signal, the student's
forward, the component sums, `backward` and `step`; it returns a `StepResult` with named reductions.
`NonFiniteGuard` and `StopPolicy` decide what follows a step; `Evaluator` runs the same forward and the
same normaliser path on the held-out split. None of them writes records or prints: the loop does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Optional

import numpy as np
import torch

from dsdistill.components.base import Inputs, StudentOutputs
from dsdistill.crosstok import chunks_of
from dsdistill.dist import all_reduce_named, any_rank, control_group
from dsdistill.engines import current_lr
from dsdistill.errors import DistillError
from dsdistill.heads import FusedCall, head_options
from dsdistill.objective import UNITS, Objective, StepContext, count_units, host_positions, shifted_valid
from dsdistill.preflight import Plan
from dsdistill.rollout import RolloutBackend, apply_rollouts
from dsdistill.teachers.base import CrossInput, TeacherInput, TeacherSignal, TeacherSource, TeacherUnavailable


def teacher_input(batch: dict[str, torch.Tensor], labels: torch.Tensor, ignore_index: int) -> TeacherInput:
    """A host batch as a teacher reads it, on the labels' device (for the teacher's LM sums)."""
    pos = batch.get("position_ids")
    return TeacherInput(
        batch["input_ids"].to(labels.device),
        shifted_valid(labels, ignore_index),
        None if pos is None else pos.to(labels.device),
        batch.get("row"),
        cross_input(batch, ignore_index),
    )


def _host_input(batch: dict[str, torch.Tensor], ignore_index: int) -> TeacherInput:
    """A host batch as a teacher reads it, without moving anything to the device."""
    labels = batch["labels"]
    return TeacherInput(
        batch["input_ids"],
        shifted_valid(labels, ignore_index),
        batch.get("position_ids"),
        batch.get("row"),
        cross_input(batch, ignore_index),
    )


def cross_input(batch: dict[str, torch.Tensor], ignore_index: int) -> Optional[CrossInput]:
    """A cross-tokenizer batch's teacher side, from the loader's host tensors (None for any other batch): which
    loss-bearing positions pair with a teacher position, in `host_positions` order."""
    if "x_pos" not in batch:
        return None
    lab = batch["labels"].numpy()
    b, t = np.nonzero(lab[:, 1:] != ignore_index)  # the loss-bearing positions, as `host_positions` orders them
    x = batch["x_pos"].numpy()[b, t]
    paired = x >= 0
    where = np.zeros(lab.shape, dtype=bool)
    where[b[paired], t[paired]] = True
    width = batch["t_input_ids"].shape[1]
    return CrossInput(
        ids=batch["t_input_ids"],
        labels=batch["t_labels"],
        position_ids=batch["t_position_ids"],
        rows=torch.from_numpy(b[paired] * width + x[paired]),
        contexts=batch["x_ctx"].numpy()[b, t][paired],
        kd=torch.from_numpy(np.nonzero(paired)[0]),
        lm_only=torch.from_numpy(np.nonzero(~paired)[0]),
        paired=torch.from_numpy(where),
        chunks=chunks_of(lab, batch["x_pos"].numpy(), batch["t_labels"].numpy(), ignore_index),
    )


def retokenised(teacher: TeacherSource, window: list[dict[str, torch.Tensor]], places) -> list[dict[str, torch.Tensor]]:
    """The window after sampling: a teacher with another tokenizer re-reads the sampled rows in its own tokens
    (`CrossTeacher.retokenise`); any other teacher reads the student's ids as they are."""
    redo = getattr(teacher, "retokenise", None)
    return redo(window, places) if redo is not None and places and "x_pos" in window[0] else window


class PairForward:
    """Teacher signal, then student forward, for one micro-batch: the `Inputs` every component reads."""

    def __init__(self, plan: Plan, engine, teacher: TeacherSource, capture=None):
        self.plan = plan
        self.engine = engine
        self.teacher = teacher
        self.capture = capture
        """The student's q/k capture (None when no component needs attention)."""
        self.signal_s = 0.0
        """Seconds this thread spent in the teacher's `signal` since the trainer last reset it (what a cache's
        training thread waits for its rows)."""

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        objective: Objective,
        ctx: StepContext,
        coefficients: dict[str, float],
        *,
        want_lm: bool,
        live: Optional[tuple[str, ...]] = None,
    ) -> Inputs:
        """`live`: the components computed (a training step's; None: all of the objective's). Only what they
        read is produced: teacher hidden states, q/k captures and the KD signal."""
        ignore = self.plan.cfg.loss.ignore_index
        # what the host batch already tells (read here, on the host, so the device never has to be asked)
        positions = host_positions(batch["labels"], ignore) if self.plan.fused else None
        ids = batch["input_ids"].to(self.engine.device, non_blocking=True)
        labels = batch["labels"].to(self.engine.device, non_blocking=True)
        # packed examples: positions restart per example, which both models turn into per-example attention;
        # rows that are plain 0..S-1 are passed as None (the models' default), sparing their packing check
        pos = batch.get("position_ids")
        pos = pos.to(self.engine.device, non_blocking=True) if pos is not None and not _plain_positions(pos) else None
        valid = shifted_valid(labels, ignore)
        names = objective.names if live is None else live
        needs = objective.needs if live is None else objective.needs_of(live, self.plan.layers)
        asked = time.perf_counter()
        cross = cross_input(batch, ignore)
        signal = self.teacher.signal(TeacherInput(ids, valid, pos, batch.get("row"), cross), needs)
        self.signal_s += time.perf_counter() - asked
        call = None
        if self.plan.fused:
            want_kd = "kd" in names
            # with neither KD nor LM live the head still runs (LM at coefficient 0): its weights then get a
            # zero gradient, not none (see DistillStudent.forward)
            want_lm = want_lm or not want_kd
            call = FusedCall(
                labels=labels,
                teacher_hidden=signal.hidden if want_kd else None,
                teacher_head=signal.head if want_kd else None,
                teacher_sparse=signal.sparse if want_kd else None,
                coef_kd=coefficients.get("kd", 0.0),
                coef_lm=coefficients.get("lm", 0.0),
                options=head_options(
                    self.plan.cfg.loss,
                    self.plan.head_shape,
                    self.engine.device,
                    temperature=ctx.temperature,
                    want_kd=want_kd,
                    want_lm=want_lm,
                ),
                positions=positions,
                kd_rows=signal.kd_rows if want_kd else None,
                chunks=signal.chunks if want_kd else None,
                mixture=_fused_mixture(signal, batch, ignore) if want_kd else (),
            )
        if self.capture is not None:
            self.capture.want(needs.student_qk)
        out = self.engine(
            ids,
            valid=valid,
            teacher_pooled=signal.pooled,
            fused=call,
            position_ids=pos,
            live=None if live is None else frozenset(live),
        )
        qk = self.capture.collect() if self.capture is not None else {}
        return Inputs(
            labels=labels,
            student=StudentOutputs(qk=qk, **out),
            teacher=signal,
            temperature=ctx.temperature,
            loss=self.plan.cfg.loss,
            layers=self.plan.layers,
            position_ids=pos,
            route=None if batch.get("route") is None else batch["route"].to(self.engine.device, non_blocking=True),
        )


def _fused_mixture(signal: TeacherSignal, batch: dict[str, torch.Tensor], ignore_index: int) -> tuple:
    """Several teachers' distributions as the fused head takes them: (name, share, hidden, head, sparse,
    groups). Without routing each teacher scores every position by its share (LM with the first); with
    sources routed to teachers, each scores the positions routed to it (weight 1, LM there) and the unrouted
    ones by its share (LM with the first)."""
    mixture = signal.mixture
    if mixture is None:
        return ()
    routes = batch.get("route")
    if routes is not None:  # the route of each loss-bearing position's target, in `host_positions` order
        labels = batch["labels"].numpy()
        targets = routes.numpy()[:, 1:][labels[:, 1:] != ignore_index]
    out = []
    for i, (name, share, dist) in enumerate(mixture.members):
        one = TeacherSignal(distribution=dist)
        groups: tuple = ((None, share, i == 0),)
        if routes is not None:
            groups = tuple(
                (torch.from_numpy(np.nonzero(targets == route)[0]), weight, lm)
                for route, weight, lm in ((i, 1.0, True), (-1, share, i == 0))
            )
        out.append((name, share, one.hidden, one.head, one.sparse, groups))
    return tuple(out)


def _plain_positions(pos: torch.Tensor) -> bool:
    """Whether every row's positions are 0..S-1 (read on the host: the loader's batch lives there)."""
    if pos.device.type != "cpu":
        return False
    p = pos.numpy()
    return bool((p == np.arange(p.shape[-1])).all())


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: losses, counts and flags reduced over its window's micro-batches and every rank
    (`gate_usage` is this rank's last micro-batch's, `grad_norm` DeepSpeed's global norm)."""

    ctx: StepContext
    """The step it ran at (the engine's optimizer step before it) and the curriculum there."""
    losses: dict[str, float]
    """Each component's mean over its units in the window."""
    objective: float
    lr: float
    """The learning rate the optimizer applied."""
    tokens: int
    """Token positions the step consumed on all ranks."""
    metrics: dict[str, float]
    """The computed components' diagnostics, each reduced as it declares (`Component.metrics`)."""
    gate_usage: Optional[list[float]]
    grad_norm: Optional[float]
    nonfinite_loss: bool
    """Some rank's loss was not finite (its gradients were made non-finite so every rank skips)."""
    skipped: bool
    """DeepSpeed did not apply the update (non-finite gradients, or an fp16 loss-scale overflow)."""
    stop_requested: bool
    """Some rank was asked to stop: every rank stops after this same step."""
    abandoned: bool = False
    """A stop came while the window still had micro-batches to run: they were not run and no optimizer step
    was taken (the weights are those after the previous step; `losses` are meaningless)."""
    save_due: bool = False
    """Rank 0's clock says a time-based checkpoint is due (agreed with the step's reduction)."""
    rollout: Optional[dict[str, float]] = None
    """On-policy sampling of this step over all ranks (sequences, tokens, seconds), or None when off-policy."""
    teacher_unavailable: Optional[str] = None
    """Why the teacher could not serve this window (then it is abandoned and the run saves and stops)."""
    teacher_wait: Optional[float] = None
    """A remote teacher or a cache: the share of this rank's step spent waiting for its signals (None: the
    teacher is in the job; see `TrainRecord.teacher_wait`)."""

    @property
    def step(self) -> int:
        return self.ctx.step


class Trainer:
    def __init__(self, plan: Plan, engine, objective: Objective, forward: PairForward, rollouts: Optional[RolloutBackend] = None):
        self.plan = plan
        self.engine = engine
        self.objective = objective
        self.forward = forward
        self.rollouts = rollouts
        """Where on-policy completions come from (None: the run never goes on-policy)."""
        control_group()  # created by every rank here, before the first stop agreement uses it
        self.pad = 0

    def step(
        self,
        window: list[dict[str, torch.Tensor]],
        *,
        stop_requested: Callable[[], bool] | bool,
        save_due: Callable[[], bool] = lambda: False,
        upcoming: Optional[list[dict[str, torch.Tensor]]] = None,
    ) -> StepResult:
        """One optimizer step over `window`. `stop_requested` is asked when the ranks next agree (between
        micro-batches, and with the step's reduction), so a stop never waits for a whole extra step; a stop
        agreed before the window's last micro-batch abandons the window (`StepResult.abandoned`). `upcoming`:
        the next window, whose teacher signals a remote teacher fetches while this one computes."""
        engine, objective, cfg = self.engine, self.objective, self.plan.cfg
        started = time.perf_counter()
        waited: Optional[float] = None
        if not callable(stop_requested):
            stop_requested = (lambda asked: lambda: asked)(stop_requested)  # a fixed answer for the whole step
        scale = cfg.train.grad_accum * self.plan.world
        ctx = objective.context(step=engine.global_steps)  # the one schedule position for this whole window
        names = objective.live(ctx)  # weight 0 at this step: not computed at all
        window, rollout = self._rollouts(window, ctx)
        # units in the whole window on all ranks: each component is divided by its own unit count
        counted = [count_units(mb["labels"], cfg.loss.ignore_index, mb.get("x_pos")) for mb in window]
        units = all_reduce_named({u: float(sum(c[u] for c in counted)) for u in UNITS})
        normalizers = objective.normalizers(units)
        coefficients = objective.coefficients(ctx, normalizers)
        acc: dict[str, Any] = {f"loss.{n}": 0.0 for n in names}
        acc.update(objective.metric_zeros(names))
        acc["nonfinite"] = 0.0  # micro-batches whose loss was not finite, counted on the device
        usage, skipped, lr = None, False, float("nan")
        needs = objective.needs_of(names, self.plan.layers)
        caps = self.forward.teacher.capabilities()
        if caps.reads_ahead and not caps.remote:
            self._prefetch(upcoming)  # the next window's rows decode on a thread while this one computes
            waited, self.forward.signal_s = 0.0, 0.0
        if caps.remote:
            # a teacher elsewhere is asked for the whole window now; every rank agrees to go on or to stop
            asked = time.perf_counter()
            problem = self.forward.teacher.prepare([_host_input(mb, cfg.loss.ignore_index) for mb in window], needs)
            waited = time.perf_counter() - asked
            if any_rank(problem is not None):
                return self._abandoned(ctx, teacher_unavailable=problem or "the teacher stopped answering another rank")
            self._prefetch(upcoming)
        self.forward.teacher.begin_step(needs)
        try:
            for i, mb in enumerate(window):
                # a stop between micro-batches abandons the window: the save then waits for one micro-batch,
                # not for the rest of a long window (every rank agrees, as backward's collectives need)
                if i > 0 and any_rank(stop_requested()):
                    return self._abandoned(ctx)
                x = self.forward(mb, objective, ctx, coefficients, want_lm="lm" in names, live=names)
                sums = objective.sums(x, names=names)
                applied = self._backward(objective.loss(sums, coefficients) * scale, acc)
                if applied is not None:
                    lr, skipped = applied
                for n in names:  # summed on the device; transferred once per window by the reduction below
                    acc[f"loss.{n}"] = acc[f"loss.{n}"] + sums.sums[n].detach()
                objective.add_metrics(acc, sums, names)
                usage = sums.extras.get("gate_usage", usage)
                del x, sums
        finally:
            self.forward.teacher.end_step()
        r = all_reduce_named({**acc, "stop": float(stop_requested()), "save_due": float(save_due())})
        losses = {n: r[f"loss.{n}"] / normalizers[n] for n in names}
        return StepResult(
            ctx=ctx,
            losses=losses,
            objective=objective.value(losses, ctx.weights),
            lr=lr,
            tokens=sum(mb["input_ids"].numel() for mb in window) * self.plan.world,
            metrics=objective.reduce_metrics(r, normalizers, names),
            gate_usage=usage.tolist() if torch.is_tensor(usage) else usage,  # read once per step
            grad_norm=_grad_norm(engine),
            nonfinite_loss=r["nonfinite"] > 0,
            skipped=skipped,
            stop_requested=r["stop"] > 0,
            rollout=rollout,
            save_due=r["save_due"] > 0,
            teacher_wait=None if waited is None else (waited + self.forward.signal_s) / max(time.perf_counter() - started, 1e-9),
        )

    def _rollouts(self, window: list[dict[str, torch.Tensor]], ctx: StepContext):
        """On-policy: part of the window's completions sampled now, from the weights of this step; the window
        and the sampling's numbers over all ranks (None when this step is off-policy)."""
        cfg = self.plan.cfg
        if self.rollouts is None or ctx.on_policy <= 0:
            return window, None
        window, stats = apply_rollouts(
            window,
            fraction=ctx.on_policy,
            backend=self.rollouts,
            generation=cfg.generation,
            step=ctx.step,
            seed=cfg.train.seed,
            pad=self.pad,
            ignore_index=cfg.loss.ignore_index,
        )
        window = retokenised(self.forward.teacher, window, stats.places)
        keys = {"sequences": stats.sequences, "tokens": stats.tokens, "seconds": stats.seconds, "ended": stats.ended}
        r = all_reduce_named({k: float(v) for k, v in keys.items()})
        return window, {**r, "seconds": r["seconds"] / self.plan.world}

    def _backward(self, loss: torch.Tensor, acc: dict[str, Any]) -> Optional[tuple[float, bool]]:
        """Backward and engine.step for one micro-batch; at the window's boundary (LR applied, skipped)."""
        engine = self.engine
        # a non-finite loss makes the gradients non-finite too, so ZeRO's global check skips this update
        # on every rank; decided on the device (no host sync), counted in the step's one reduction
        bad = ~torch.isfinite(loss.detach())
        loss = loss * torch.where(bad, float("nan"), 1.0).to(loss.dtype)
        acc["nonfinite"] = acc["nonfinite"] + bad.to(torch.float32)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        lr = current_lr(engine) if boundary else float("nan")  # what optimizer.step() below applies
        skipped_before = int(getattr(engine, "skipped_steps", 0))
        engine.step()
        if not boundary:
            return None
        skipped = int(getattr(engine, "skipped_steps", 0)) > skipped_before
        if skipped and engine.lr_scheduler is not None:
            # DeepSpeed does not advance the LR schedule on a skipped step, but the step counter (and the
            # curriculum) moves on: advance it so the LR stays a function of the optimizer step
            engine.lr_scheduler.step()
        return lr, skipped

    def _prefetch(self, upcoming: Optional[list[dict[str, torch.Tensor]]]) -> None:
        """Start fetching the next window's teacher signals, unless its rows will change (on-policy rollouts)."""
        if upcoming is None:
            return
        ctx = self.objective.context(step=self.engine.global_steps + 1)
        if ctx.on_policy > 0:
            return
        needs = self.objective.needs_of(self.objective.live(ctx), self.plan.layers)
        self.forward.teacher.prefetch([_host_input(mb, self.plan.cfg.loss.ignore_index) for mb in upcoming], needs)

    def _abandoned(self, ctx: StepContext, teacher_unavailable: Optional[str] = None) -> StepResult:
        return StepResult(
            ctx=ctx,
            losses={},
            objective=float("nan"),
            lr=float("nan"),
            tokens=0,
            metrics={},
            gate_usage=None,
            grad_norm=None,
            nonfinite_loss=False,
            skipped=False,
            stop_requested=True,
            abandoned=True,
            teacher_unavailable=teacher_unavailable,
        )


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
    try:
        return None if norm is None else float(norm)
    except (TypeError, ValueError):
        return None


class NonFiniteGuard:
    """Counts optimizer steps in a row whose update was skipped for a non-finite loss or gradients; the
    run stops after `max_bad_steps` of them. fp16 loss-scale overflows are expected and never count."""

    def __init__(self, *, max_bad_steps: int, fp16: bool, resume_hint: Callable[[], str] = lambda: ""):
        self.max_bad_steps = max_bad_steps
        self.fp16 = fp16
        self.resume_hint = resume_hint
        """Where the run can resume from, for the error that stops it."""
        self.in_a_row = 0
        self.steps = self.applied = 0
        """Optimizer steps this launch ran, and how many of them updated the weights."""

    def observe(self, r: StepResult) -> Optional[tuple[Literal["info", "error"], str]]:
        """(level, message) of an alert for this step, or None. Raises `DistillError` (every rank alike)
        once `max_bad_steps` bad steps came in a row."""
        self.steps += 1
        self.applied += not (r.skipped or r.nonfinite_loss)
        if r.skipped and self.fp16 and not r.nonfinite_loss:
            return "info", f"fp16 loss-scale overflow: DeepSpeed skipped optimizer step {r.step}"
        if not (r.nonfinite_loss or r.skipped):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        what = "loss" if r.nonfinite_loss else "gradients"
        if self.in_a_row >= self.max_bad_steps:
            err = DistillError(
                f"train.max_bad_steps: {self.in_a_row} consecutive optimizer steps had a non-finite "
                f"{what} (last at step {r.step}); stopped. {self.resume_hint()}".rstrip()
            )
            err.everywhere = True  # every rank counts the same agreed steps
            raise err
        return "error", (
            f"non-finite {what} at optimizer step {r.step}: the update was skipped, weights untouched "
            f"({self.in_a_row} in a row; the run stops at {self.max_bad_steps})"
        )

    def check_trained(self) -> None:
        """A launch whose every step was skipped trained nothing: it must not end as "completed"."""
        if self.steps and not self.applied:
            err = DistillError(
                f"train: all {self.steps} optimizer steps of this run were skipped (non-finite loss or gradients); "
                "nothing was trained; check optimizer.lr, the curriculum's weights and temperature, and the data"
            )
            err.everywhere = True
            raise err


class Pace:
    """Tokens per second of training between log lines (evaluation and saving are not training time)."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def pause_ended(self) -> None:
        self.start = time.perf_counter()

    def rate(self) -> float:
        """Tokens per second since the last call (or the start), then count anew."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return rate


StopReason = Literal["completed", "early_stopping", "paused", "interrupted"]


class StopPolicy:
    """Why the run ends after a step, if it does: all steps done, `train.stop_at_step` reached (a
    time-boxed session pauses), or a stop request (a signal on any rank). Early stopping is the
    evaluator's call."""

    def __init__(self, *, total_steps: int, stop_at_step: Optional[int]):
        self.total_steps = total_steps
        self.stop_at_step = stop_at_step

    def finished(self, done: int) -> bool:
        return done >= self.total_steps

    def after_step(self, *, done: int, stop_requested: bool) -> Optional[StopReason]:
        if self.finished(done):
            return "completed"
        if self.stop_at_step is not None and done >= self.stop_at_step:
            return "paused"
        if stop_requested:
            return "interrupted"
        return None


@dataclass(frozen=True)
class EvalResult:
    step: int
    weights: dict[str, float]
    temperature: float
    losses: dict[str, float]
    weighted: dict[str, float]
    objective: float
    lm_ce: float
    ppl: float
    tokens: int
    metrics: dict[str, float]
    """Every component's diagnostics, reduced as it declares."""


class Evaluator:
    """The training objective on held-out batches, at the curriculum of a given step, reduced over ranks
    with the same unit counts as training. LM is always computed: perplexity is exp of its mean."""

    def __init__(self, plan: Plan, forward: PairForward, objective: Objective):
        self.plan = plan
        self.forward = forward
        self.objective = objective

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], *, step: int) -> EvalResult:
        engine, obj = self.forward.engine, self.objective
        ctx = obj.context(step=step)
        acc: dict[str, Any] = {f"loss.{n}": 0.0 for n in obj.names}
        acc.update({f"units.{u}": 0.0 for u in UNITS})
        acc.update(obj.metric_zeros())
        was_training = engine.module.training
        engine.eval()
        obj_needs = obj.needs
        remote = self.forward.teacher.capabilities().remote
        self.forward.teacher.begin_step(obj_needs)
        try:
            for batch in batches:
                if remote:  # asked first, every rank agreeing, so a teacher gone on one rank stops them all here
                    self._agreed(self.forward.teacher.prepare([_host_input(batch, self.plan.cfg.loss.ignore_index)], obj_needs))
                x = self.forward(batch, obj, ctx, {}, want_lm=True)
                part = obj.sums(x)
                for n in obj.names:  # summed on the device; transferred once by the reduction below
                    acc[f"loss.{n}"] = acc[f"loss.{n}"] + part.sums[n].detach()
                obj.add_metrics(acc, part)
                for u, c in count_units(batch["labels"], self.plan.cfg.loss.ignore_index, batch.get("x_pos")).items():
                    acc[f"units.{u}"] += c
        finally:
            self.forward.teacher.end_step()
            if was_training:
                engine.train()
        r = all_reduce_named(acc)
        normalizers = obj.normalizers({u: r[f"units.{u}"] for u in UNITS})
        losses = {n: r[f"loss.{n}"] / normalizers[n] for n in obj.names}
        lm_ce = losses["lm"]
        return EvalResult(
            step=step,
            weights=ctx.weights,
            temperature=ctx.temperature,
            losses=losses,
            weighted={n: ctx.weights[n] * losses[n] for n in ctx.weights},
            objective=obj.value(losses, ctx.weights),
            lm_ce=lm_ce,
            ppl=math.exp(lm_ce) if lm_ce < 700 else float("inf"),
            tokens=int(r["units.token"]),
            metrics=obj.reduce_metrics(r, normalizers),
        )

    @staticmethod
    def _agreed(problem: Optional[str]) -> None:
        """Every rank learns whether some rank's remote teacher stopped answering (then all raise)."""
        if any_rank(problem is not None):
            raise TeacherUnavailable(problem or "the teacher stopped answering another rank")

    def teacher_perplexity(self, batches: Iterable[dict[str, torch.Tensor]], teacher: Optional[TeacherSource] = None) -> float:
        """exp of the teacher's (default: the run's) token-weighted LM cross-entropy (computed once per run)."""
        total, count = self.teacher_nll(batches, teacher)
        ce = total / max(count, 1.0)
        return math.exp(ce) if ce < 700 else float("inf")

    @torch.no_grad()
    def teacher_nll(
        self, batches: Iterable[dict[str, torch.Tensor]], teacher: Optional[TeacherSource] = None
    ) -> tuple[float, float]:
        """(the teacher's summed next-token cross-entropy, the tokens it is over) on all ranks: the student's
        tokens, or a teacher with another tokenizer's own."""
        teacher, device = teacher or self.forward.teacher, self.forward.engine.device
        total: Any = 0.0
        count = 0
        from dsdistill.components.base import Needs

        remote = teacher.capabilities().remote
        teacher.begin_step(Needs(teacher_logits=True))
        try:
            for batch in batches:
                labels = batch["labels"].to(device)
                try:
                    s, n = teacher.lm_sums(teacher_input(batch, labels, self.plan.cfg.loss.ignore_index), labels)
                except TeacherUnavailable as e:
                    if not remote:
                        raise
                    self._agreed(str(e))
                if remote:
                    self._agreed(None)
                total, count = total + s.detach(), count + n
        finally:
            teacher.end_step()
        r = all_reduce_named({"sum": total, "count": float(count)})
        return float(r["sum"]), float(r["count"])


class EarlyStopping:
    """Patience on a lower-is-better eval metric."""

    def __init__(self, *, metric: str, patience: Optional[int], min_delta: float):
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.best: Optional[float] = None
        self.bad_evals = 0

    def value_of(self, r: EvalResult) -> float:
        if self.metric in ("ppl", "lm_ce", "objective"):
            return float(getattr(r, self.metric))
        return float(r.losses[self.metric])

    def update(self, r: EvalResult) -> bool:
        """Record an evaluation; True when training should stop."""
        v = self.value_of(r)
        if self.best is None or v < self.best - self.min_delta:
            self.best, self.bad_evals = v, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "bad_evals": self.bad_evals}

    def restore(self, state: dict) -> None:
        """Continue from a saved state (ignored if it watched another metric)."""
        if state.get("metric") == self.metric:
            self.best, self.bad_evals = state["best"], int(state["bad_evals"])
