"""Teachers behind one interface: a new kind is one file (tests/toy_teacher.py) plus one registration line,
and the run asks its capabilities, never its kind."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight
from dsdistill.schema import METRICS_FILE, EvalRecord, RunStart, TrainRecord, parse_line
from dsdistill.teachers import kinds
from dsdistill.train import train


@pytest.fixture
def uniform():
    kinds.register("uniform", "tests.toy_teacher:UniformPlan")  # adding a kind of teacher: this line
    yield
    kinds.unregister("uniform")


@pytest.mark.parametrize("fused", [True, False])
def test_a_new_kind_of_teacher_trains_through_the_real_engines(make_config, assets, uniform, fused):
    teacher = {"path": None, "kind": "uniform", "options": {"like": str(assets["teacher"])}}
    cfg = validate(
        make_config(
            teacher=teacher,
            train={"max_steps": 2},
            eval={"every": 2, "max_batches": 2, "at_start": True},
            curriculum={"weights": {"kd": 0.5, "lm": 0.5}},
            loss={"fused_logits": fused},
        )
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        summary = train(cfg)
    assert summary.reason == "completed"
    lines = (Path(cfg.output.run_dir) / METRICS_FILE).read_text().splitlines()
    recs = [parse_line(line) for line in lines]
    start = next(r for r in recs if isinstance(r, RunStart))
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    # a uniform teacher's perplexity is the vocabulary size, exactly
    vocab = len(AutoTokenizer.from_pretrained(assets["student"]))
    assert [e.step for e in evals] == [0, 2] and evals[0].teacher_ppl == pytest.approx(vocab, rel=1e-9)
    assert start.teacher_params == 0 and "uniform, no model" in out.getvalue()
    # KD against uniform at T = 1 is KL(u || q) = -log V - mean log q >= 0, finite; and the student learns
    assert all(math.isfinite(t.losses["kd"]) and t.losses["kd"] > 0 for t in trains)


def test_what_a_kind_cannot_supply_is_refused_in_one_line(make_config, assets, uniform):
    teacher = {"path": None, "kind": "uniform", "options": {"like": str(assets["teacher"])}}
    with pytest.raises(DistillError) as err:
        preflight(validate(make_config(teacher=teacher, curriculum={"weights": {"kd": 1.0, "feature": 0.1}})), world=1)
    assert str(err.value).startswith(
        "teacher.kind: feature need the teacher's hidden states or attention, which a uniform teacher does not hold"
    )
    with pytest.raises(DistillError, match=r"^teacher.options.like: required field is missing$"):
        validate(make_config(teacher={"path": None, "kind": "uniform"}))
    with pytest.raises(
        DistillError, match=r"^teacher.kind: unknown teacher kind 'server'; expected one of: path, cache, url, uniform$"
    ):
        validate(make_config(teacher={"path": None, "kind": "server"}))
