"""Resuming after a changed setting: another ZeRO stage, precision or set of components carries the
checkpoint into the new layout (weights, Adam moments, step, LR schedule, data position) and says so in one
line; nothing tells the user to delete a valid checkpoint."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dsdistill import carry, checkpoint
from dsdistill.config import validate
from dsdistill.run.loop import open_session
from dsdistill.schema import METRICS_FILE, AlertRecord, RunStart, TrainRecord, parse_line
from dsdistill.train import train
from dsdistill.trainer import EarlyStopping

ROOT = Path(__file__).resolve().parent.parent
ZERO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "bf16": {"enabled": "auto"},
}
KD_LM = {"weights": {"kd": 0.9, "lm": 0.1}}


def _records(run_dir):
    return [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _train(cfg: dict):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(validate(cfg))


def _stage(n: int) -> dict:
    return {"student": {**ZERO, "zero_optimization": {"stage": n}}}


@pytest.fixture(scope="module")
def paused(assets, tmp_path_factory):
    """(config, uninterrupted run, a run paused at step 2): ZeRO-2, fp32, the default components."""
    root = tmp_path_factory.mktemp("carry")
    cfg = {
        "teacher": {"path": str(assets["teacher"])},
        "student": {"path": str(assets["student"])},
        "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1},
        "train": {"max_steps": 4, "micro_batch_size": 4, "seq_len": 32, "precision": "fp32"},
        "optimizer": {"lr": 3e-3},
        "scheduler": {"kind": "cosine", "warmup_steps": 1},
        "eval": {"every": 0, "max_batches": 1, "at_start": False},
        "output": {"run_dir": str(root / "whole"), "log_every": 1},
        "checkpoint": {"save_final": False},
        "deepspeed": _stage(2),
    }
    _train(cfg)
    parts = {**cfg, "output": {**cfg["output"], "run_dir": str(root / "parts")}}
    assert _train({**parts, "train": {**cfg["train"], "stop_at_step": 2}}).reason == "paused"
    return cfg, root / "whole", root / "parts"


@pytest.fixture
def copy(paused, tmp_path):
    """A private copy of the paused run and its config."""
    cfg, whole, parts = paused
    dst = tmp_path / "run"
    shutil.copytree(parts, dst)
    return {**cfg, "output": {**cfg["output"], "run_dir": str(dst)}}, dst, whole


def _carried(run_dir) -> str:
    alerts = [r for r in _records(run_dir) if isinstance(r, AlertRecord) and r.code == "resume_carried"]
    assert len(alerts) == 1 and alerts[0].level == "info"
    return alerts[0].message


@pytest.mark.parametrize("target", ["zero3", "zero3_offload"])
def test_a_resume_at_another_zero_stage_continues_the_uninterrupted_run(copy, target):
    """ZeRO-2 -> ZeRO-3 (and ZeRO-3 with the optimizer and parameters offloaded, DeepSpeed's CPU Adam):
    DeepSpeed's own load ends in an AssertionError; carried, the run goes on as if nothing changed (same
    losses and LR at every later step), so the weights, both Adam moments, the optimizer's step, the LR
    schedule and the data position all came across."""
    cfg, run_dir, whole = copy
    before = {p.name: p.read_bytes() for p in (checkpoint.checkpoint_dir(run_dir) / "step2").iterdir()}
    student = _stage(3) if target == "zero3" else {"student": str(ROOT / "ds_configs" / "zero3_offload.json")}
    summary = _train({**cfg, "deepspeed": student})
    assert summary.reason == "completed" and summary.steps == 4
    note = _carried(run_dir)
    assert note.startswith("carried step2 into a new layout (ZeRO stage 2 -> 3): weights, Adam moments, step and LR schedule")
    assert "fresh" not in note and "\n" not in note
    starts = [r for r in _records(run_dir) if isinstance(r, RunStart)]
    assert [(s.resumed, s.step, s.student_zero_stage) for s in starts] == [(False, 0, 2), (True, 2, 3)]
    ref = {r.step: r for r in _records(whole) if isinstance(r, TrainRecord)}
    got = {r.step: r for r in _records(run_dir) if isinstance(r, TrainRecord)}
    assert sorted(got) == [0, 1, 2, 3]
    for step in (2, 3):
        assert got[step].lr == pytest.approx(ref[step].lr, rel=1e-12)
        for name, value in ref[step].losses.items():
            assert got[step].losses[name] == pytest.approx(value, rel=1e-6, abs=1e-8), (step, name)
    # the checkpoint it came from is untouched
    assert {p.name: p.read_bytes() for p in (checkpoint.checkpoint_dir(run_dir) / "step2").iterdir()} == before


def test_another_precision_and_stage_carry_the_weights_and_moments_exactly(copy):
    """fp32 ZeRO-2 -> bf16 ZeRO-1: the new engine's fp32 masters and moments are the checkpoint's, bit for bit."""
    cfg, run_dir, _ = copy
    saved = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.checkpoint_dir(run_dir)), tag="step2")
    new = {**cfg, "train": {**cfg["train"], "precision": "bf16"}, "deepspeed": _stage(1)}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(new)) as session:
        resumed = session.state.resume(EarlyStopping(metric="ppl", patience=None, min_delta=0.0))
        engine = session.student
        assert engine.global_steps == 2 and resumed["tag"] == "step2"
        # ZeRO-1 reads ZeRO-2's layout: only the precision moved
        assert "carried step2 into a new layout (precision fp32 -> bf16)" in resumed["carried"]
        with checkpoint.safe_unpickling():
            _, moments, step = carry._consolidated(checkpoint.checkpoint_dir(run_dir) / "step2")
        assert step == 2
        for name, p in engine.module.named_parameters():
            assert safe_get_full_fp32_param(p).equal(saved[name]), name
            for key in ("exp_avg", "exp_avg_sq"):
                assert safe_get_full_optimizer_state(p, key).equal(moments[key][name]), (name, key)
            if name.startswith("model."):  # trained in both steps (an aux module at weight 0 has zero moments)
                assert moments["exp_avg_sq"][name].abs().sum() > 0, name
            assert p.dtype == torch.bfloat16 and p.equal(saved[name].to(torch.bfloat16)), name


def test_changed_components_carry_the_student_and_start_their_modules_fresh(copy):
    """Dropping the components that own aux modules, then adding them back: the student's weights come
    across each time, the modules of a new component start fresh, and one line says which."""
    cfg, run_dir, _ = copy
    saved = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.checkpoint_dir(run_dir)), tag="step2")
    aux = sorted({".".join(k.split(".")[:2]) for k in saved if k.startswith("aux.")})
    assert aux  # the default curriculum has components with their own modules
    fewer = {**cfg, "curriculum": KD_LM, "train": {**cfg["train"], "max_steps": 3}, "checkpoint": {"save_final": True}}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(fewer)) as session:
        assert session.fit().reason == "completed"
        params = dict(session.student.module.named_parameters())
        assert not any(n.startswith("aux.") for n in params)
    note = _carried(run_dir)
    assert note.startswith("carried step2 into a new layout (components [") and "fresh" not in note
    assert sorted(part.split(" ")[0] for part in note.split("; dropped: ")[1].split(", ")) == aux
    # and back: step 3's checkpoint has no aux modules, so every one is fresh now
    again = {**cfg, "train": {**cfg["train"], "max_steps": 4}}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(again)) as session:
        assert session.fit().reason == "completed" and session.student.global_steps == 4
    notes = [r.message for r in _records(run_dir) if isinstance(r, AlertRecord) and r.code == "resume_carried"]
    assert notes[-1].startswith("carried step3 into a new layout (components [] -> [")
    fresh = notes[-1].split("; fresh: ")[1]
    assert sorted(part.split(" ")[0] for part in fresh.split(", ")) == aux
