"""`teacher.placement`: a teacher model sharded by ZeRO-3 over the ranks or replicated whole on each. Both give
the same numbers; `auto` replicates a teacher that fits a stated share of one GPU; check, run_start and the
memory estimate say which it is."""

from __future__ import annotations

import contextlib
import io

import pytest

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.preflight import describe, estimate_memory, preflight
from dsdistill.schema import METRICS_FILE, RunStart, parse_line
from dsdistill.teachers.live import choose_placement
from dsdistill.train import open_session

GB = 1 << 30


def test_auto_replicates_a_teacher_that_fits_its_share_of_one_gpu():
    assert choose_placement("auto", weight_bytes=15 * GB, device_bytes=80 * GB, share=0.25) == "replicated"  # 7B bf16
    assert choose_placement("auto", weight_bytes=141 * GB, device_bytes=80 * GB, share=0.25) == "zero3"  # 70B bf16
    assert choose_placement("auto", weight_bytes=1 * GB, device_bytes=None, share=0.25) == "zero3"  # a CPU
    assert choose_placement("replicated", weight_bytes=141 * GB, device_bytes=80 * GB, share=0.25) == "replicated"
    assert choose_placement("zero3", weight_bytes=1, device_bytes=80 * GB, share=0.25) == "zero3"


def test_a_replicated_teacher_gives_the_sharded_ones_numbers(make_config, tmp_path):
    results = {}
    for placement in ("zero3", "replicated"):
        cfg = make_config(
            teacher={"path": make_config()["teacher"]["path"], "placement": placement},
            curriculum={"weights": {"kd": 0.7, "lm": 0.3, "feature": 0.2}, "temperature": 2.0},
            output={"run_dir": str(tmp_path / placement), "log_every": 1},
            eval={"every": 2, "max_batches": 2, "at_start": True},
            train={"max_steps": 2},
        )
        run = validate(cfg)
        plan, data = preflight(run, world=1)
        said = describe(plan, data)
        with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
            s.fit()
            where = s.teacher.where()
        recs = [parse_line(line) for line in (tmp_path / placement / METRICS_FILE).read_text().splitlines()]
        start = next(r for r in recs if isinstance(r, RunStart))
        results[placement] = (where, start.teacher_placement, said, estimate_memory(plan)["teacher_shard"], recs)
    assert results["zero3"][:2] == ("ZeRO-3", ["zero3"]) and results["replicated"][:2] == ("replicated", ["replicated"])
    assert ", ZeRO-3, frozen" in results["zero3"][2] and ", replicated on each rank, frozen" in results["replicated"][2]
    assert results["replicated"][3] == pytest.approx(results["zero3"][3])  # world 1: the whole model either way
    numbers = {
        p: [(getattr(r, "kind", None), getattr(r, "losses", None), getattr(r, "teacher_ppl", None)) for r in recs[1:]]
        for p, (*_, recs) in results.items()
    }
    for a, b in zip(numbers["zero3"], numbers["replicated"]):
        assert a[0] == b[0]
        if a[1] is not None:
            assert b[1] == pytest.approx(a[1], rel=1e-6)
        if a[2] is not None:
            assert b[2] == pytest.approx(a[2], rel=1e-6)


def test_placement_is_for_a_teacher_model_this_job_loads(make_config, tmp_path):
    cfg = make_config(teacher={"path": None, "url": "http://127.0.0.1:9", "placement": "replicated"})
    with pytest.raises(DistillError) as e:
        validate(cfg)
    msg = str(e.value)
    assert (
        "\n" not in msg
        and msg == "teacher.placement: replicated places a model this job loads (teacher.path); this teacher has none"
    ), msg
