"""Distillation training: `deepspeed dsdistill/train.py --config run.yaml [--set a.b=value ...]`.

One explicit loop. For each optimizer step (one accumulation window of micro-batches) the curriculum is
evaluated once at `step = student.global_steps`; every micro-batch of the window then runs teacher forward,
student forward, the component losses, the weighted sum, `backward` and `step`.
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
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from dsdistill import checkpoint
from dsdistill.config import RunConfig, dump_config, load_config
from dsdistill.dist import agree, all_reduce_sum, free_port, unlink_shm_buffers_at_exit
from dsdistill.ds_config import zero_stage
from dsdistill.engines import build_student_engine, build_teacher_engine, current_lr
from dsdistill.errors import DistillError, PeerFailed, one_line
from dsdistill.preempt import EXIT_PREEMPTED, LauncherWatch, StopRequest
from dsdistill.heads import PassThrough, full_weight
from dsdistill.evaluate import EarlyStopping, EvalResult, evaluate, teacher_perplexity
from dsdistill.data import data_fingerprint
from dsdistill.metrics import MetricsWriter
from dsdistill.capture import QKCapture
from dsdistill.models import DTYPES, load_causal_lm, param_counts
from dsdistill.objective import component_sums, forward_pair, objective_value, unit_counts, unit_of, weighted_sum
from dsdistill.student import DistillStudent, capture_layers
from dsdistill.preflight import Plan, preflight
from dsdistill.report import eval_line, train_line
from dsdistill.schema import AlertRecord, EvalRecord, RunEnd, RunStart, TrainRecord


# ---------------------------------------------------------------------------------------------- setup


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


@dataclass
class Run:
    """Everything the loop and evaluation need: the validated plan plus the two engines."""

    plan: Plan
    teacher: Any
    student: Any
    writer: MetricsWriter
    student_capture: Optional[QKCapture] = None
    teacher_capture: Optional[QKCapture] = None
    fused: bool = False
    """KD and LM run chunked from hidden states (the teacher returns its final hidden state)."""
    teacher_head_weight: Any = None
    """The teacher's lm_head weight (ZeRO-3 partitioned); `full_weight` gathers it once per step."""

    def __getattr__(self, name):  # cfg, rank, world, splits, curriculum, vocab, total_steps, ... from the plan
        return getattr(self.plan, name)


def setup(cfg: RunConfig) -> Run:
    """Validate everything that can be checked cheaply, then load the models into their engines."""
    rank, world = init_distributed()
    torch.manual_seed(cfg.train.seed)
    # every rank checks the same inputs; agreeing on failure keeps a rank that failed alone from leaving the
    # others waiting in the next collective, and the first error is printed once
    plan = agree(lambda: preflight(cfg, world=world, rank=rank), what="preflight")
    teacher_model = agree(lambda: load_causal_lm(cfg.teacher, field="teacher", precision=plan.precision,
                                                 zero3_ds_config=plan.ds_teacher), what="loading the teacher")
    # preflight decided from both architectures (built on the meta device) whether the fused path applies
    fused = cfg.loss.fused_logits and plan.fused_off is None
    if cfg.loss.fused_logits and plan.fused_off is not None:
        _say(rank, f"note: fused KD/LM is off because {plan.fused_off}; using full logits")
    teacher_head_weight = teacher_model.lm_head.weight if fused else None
    if fused:
        teacher_model.lm_head = PassThrough()  # the teacher stops at its final hidden state
    teacher = build_teacher_engine(teacher_model, plan.ds_teacher)
    student_model = agree(lambda: load_causal_lm(
        cfg.student, field="student", precision=plan.precision,
        zero3_ds_config=plan.ds_student if zero_stage(plan.ds_student) == 3 else None,
    ), what="loading the student")
    active = set(plan.components)
    wrapped = DistillStudent(student_model, loss=cfg.loss, plan=plan.layers, teacher_width=plan.teacher_config.hidden_size,
                             components=active, seed=cfg.train.seed, fused=fused)
    if plan.precision != "fp32":
        wrapped.aux.to(DTYPES[plan.precision])
    student = build_student_engine(wrapped, plan.ds_student, cfg, total_steps=plan.total_steps)
    s_layers, t_layers = capture_layers(plan.layers, active)
    return Run(plan, teacher, student, MetricsWriter(plan.run_dir, enabled=rank == 0),
               student_capture=QKCapture(student_model, s_layers) if s_layers else None,
               teacher_capture=QKCapture(teacher.module, t_layers) if t_layers else None,
               fused=fused, teacher_head_weight=teacher_head_weight)


# ---------------------------------------------------------------------------------------------- loop


UNITS = ("token", "sequence", "layer")


def _eval_record(r: EvalResult, teacher_ppl: float, stopper: EarlyStopping) -> EvalRecord:
    return EvalRecord(
        step=r.step, weights=r.weights, losses=r.losses, weighted=r.weighted, objective=r.objective,
        temperature=r.temperature, lm_ce=r.lm_ce, ppl=r.ppl, teacher_ppl=teacher_ppl, tokens=r.tokens,
        best=stopper.best, bad_evals=stopper.bad_evals, early_stop_metric=stopper.metric,
    )


def _progress_bar(run: Run):
    from tqdm import tqdm

    return tqdm(total=run.total_steps, desc="distil", unit="step", dynamic_ncols=True,
                disable=run.rank != 0 or not sys.stderr.isatty())


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run a whole distillation; returns a summary (rank 0's numbers; other ranks get the same).

    Stop signals are handled from the start (a preemption during model loading still ends cleanly), and
    a run that fails or is interrupted after its metrics stream opened still gets its run_end record."""
    stop = StopRequest(cfg.train.signal_grace_s)
    stop.install()
    run: Optional[Run] = None
    watch: Optional[LauncherWatch] = None
    try:
        run = setup(cfg)
        watch = LauncherWatch(stop).start()
        return _train_loop(run, stop)
    except BaseException as e:
        # the stream gets its run_end if this run wrote to it, or continues one (a failed resume)
        if run is not None and (run.writer.opened or run.writer.path.exists()) and not isinstance(e, PeerFailed):
            interrupted = isinstance(e, KeyboardInterrupt)
            try:
                run.writer.write(RunEnd(step=run.student.global_steps, reason="interrupted" if interrupted else "error",
                                        message=one_line(f"{type(e).__name__}: {e}")[:500]))
            except DistillError:
                pass  # the stream itself cannot be written: the error being raised says so already
        raise
    finally:
        if watch is not None:
            watch.close()
        stop.uninstall()
        if run is not None:
            run.writer.close()


def _train_loop(run: Run, stop: StopRequest) -> dict[str, Any]:
    cfg = run.cfg
    student, teacher, cur = run.student, run.teacher, run.curriculum
    total, gas, world = run.total_steps, cfg.train.grad_accum, run.world
    t_params, _ = param_counts(teacher.module)
    s_params, _ = param_counts(student.module.model)
    stopper = EarlyStopping(metric=cfg.eval.early_stopping.metric, patience=cfg.eval.early_stopping.patience,
                            min_delta=cfg.eval.early_stopping.min_delta)
    tokens_seen = 0
    layout = _layout(run)
    resumed = None
    if cfg.checkpoint.resume == "auto":
        resumed = agree(lambda: checkpoint.load(student, run.run_dir, tag=cfg.checkpoint.resume_tag, expect=layout),
                        what="resuming")
    if resumed is not None:
        run.stream.restore(resumed["stream"])
        stopper.restore(resumed["early_stopping"])
        tokens_seen = int(resumed["tokens_seen"])
        _say(run.rank, f"resumed from {checkpoint.checkpoint_dir(run.run_dir) / resumed['tag']} "
             f"at optimizer step {student.global_steps}")
    run.writer.write(RunStart(
        step=student.global_steps, config=dump_config(cfg), total_steps=total, world_size=world,
        schedule=cur.definition(), global_batch=cfg.train.micro_batch_size * gas * world, seq_len=cfg.train.seq_len,
        student_zero_stage=zero_stage(run.ds_student), teacher_zero_stage=zero_stage(run.ds_teacher),
        student_params=s_params, teacher_params=t_params, resumed=resumed is not None,
    ))
    if run.rank == 0:
        _write_config(run.run_dir / "config.yaml", dump_config(cfg))
    _say(run.rank, f"dsdistill: {total} optimizer steps, world {world}, global batch "
         f"{cfg.train.micro_batch_size * gas * world} x {cfg.train.seq_len} tokens, teacher {t_params:,} params "
         f"(ZeRO-3), student {s_params:,} params (ZeRO-{zero_stage(run.ds_student)}), run dir {run.run_dir}")
    if cur.inactive:
        why = "; ".join(f"{n}: {run.plan.left_out[n]}" for n in cur.inactive if n in run.plan.left_out)
        msg = (f"scheduled components not computed for this run (left out of the objective): {', '.join(cur.inactive)}"
               + (f" ({why})" if why else ""))
        _say(run.rank, f"warning: {msg}")
        run.writer.write(AlertRecord(step=student.global_steps, level="info", code="inactive_components", message=msg))

    if run.splits.skipped_documents:
        msg = f"{run.splits.skipped_documents} documents with a null or empty '{cfg.data.text_field}' were skipped"
        _say(run.rank, f"warning: {msg}")
        run.writer.write(AlertRecord(step=student.global_steps, level="info", code="skipped_documents", message=msg))
    teacher_ppl = teacher_perplexity(run)
    _say(run.rank, f"teacher perplexity on the eval split: {teacher_ppl:.3f}")
    names = cur.active
    ignore = cfg.loss.ignore_index
    interval_tokens, interval_start = 0, time.perf_counter()
    warned_zero_lr = False
    skipped_seen = int(getattr(student, "skipped_steps", 0))
    bad_in_a_row = 0
    last_eval: Optional[EvalResult] = None
    reason = "completed"
    batches = iter(run.stream)

    def run_eval() -> bool:
        nonlocal last_eval
        last_eval = evaluate(run, step=student.global_steps)
        best_before = stopper.best
        stop = stopper.update(last_eval)
        if cfg.checkpoint.keep_best and student.global_steps > 0 and stopper.best != best_before:
            save(mark_best=True)
        erec = _eval_record(last_eval, teacher_ppl, stopper)
        run.writer.write(erec)
        if run.rank == 0:
            bar.write(eval_line(erec), file=sys.stdout)
            sys.stdout.flush()
        return stop

    def save(mark_best: bool = False) -> None:
        state = {"stream": run.stream.state(), "early_stopping": stopper.state(), "tokens_seen": tokens_seen,
                 "layout": layout}
        checkpoint.save(student, run.run_dir, state=state, keep_last=cfg.checkpoint.keep_last, mark_best=mark_best)

    bar = _progress_bar(run)
    bar.update(student.global_steps)
    if cfg.eval.at_start and resumed is None:
        run_eval()
    student.train()

    while student.global_steps < total:
        step = student.global_steps  # the one schedule position for this whole accumulation window
        weights = cur.weights_at(step=step, total_steps=total)
        temperature = cur.temperature_at(step=step, total_steps=total)
        window = [next(batches) for _ in range(gas)]
        # units in the whole window on all ranks: each component is divided by its own unit count
        counted = [unit_counts(mb["labels"], ignore) for mb in window]
        units = dict(zip(UNITS, all_reduce_sum([float(sum(c[u] for c in counted)) for u in UNITS])))
        normalizers = {n: units[unit_of(n)] for n in names}
        window_tokens = units["token"]
        with_grad = {n for n in names if weights[n] != 0.0}
        acc = {n: 0.0 for n in names}
        acc_kl = 0.0
        usage = None
        nonfinite_loss = False
        lr_used = float("nan")
        # fused KD/LM: the teacher's lm_head weight is gathered once for the whole step
        t_weight = full_weight(run.teacher_head_weight) if run.fused and "kd" in names else None
        coef = {n: weights.get(n, 0.0) / max(normalizers.get(n, 1.0), 1.0) for n in ("kd", "lm")}
        for mb in window:
            ids = mb["input_ids"].to(student.device)
            labels = mb["labels"].to(student.device)
            out = forward_pair(run, ids, labels, temperature=temperature, coef_kd=coef["kd"], coef_lm=coef["lm"],
                               teacher_weight=t_weight)
            sums = component_sums(names, out, temperature=temperature, loss_cfg=cfg.loss, plan=run.layers, grad=with_grad)
            # DeepSpeed divides by gas and averages gradients over ranks; undo both so the step minimises
            # the token-weighted objective of the whole window on all ranks.
            loss = weighted_sum(sums, weights=weights, normalizers=normalizers) * (gas * world)
            if not torch.isfinite(loss):
                # make the gradients non-finite too, so ZeRO's global check skips this update on every rank
                nonfinite_loss = True
                loss = loss * float("nan")
            student.backward(loss)
            boundary = student.is_gradient_accumulation_boundary()
            if boundary:
                lr_used = current_lr(student)  # what optimizer.step() below applies
            skipped_before = int(getattr(student, "skipped_steps", 0))
            student.step()
            if boundary and int(getattr(student, "skipped_steps", 0)) > skipped_before and student.lr_scheduler is not None:
                # DeepSpeed does not advance the LR schedule on a skipped step, but the step counter (and with it
                # the curriculum) moves on: advance it here so the LR stays a function of the optimizer step
                student.lr_scheduler.step()
            for n in names:  # summed on the device; transferred once per window by the all-reduce below
                acc[n] = acc[n] + sums.sums[n].detach()
            if "kd_kl" in sums.extras:
                acc_kl = acc_kl + sums.extras["kd_kl"]
            usage = sums.extras.get("gate_usage", usage)
            del out, sums, loss
        del t_weight
        reduced = all_reduce_sum([acc[n] for n in names] + [acc_kl, float(nonfinite_loss), float(stop.signal is not None)])
        stop_requested = reduced.pop() > 0  # every rank stops after the same step
        any_nonfinite = reduced.pop() > 0
        losses = {n: reduced[i] / max(normalizers[n], 1.0) for i, n in enumerate(names)}
        objective = objective_value(losses, weights)
        step_tokens = sum(mb["input_ids"].numel() for mb in window) * world
        tokens_seen += step_tokens
        interval_tokens += step_tokens
        done = student.global_steps
        bar.update(1)
        skipped = int(getattr(student, "skipped_steps", 0))
        was_skipped = skipped > skipped_seen
        skipped_seen = skipped
        overflow_only = run.precision == "fp16" and not any_nonfinite  # fp16 loss scaling skips steps by design
        if was_skipped and overflow_only:
            run.writer.write(AlertRecord(step=step, level="info", code="step_skipped",
                                         message=f"fp16 loss-scale overflow: DeepSpeed skipped optimizer step {step}"))
        elif any_nonfinite or was_skipped:
            bad_in_a_row += 1
            what = "loss" if any_nonfinite else "gradients"
            msg = (f"non-finite {what} at optimizer step {step}: the update was skipped, weights untouched "
                   f"({bad_in_a_row} in a row; the run stops at {cfg.train.max_bad_steps})")
            run.writer.write(AlertRecord(step=step, level="error", code="nonfinite_step", message=msg))
            _say(run.rank, f"warning: {msg}")
            if bad_in_a_row >= cfg.train.max_bad_steps:
                last_good = checkpoint.latest_tag(run.run_dir)
                err = DistillError(f"train.max_bad_steps: {bad_in_a_row} consecutive optimizer steps had a non-finite {what} "
                                   f"(last at step {step}); stopped. Latest checkpoint: "
                                   f"{checkpoint.checkpoint_dir(run.run_dir) / last_good if last_good else 'none'}")
                err.everywhere = True  # every rank counts the same agreed steps
                raise err
        else:
            bad_in_a_row = 0

        if step == 0 and lr_used == 0.0 and not warned_zero_lr:
            warned_zero_lr = True
            msg = "the LR schedule gave the first optimizer step LR 0 (warmup starts at 0); that step changed nothing"
            _say(run.rank, f"warning: {msg}")
            run.writer.write(AlertRecord(step=step, code="lr_zero_first_step", message=msg))

        if done % cfg.output.log_every == 0 or done == total:
            elapsed = time.perf_counter() - interval_start
            norm = student.get_global_grad_norm() if hasattr(student, "get_global_grad_norm") else None
            rec = TrainRecord(
                step=step, weights=weights, losses=losses, weighted={n: weights[n] * losses[n] for n in names},
                objective=objective, lr=lr_used, temperature=temperature,
                tokens_per_s=interval_tokens / elapsed if elapsed > 0 else 0.0, tokens=tokens_seen,
                progress=done / total, total_steps=total, grad_norm=_to_float(norm),
                extras={"kd_kl": reduced[-1] / max(window_tokens, 1.0)} if "kd" in names else {},
                mem_gib=_peak_mem_gib(), gate_usage=usage,
            )
            run.writer.write(rec)
            if run.rank == 0:
                bar.write(train_line(rec), file=sys.stdout)
                sys.stdout.flush()
            interval_tokens, interval_start = 0, time.perf_counter()

        if (cfg.eval.every and done % cfg.eval.every == 0) or done == total:
            if run_eval():
                reason = "early_stopping"
                _say(run.rank, f"early stopping: eval {stopper.metric} has not improved by more than "
                     f"{stopper.min_delta} for {stopper.patience} evaluations (best {stopper.best:.4g})")
                break
            interval_start = time.perf_counter()  # eval time is not training throughput
        if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done < total:
            save()
            interval_start = time.perf_counter()
        if cfg.train.stop_at_step is not None and done >= cfg.train.stop_at_step and done < total:
            reason = "paused"
            _say(run.rank, f"stopping at optimizer step {done} (train.stop_at_step); relaunch to resume")
            break
        if stop_requested and done < total:
            reason = "interrupted"
            _say(run.rank, f"stopping at optimizer step {done} ({stop.signal or 'a stop request on another rank'}); saving a checkpoint")
            break
    bar.close()

    if (cfg.checkpoint.save_final or reason in ("paused", "interrupted")) and checkpoint.latest_tag(run.run_dir) != f"step{student.global_steps}":
        save()
    stop.leaving()  # saved: a launcher's follow-up signals have nothing left to interrupt
    message = f"{stop.signal or 'signal'}; checkpoint at step {student.global_steps}; relaunch to resume" if reason == "interrupted" else ""
    run.writer.write(RunEnd(step=student.global_steps, reason=reason, best=stopper.best, message=message))
    # leave together: a launcher that sees one rank exit stops the others, which must not be before rank 0
    # has written run_end
    if dist.is_initialized() and run.world > 1:
        dist.barrier()
    return {
        "steps": student.global_steps,
        "total_steps": total,
        "reason": reason,
        "teacher_ppl": teacher_ppl,
        "final_eval": last_eval,
        "run_dir": str(run.run_dir),
        "run": run,
    }


def _layout(run: Run) -> dict[str, Any]:
    """What fixes the meaning of a saved data position: resuming with any of it changed is refused."""
    c = run.cfg
    return {"train.micro_batch_size": c.train.micro_batch_size, "train.seq_len": c.train.seq_len,
            "train.seed": c.train.seed, "world_size": run.world, "data": data_fingerprint(run.splits.train)}


def _to_float(x) -> Optional[float]:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _peak_mem_gib() -> Optional[float]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def _write_config(path: Path, data: dict) -> None:
    """The resolved config, written whole or not at all (a full disk leaves the previous file intact)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(_yaml(data))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"output.run_dir: cannot write '{path}' ({e.strerror or e}); files written before are kept") from None


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------------- entry


def build_parser(prog: str = "dsdistill/train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distil a frozen teacher into a student with DeepSpeed.")
    p.add_argument("--config", required=True, help="run config (YAML or JSON)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def report_error(err: BaseException) -> None:
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
    return any(k in text for k in ("connection closed", "connection reset", "broken pipe", "distbackenderror",
                                   "gloo", "nccl error", "socket timeout", "timed out"))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg)
    except DistillError as e:
        report_error(e)
        return e.exit_code
    except (RuntimeError, OSError) as e:
        if not _lost_peer(e):
            raise
        print(f"dsdistill: error: rank {_rank()}: stopped because another rank went away "
              f"({one_line(str(e))[:160]})", file=sys.stderr, flush=True)
        return 1
    return EXIT_PREEMPTED if summary["reason"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
