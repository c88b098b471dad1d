"""In-process runs of the real DeepSpeed engines (world size 1, gloo on CPU)."""

import contextlib
import io
import json
import math

import pytest
import torch

from dsdistill.config import validate
from dsdistill.engines import lr_multiplier
from dsdistill.objective import count_units
from dsdistill.schema import METRICS_FILE, AlertRecord, EvalRecord, RunEnd, RunStart, TrainRecord, parse_line
from dsdistill.train import open_session, train

RAMPED = {
    "weights": {
        "kd": {"kind": "linear", "start": 0.25, "end": 0.5, "start_value": 0.7, "end_value": 0.2},
        "lm": {"kind": "cosine", "start": 0.5, "end": 0.75, "start_value": 0.3, "end_value": 0.8},
    },
    "temperature": {"kind": "linear", "start": 0.0, "end": 1.0, "start_value": 3.0, "end_value": 1.5},
}
TOTAL = 8


def records(run_dir):
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    parsed = [parse_line(line) for line in lines]
    assert all(p is not None for p in parsed), "every line of metrics.jsonl is a valid record"
    return parsed


@pytest.fixture(scope="module")
def ramped_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ramped") / "run"
    cfg = validate(
        {
            "teacher": {"path": str(assets["teacher"])},
            "student": {"path": str(assets["student"])},
            "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1},
            "curriculum": RAMPED,
            "train": {"max_steps": TOTAL, "micro_batch_size": 4, "grad_accum": 2, "seq_len": 32, "precision": "fp32"},
            "optimizer": {"lr": 3e-3},
            "scheduler": {"kind": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
            "eval": {"every": 2, "max_batches": 2, "at_start": True},
            "output": {"run_dir": str(run_dir), "log_every": 1},
            "checkpoint": {"save_final": True},
        }
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out), open_session(cfg) as session:
        session.fit()
    return session, records(run_dir), out.getvalue()


def by_kind(recs, cls):
    return [r for r in recs if isinstance(r, cls)]


def test_stream_shape(ramped_run):
    summary, recs, _ = ramped_run
    assert isinstance(recs[0], RunStart) and isinstance(recs[-1], RunEnd)
    start = recs[0]
    assert start.total_steps == TOTAL and start.world_size == 1 and start.schedule["active"] == ["kd", "lm"]
    assert start.config["curriculum"]["weights"]["kd"]["kind"] == "linear"
    assert start.kd == {"divergence": "forward_kl", "t2_scaled": True, "top_k_support": "full vocabulary"}
    assert recs[-1].reason == "completed" and recs[-1].step == TOTAL
    trains = by_kind(recs, TrainRecord)
    assert [t.step for t in trains] == list(range(TOTAL))  # one record per optimizer step, never per micro-step
    assert all(set(t.losses) == {"kd", "lm"} and all(math.isfinite(v) for v in t.losses.values()) for t in trains)
    assert [e.step for e in by_kind(recs, EvalRecord)] == [0, 2, 4, 6, 8]
    assert (summary.plan.run_dir / "checkpoints" / f"step{TOTAL}").is_dir()


def test_global_steps_advance_once_per_accumulation_window(ramped_run):
    summary, _, _ = ramped_run
    student = summary.student
    assert student.global_steps == TOTAL
    assert student.micro_steps == 2 * TOTAL
    assert student.skipped_steps == 0  # every step was applied (no non-finite gradients)


def test_eval_uses_the_train_weights_at_the_same_step(ramped_run):
    """The seed's bug: eval with step=None got full weights while training used the schedule."""
    _, recs, _ = ramped_run
    trains = {t.step: t for t in by_kind(recs, TrainRecord)}
    evals = by_kind(recs, EvalRecord)
    for e in evals:
        if e.step in trains:
            assert e.weights == trains[e.step].weights
            assert e.temperature == trains[e.step].temperature
    # the schedule really moves across the run, so equality above is not trivial
    assert trains[0].weights["kd"] == pytest.approx(0.7) and trains[7].weights["kd"] == pytest.approx(0.2)
    assert len({round(e.weights["lm"], 6) for e in evals}) >= 2


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4, 5, 6, 7, 8])
def test_eval_objective_equals_train_objective_on_the_same_batch(ramped_run, step):
    run, _, _ = ramped_run
    n = run.plan.cfg.train.micro_batch_size
    ids = torch.stack([run.data.splits.eval[i]["input_ids"] for i in range(n)])
    batch = {"input_ids": ids, "labels": ids.clone()}
    ev = run.evaluator.evaluate([batch], step=step)  # one batch, recomputed below through the training path
    cur, total = run.plan.curriculum, run.plan.total_steps
    weights = cur.weights_at(step=step, total_steps=total)
    temperature = cur.temperature_at(step=step, total_steps=total)
    assert ev.weights == weights and ev.temperature == temperature
    objective = run.trainer.objective
    ctx = objective.context(step=step)
    units = {u: float(c) for u, c in count_units(batch["labels"], run.plan.cfg.loss.ignore_index).items()}
    coefficients = objective.coefficients(ctx, objective.normalizers(units))
    run.teacher.begin_step(objective.needs)
    with torch.no_grad():
        x = run.forward(batch, objective, ctx, coefficients, want_lm=True)
        train_objective = float(objective.loss(objective.sums(x), coefficients))
    run.teacher.end_step()
    assert ev.objective == pytest.approx(train_objective, rel=1e-6)


def test_eval_values_move_while_learning(ramped_run):
    _, recs, _ = ramped_run
    evals = by_kind(recs, EvalRecord)
    objectives = [e.objective for e in evals]
    assert all(a != b for a, b in zip(objectives, objectives[1:]))
    assert evals[-1].ppl < evals[0].ppl
    trains = by_kind(recs, TrainRecord)
    assert trains[-1].losses["lm"] < trains[0].losses["lm"]


def test_perplexity_is_exp_of_token_weighted_lm_ce(ramped_run):
    _, recs, _ = ramped_run
    for e in by_kind(recs, EvalRecord):
        assert e.lm_ce == e.losses["lm"]
        assert e.ppl == pytest.approx(math.exp(e.lm_ce), rel=1e-12)
        assert e.ppl != pytest.approx(math.exp(e.objective))
        assert e.teacher_ppl is not None and e.teacher_ppl > 1


def test_logged_lr_is_the_lr_the_optimizer_used(ramped_run):
    run, recs, out = ramped_run
    for t in by_kind(recs, TrainRecord):
        expected = 3e-3 * lr_multiplier(t.step, sched=run.plan.cfg.scheduler, total_steps=TOTAL)
        assert t.lr == pytest.approx(expected, rel=1e-12)
        assert t.lr > 0
    assert f"lr {3e-3 / 3:.3g} " in out  # three significant digits in the log line


def test_eval_prints_nothing(ramped_run, capsys):
    summary, _, out = ramped_run
    capsys.readouterr()
    summary.evaluate(step=3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert out.count("eval @ step") == 5
    assert sum(line.startswith("step ") for line in out.splitlines()) == TOTAL


def test_zero_first_lr_is_warned_once(make_config, tmp_path):
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 1},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
    }
    raw = make_config(train={"max_steps": 4}, deepspeed={"student": ds}, eval={"every": 0, "max_batches": 1})
    raw["scheduler"] = {"warmup_steps": 2}  # fills the DeepSpeed block's "auto" warmup: one schedule
    cfg = validate(raw)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train(cfg)
    recs = records(tmp_path / "run")
    alerts = [a for a in by_kind(recs, AlertRecord) if a.code == "lr_zero_first_step"]
    assert len(alerts) == 1 and out.getvalue().count("warning: the LR schedule gave the first optimizer step LR 0") == 1
    lrs = [t.lr for t in by_kind(recs, TrainRecord)]
    assert lrs[0] == 0.0 and lrs[-1] > 0  # DeepSpeed's log warmup; the warning fired once, not per step


def test_early_stopping_on_perplexity(make_config, tmp_path):
    cfg = validate(
        make_config(
            train={"max_steps": 12},
            optimizer={"lr": 1e-9},
            scheduler={"warmup_steps": 0, "kind": "constant"},
            eval={"every": 1, "max_batches": 1, "early_stopping": {"patience": 2, "min_delta": 0.5}},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    assert summary.reason == "early_stopping" and summary.steps == 3
    end = records(tmp_path / "run")[-1]
    assert isinstance(end, RunEnd) and end.reason == "early_stopping"


def test_appends_never_truncates(make_config, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / METRICS_FILE).write_text(json.dumps({"kind": "note", "step": 0, "time": 0}) + "\n")
    cfg = validate(make_config(train={"max_steps": 1}, eval={"every": 0, "max_batches": 1}))
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    lines = (run_dir / METRICS_FILE).read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "note" and len(lines) > 3


def test_resume_reproduces_the_uninterrupted_run(make_config, tmp_path):
    """Stopped after 3 of 6 steps and relaunched, the run logs the same per-step numbers."""
    base = dict(
        train={"max_steps": 6, "grad_accum": 2},
        eval={"every": 2, "max_batches": 1},
        curriculum=RAMPED,
        checkpoint={"save_final": False, "keep_last": 2},
    )
    whole = make_config(**base)
    whole["output"]["run_dir"] = str(tmp_path / "whole")
    parts = make_config(**base)
    parts["output"]["run_dir"] = str(tmp_path / "parts")
    with contextlib.redirect_stdout(io.StringIO()):
        train(validate(whole))
        first = train(validate({**parts, "train": {**parts["train"], "stop_at_step": 3}}))
        assert first.reason == "paused" and first.steps == 3
        second = train(validate(parts))
    assert second.steps == 6 and second.reason == "completed"
    a = by_kind(records(tmp_path / "whole"), TrainRecord)
    b = by_kind(records(tmp_path / "parts"), TrainRecord)
    assert [t.step for t in b] == list(range(6))
    for x, y in zip(a, b):
        assert x.weights == y.weights and x.lr == y.lr
        for name in x.losses:
            assert y.losses[name] == pytest.approx(x.losses[name], rel=1e-6, abs=1e-7)
    ends = [r for r in records(tmp_path / "parts") if isinstance(r, RunEnd)]
    assert [e.reason for e in ends] == ["paused", "completed"]
    starts = [r for r in records(tmp_path / "parts") if isinstance(r, RunStart)]
    assert [s.resumed for s in starts] == [False, True] and starts[1].step == 3
    # eval records at the same steps agree too
    ea = {e.step: e.objective for e in by_kind(records(tmp_path / "whole"), EvalRecord)}
    eb = {e.step: e.objective for e in by_kind(records(tmp_path / "parts"), EvalRecord)}
    for step in (2, 4, 6):
        assert eb[step] == pytest.approx(ea[step], rel=1e-6)


def test_keep_last_prunes_old_checkpoints(make_config, tmp_path):
    cfg = validate(
        make_config(
            train={"max_steps": 5},
            eval={"every": 0, "max_batches": 1},
            checkpoint={"every": 1, "keep_last": 2, "save_final": True},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step4", "step5"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step5"
