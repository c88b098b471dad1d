"""The trainer core's parts on their own terms: the stop policy and the non-finite guard as plain
objects, `Trainer.step` on a real in-process DeepSpeed engine (a fault raised by a component, no hooks),
and a new loss component added with its own file plus one registration line."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from dsdistill import registry
from dsdistill.config import validate
from dsdistill.data import eval_batches
from dsdistill.engines import lr_multiplier
from dsdistill.errors import DistillError
from dsdistill.objective import StepContext
from dsdistill.schema import METRICS_FILE, EvalRecord, TrainRecord, parse_line
from dsdistill.train import open_session
from dsdistill.trainer import NonFiniteGuard, StepResult, StopPolicy
from tests import toy_components


def _result(step: int, *, nonfinite=False, skipped=False, stop=False) -> StepResult:
    return StepResult(
        ctx=StepContext(step=step, weights={"lm": 1.0}, temperature=1.0),
        losses={"lm": 1.0},
        objective=1.0,
        lr=1e-3,
        tokens=64,
        metrics={},
        gate_usage=None,
        grad_norm=1.0,
        nonfinite_loss=nonfinite,
        skipped=skipped,
        stop_requested=stop,
    )


def test_stop_policy_orders_its_reasons():
    policy = StopPolicy(total_steps=10, stop_at_step=4)
    assert not policy.finished(9) and policy.finished(10)
    assert policy.after_step(done=3, stop_requested=False) is None
    assert policy.after_step(done=3, stop_requested=True) == "interrupted"
    assert policy.after_step(done=4, stop_requested=True) == "paused"  # the planned pause saves the same way
    assert policy.after_step(done=10, stop_requested=True) == "completed"  # the last step is not an interruption
    assert StopPolicy(total_steps=10, stop_at_step=None).after_step(done=9, stop_requested=False) is None


def test_nonfinite_guard_counts_bad_steps_in_a_row():
    guard = NonFiniteGuard(max_bad_steps=3, fp16=False, resume_hint=lambda: "Latest checkpoint: none")
    assert guard.observe(_result(0)) is None
    level, msg = guard.observe(_result(1, nonfinite=True, skipped=True))
    assert level == "error" and "non-finite loss at optimizer step 1" in msg and "1 in a row" in msg
    assert guard.observe(_result(2)) is None and guard.in_a_row == 0  # a good step resets the count
    guard.observe(_result(3, skipped=True))
    guard.observe(_result(4, skipped=True))
    with pytest.raises(DistillError, match=r"train.max_bad_steps: 3 consecutive .* gradients .*Latest checkpoint: none"):
        guard.observe(_result(5, skipped=True))


def test_fp16_overflow_skips_are_expected_and_never_counted():
    guard = NonFiniteGuard(max_bad_steps=1, fp16=True)
    for step in range(3):
        level, msg = guard.observe(_result(step, skipped=True))
        assert level == "info" and "loss-scale overflow" in msg
    with pytest.raises(DistillError):
        guard.observe(_result(3, nonfinite=True, skipped=True))  # a non-finite loss is not an overflow


@pytest.fixture
def toys():
    # adding a component: its file (tests/toy_components.py) plus one registration line each
    registry.register(
        "hidden_energy", "token", "mean square of the student's last hidden state", "tests.toy_components:HiddenEnergy"
    )
    registry.register("poison", "token", "NaN on demand", "tests.toy_components:Poison")
    yield
    toy_components.POISON["on"] = False
    registry.unregister("hidden_energy")
    registry.unregister("poison")


def test_trainer_step_skips_a_nonfinite_update_on_its_own(make_config, toys):
    cfg = validate(
        make_config(
            train={"max_steps": 6, "grad_accum": 2, "micro_batch_size": 2},
            curriculum={"weights": {"kd": 0.5, "lm": 0.5, "poison": 1.0}},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        batches = iter(s.data.stream)

        def window():
            return [next(batches) for _ in range(cfg.train.grad_accum)]

        first = s.trainer.step(window(), stop_requested=False)
        assert first.step == 0 and s.student.global_steps == 1 and s.student.micro_steps == 2
        assert not first.skipped and not first.nonfinite_loss and math.isfinite(first.objective)
        assert first.tokens == 2 * 2 * 32 and first.lr == pytest.approx(
            2e-3 * lr_multiplier(0, sched=cfg.scheduler, total_steps=6)
        )
        before = [p.detach().clone() for p in s.student.module.parameters()]
        toy_components.POISON["on"] = True
        asked = iter([False, True])  # a stop that arrives during the window's last micro-batch: the step completes
        bad = s.trainer.step(window(), stop_requested=lambda: next(asked))
        assert bad.step == 1 and bad.nonfinite_loss and bad.skipped and bad.stop_requested and not bad.abandoned
        assert all(torch.equal(a, b.detach()) for a, b in zip(before, s.student.module.parameters()))
        toy_components.POISON["on"] = False
        good = s.trainer.step(window(), stop_requested=False)
        assert good.step == 2 and not good.skipped and not good.stop_requested
        # the LR stays a function of the optimizer step through the skipped one
        assert good.lr == pytest.approx(2e-3 * lr_multiplier(2, sched=cfg.scheduler, total_steps=6), rel=1e-12)
        assert not all(torch.equal(a, b.detach()) for a, b in zip(before, s.student.module.parameters()))
        after = [p.detach().clone() for p in s.student.module.parameters()]
        stopped = s.trainer.step(window(), stop_requested=True)  # known before the 2nd micro-batch: abandoned
        assert stopped.abandoned and s.student.global_steps == 3  # no optimizer step was taken (the run saves, exits)
        assert all(torch.equal(a, b.detach()) for a, b in zip(after, s.student.module.parameters()))


def test_a_new_component_trains_and_evaluates_with_its_registration_alone(make_config, assets, toys):
    """The toy's file and its registration line are all it takes: its options validate as `loss.hidden_energy`,
    its loss trains and evaluates, and its diagnostic reaches the records and a monitor plot."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(DistillError, match=r"^loss.hidden_energy.power: got -1; expected greater than 0$"):
        validate(make_config(loss={"hidden_energy": {"power": -1}}))
    cfg = validate(
        make_config(
            train={"max_steps": 2},
            eval={"every": 2, "max_batches": 2, "at_start": True},
            curriculum={"weights": {"kd": 0.5, "lm": 0.5, "hidden_energy": 0.01}},
            loss={"hidden_energy": {"power": 3.0}},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        s.fit()
        batches = list(eval_batches(s.data.splits.eval, micro_batch=4, rank=0, world=1, ignore_index=-100, max_batches=2))
    recs = [parse_line(line) for line in (s.plan.run_dir / METRICS_FILE).read_text().splitlines()]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert [t.step for t in trains] == [0, 1] and all("hidden_energy" in t.losses for t in trains)
    assert all(t.metrics["hidden_peak"] > 0 for t in trains)
    assert recs[0].schedule["active"] == ["kd", "lm", "hidden_energy"]
    assert recs[0].config["loss"]["hidden_energy"] == {"power": 3.0}
    # the values at step 0 (the initial student, before any update) recomputed from the model on disk
    model = AutoModelForCausalLM.from_pretrained(assets["student"]).eval()
    total, count, peaks = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            h = model(input_ids=b["input_ids"], output_hidden_states=True).hidden_states[-1]
            mask = b["labels"][:, 1:] != -100
            per_position = h[:, :-1].abs().pow(3).mean(-1)[mask]
            total, count = total + float(per_position.sum()), count + int(mask.sum())
            peaks.append(float(per_position.max()))
    assert evals[0].step == 0 and evals[0].losses["hidden_energy"] == pytest.approx(total / count, rel=1e-5)
    assert evals[0].metrics["hidden_peak"] == pytest.approx(sum(peaks) / len(peaks), rel=1e-5)  # "micro_batch": their mean
    assert evals[0].objective == pytest.approx(sum(evals[0].weights[n] * evals[0].losses[n] for n in evals[0].weights))
    assert _monitor_plots(s.plan.run_dir) >= {"hidden_energy", "metric/hidden_peak"}


def _monitor_plots(run_dir) -> set[str]:
    """The plots the real dashboard shows for a finished run."""
    import asyncio

    from dsmonitor.app import DsMonitor

    app = DsMonitor([str(run_dir)], poll_interval=0.02, refresh_interval=0.05)

    async def main():
        async with app.run_test(size=(160, 50)) as pilot:
            for _ in range(6000):  # a generous outer limit (5 minutes): the file is complete before it opens
                if app.runs[0].end is not None and not app.catching_up:
                    break
                await pilot.pause(0.05)
            await pilot.pause(0.3)
            return set(app._plots)

    return asyncio.run(main())


def _aux_after(make_config, tmp_path, name: str, stage: int) -> tuple[dict[str, torch.Tensor], list]:
    """A 6-step in-process run whose `feature` and `contrastive` terms weigh 1 for the first steps and 0
    from progress 0.34 on: their modules' weights at the end, and the run's records."""
    import deepspeed

    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
    }
    feature_off = {"kind": "linear", "start": 0.17, "end": 0.34, "start_value": 1.0, "end_value": 0.0}
    cfg = validate(
        make_config(
            train={"max_steps": 6, "micro_batch_size": 2},
            eval={"every": 3, "max_batches": 1},
            curriculum={"weights": {"kd": 0.5, "lm": 0.5, "feature": feature_off, "contrastive": feature_off}},
            deepspeed={"student": ds},
            output={"run_dir": str(tmp_path / name), "log_every": 1},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        s.fit()
        aux = s.student.module.aux
        with deepspeed.zero.GatheredParameters(list(aux.parameters())):
            weights = {k: v.detach().clone() for k, v in aux.state_dict().items()}
    recs = [parse_line(line) for line in (tmp_path / name / METRICS_FILE).read_text().splitlines()]
    return weights, recs


def test_a_component_at_weight_zero_is_skipped_and_its_modules_stop_alike_under_zero2_and_zero3(make_config, tmp_path):
    """A training step computes only the components weighted above 0 (the records say which), while their
    modules still get a zero gradient: under ZeRO-3 a parameter that gets no gradient has its previous one
    applied again, so a projection whose term the curriculum switched off kept moving as if still trained."""
    z2, recs = _aux_after(make_config, tmp_path, "z2", 2)
    z3, _ = _aux_after(make_config, tmp_path, "z3", 3)
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    on = [t.step for t in trains if "feature" in t.losses]
    assert on and on == [t.step for t in trains if t.weights["feature"] > 0] and len(on) < len(trains)
    assert on == [t.step for t in trains if "contrastive" in t.losses]
    assert all({"feature", "contrastive"} <= set(e.losses) for e in evals)  # evaluation reports every component
    assert set(z2) == set(z3) and {"feature", "contrastive_teacher"} <= {k.split(".")[0] for k in z2}
    for k in z2:
        assert torch.allclose(z2[k], z3[k], rtol=1e-4, atol=1e-6), k


def test_each_system_record_carries_the_peak_of_its_own_window():
    """The system record was one RSS sample: a rank that peaked between two records never showed it."""
    import numpy as np

    from dsdistill.system import system_record

    system_record(step=0, rank=0, world=1)  # starts a window
    big = np.ones(300 * 2**20 // 8)  # 300 MiB, touched, then freed before the record
    del big
    rec = system_record(step=1, rank=0, world=1)
    assert rec is not None and rec.ranks[0].peak_rss_gib - rec.ranks[0].rss_gib > 0.25
    rec = system_record(step=2, rank=0, world=1)  # the next window did not hold it
    assert rec is not None and rec.ranks[0].peak_rss_gib - rec.ranks[0].rss_gib < 0.1


EVERY = {
    "kd": 0.9,
    "lm": 0.1,
    "feature": 0.1,
    "attention": 0.1,
    "layerwise": 0.1,
    "contrastive": 0.1,
    "routing_feature": 0.1,
    "routing_load_balance": 0.1,
    "routing_attention_alignment": 0.1,
}


def test_a_micro_batch_asks_the_device_for_nothing(make_config, tmp_path):
    """Each micro-batch used to read values back (unit counts, boolean gathers and counts in the losses, the
    finiteness check, the stop agreement: 9 on the fused KD+LM path, 16 more with every component): on a
    GPU each one stalls the host. Counted at the dispatcher around a real step of 4 micro-batches with every
    component, dsdistill's own reads are the step's few (the one reduction, the grad norm), not 4 x 25."""
    from dsdistill.syncs import SyncCounter

    cfg = validate(
        make_config(
            train={"max_steps": 3, "grad_accum": 4, "micro_batch_size": 2},
            curriculum={"weights": EVERY},
            loss={"fused_logits": True},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        batches = iter(s.data.stream)
        s.trainer.step([next(batches) for _ in range(4)], stop_requested=False)  # warm-up
        window = [next(batches) for _ in range(4)]
        with SyncCounter() as c:
            r = s.trainer.step(window, stop_requested=False)
    assert math.isfinite(r.objective) and not r.nonfinite_loss and set(r.losses) == set(EVERY)
    assert c.ours <= 4, c.by_site
