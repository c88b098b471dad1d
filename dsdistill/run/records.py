"""What a run says: step and eval results turned into records (rank 0 appends them to metrics.jsonl), the
console lines built from the same records, and alerts."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

from dsdistill.config import RunConfig, dump_config
from dsdistill.data import plan_json
from dsdistill.ds_config import lr_schedule, zero_stage
from dsdistill.errors import DistillError
from dsdistill.losses.kd import T2_SCALED, TOP_K_SUPPORT
from dsdistill.metrics import MetricsWriter
from dsdistill.preflight import estimate_memory, skipped_warnings
from dsdistill.rundir import write_atomic
from dsdistill.schema import AlertRecord, EvalRecord, RunStart, TrainRecord
from dsdistill.system import gpu_peak_gib, system_record
from dsdistill.trainer import EvalResult, StepResult

SYSTEM_EVERY_LOGS = 10
"""A system record (every rank's memory, GPU use) with the first train record and every 10th after it."""


def say(rank: int, text: str) -> None:
    """A console line, from rank 0."""
    if rank == 0:
        print(text, flush=True)


class Records:
    """The run's metrics stream and console, for rank 0 (other ranks compute what collectives need)."""

    def __init__(self, plan, writer: MetricsWriter):
        self.plan = plan
        self.writer = writer
        self.bar: Any = None
        self.logs = 0

    def start(self, *, step: int, resumed: bool, data, teacher, student_params: int) -> None:
        """run_start, the resolved config.yaml, the header line and the plan's warnings."""
        plan, cfg = self.plan, self.plan.cfg
        t_params = teacher.params()
        self.writer.write(
            RunStart(
                step=step,
                config=dump_config(cfg),
                total_steps=plan.total_steps,
                world_size=plan.world,
                schedule=plan.curriculum.definition(),
                global_batch=plan.global_batch,
                seq_len=cfg.train.seq_len,
                student_zero_stage=zero_stage(plan.ds_student),
                teacher_zero_stage=zero_stage(plan.ds_teacher),
                teacher_placement=[p for _, p in plan.teacher_shards],
                student_params=student_params,
                teacher_params=t_params,
                resumed=resumed,
                data=plan_json(data.splits),
                kd={**kd_semantics(cfg), **data.teacher.kd_semantics()},
                lr_schedule=lr_schedule(cfg, plan.ds_student),
            )
        )
        if plan.rank == 0:
            _write_config(plan.run_dir / "config.yaml", dump_config(cfg))
        say(
            plan.rank,
            f"dsdistill: {plan.total_steps} optimizer steps, world {plan.world}, global batch "
            f"{plan.global_batch} x {cfg.train.seq_len} tokens, teacher {t_params:,} params ({teacher.where()}), "
            f"student {student_params:,} params (ZeRO-{zero_stage(plan.ds_student)}), run dir {plan.run_dir}",
        )
        cur = plan.curriculum
        if cur.inactive:
            why = "; ".join(f"{n}: {plan.left_out[n]}" for n in cur.inactive if n in plan.left_out)
            self.alert(
                step,
                "info",
                "inactive_components",
                f"scheduled components not computed for this run (left out of the objective): "
                f"{', '.join(cur.inactive)}" + (f" ({why})" if why else ""),
            )
        for warning in skipped_warnings(data.splits, cfg):
            self.alert(step, "info", "skipped_documents", warning.removeprefix("warning: "))

    def alert(
        self, step: int, level: Literal["info", "warning", "error"], code: str, message: str, *, say_it: bool = True
    ) -> None:
        if say_it:
            say(self.plan.rank, f"{level}: {message}")  # an error alert says error, an info says info
        self.writer.write(AlertRecord(step=step, level=level, code=code, message=message))

    def progress(self, *, done: int) -> None:
        from tqdm import tqdm

        plan = self.plan
        self.bar = tqdm(
            total=plan.total_steps,
            desc="distil",
            unit="step",
            dynamic_ncols=True,
            disable=plan.rank != 0 or not sys.stderr.isatty(),
        )
        self.bar.update(done)

    def _line(self, text: str) -> None:
        if self.plan.rank == 0:
            self.bar.write(text, file=sys.stdout)
            sys.stdout.flush()

    def train(self, r: StepResult, *, done: int, tokens_seen: int, tokens_per_s: float) -> None:
        """The step's train record (every `output.log_every` steps and the last), and a system record with
        every 10th."""
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
            tokens_per_s=tokens_per_s,
            tokens=tokens_seen,
            progress=done / plan.total_steps,
            total_steps=plan.total_steps,
            grad_norm=r.grad_norm,
            metrics=r.metrics,
            mem_gib=gpu_peak_gib(),
            gate_usage=r.gate_usage,
            on_policy=r.ctx.on_policy if plan.curriculum.ever_on_policy else None,
            rollout=rollout_fields(r.rollout),
            teacher_wait=r.teacher_wait,
        )
        self.writer.write(rec)
        self._line(train_line(rec))
        self.logs += 1
        if self.logs % SYSTEM_EVERY_LOGS == 1:  # every rank at the same steps: the record is one collective
            estimate = estimate_memory(plan)["total"] if plan.rank == 0 else None
            usage = system_record(step=r.step, rank=plan.rank, world=plan.world, estimate_gib=estimate)
            if usage is not None:
                self.writer.write(usage)

    def eval(self, r: EvalResult, **fields: Any) -> None:
        """The eval record (`fields`: the teacher's perplexity, early stopping's state, the per-source and
        on-policy results)."""
        rec = EvalRecord(
            step=r.step,
            weights=r.weights,
            losses=r.losses,
            weighted=r.weighted,
            objective=r.objective,
            temperature=r.temperature,
            lm_ce=r.lm_ce,
            ppl=r.ppl,
            tokens=r.tokens,
            metrics=r.metrics,
            **fields,
        )
        self.writer.write(rec)
        self._line(eval_line(rec))


def kd_semantics(cfg: RunConfig) -> dict[str, Any]:
    """What run_start says of KD: the divergence, whether it is T^2-scaled, and its top-k support (a teacher
    that holds only its top-k overrides the support)."""
    c = cfg.loss.section("kd")
    support = "teacher" if c.top_k_support == "teacher" else TOP_K_SUPPORT[c.divergence]
    return {
        "divergence": c.divergence,
        "t2_scaled": c.divergence in T2_SCALED,
        "top_k_support": support if c.top_k is not None else "full vocabulary",
    }


def rollout_fields(r: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
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


def _num(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def train_line(r: TrainRecord) -> str:
    """`step 40/200 (20.0%) | T 3.00 | w kd=0.700 lm=0.300 | obj 2.3456 | kd 2.1000 (w 1.4700) ... | lr 3e-04 | 1,234 tok/s`"""
    weights = " ".join(f"{k}={v:.3f}" for k, v in r.weights.items())
    comps = " ".join(f"{k} {_num(v)} (w {_num(r.weighted.get(k, 0.0))})" for k, v in r.losses.items())
    comps += _per_teacher(r.metrics)
    return (
        f"step {r.step + 1}/{r.total_steps} ({100 * r.progress:.1f}%) | T {r.temperature:.2f} | w {weights} | "
        f"obj {_num(r.objective)} | {comps} | lr {r.lr:.3g} | {r.tokens_per_s:,.0f} tok/s"
        + (f" | teacher wait {r.teacher_wait:.0%}" if r.teacher_wait is not None else "")
    )


def _per_teacher(metrics: dict[str, float]) -> str:
    """` [kd llama 1.2 qwen 2.3]` with several teachers: each one's own KD."""
    own = [(k[3:], v) for k, v in metrics.items() if k.startswith("kd.")]
    return " [kd " + " ".join(f"{n} {_num(v)}" for n, v in own) + "]" if own else ""


def eval_line(r: EvalRecord) -> str:
    """`eval @ step 40 | obj 2.1 | kd 1.9 lm 3.0 | ppl 20.1 (teacher 6.3)`"""
    comps = " ".join(f"{k} {_num(v)}" for k, v in r.losses.items()) + _per_teacher(r.metrics)
    teacher = f" (teacher {r.teacher_ppl:.2f})" if r.teacher_ppl is not None else ""
    if r.teacher_ppls:
        teacher = " (teachers " + ", ".join(f"{n} {p:.2f}" for n, p in r.teacher_ppls.items()) + ")"
    stop = f" | best {r.early_stop_metric} {r.best:.4g}, {r.bad_evals} without improvement" if r.best is not None else ""
    return f"eval @ step {r.step} | obj {_num(r.objective)} | {comps} | ppl {r.ppl:.3f}{teacher}{stop}"


def _write_config(path: Path, data: dict) -> None:
    """The resolved config, written whole or not at all (a full disk leaves the previous file intact)."""
    import yaml

    try:
        write_atomic(path, yaml.safe_dump(data, sort_keys=False).encode())
    except OSError as e:
        raise DistillError(f"output.run_dir: cannot write '{path}' ({e.strerror or e}); files written before are kept") from None
