"""The README's first command, shortened: cached assets, real launcher, two ranks, and its control run."""

from pathlib import Path

import pytest

from dsdistill.demo import demo_config, ensure_assets, no_teacher_config, run_demo, summarize
from dsdistill.schema import METRICS_FILE


def test_the_control_run_differs_from_the_demo_only_in_its_curriculum_and_directory(tmp_path):
    paths = {k: tmp_path / k for k in ("corpus", "teacher", "student")}
    demo = demo_config(paths, tmp_path / "demo", steps=300, seed=7)
    alone = no_teacher_config(demo)
    assert alone["curriculum"] == {"weights": {"lm": 1.0}} and "curriculum" not in demo  # the demo runs the default
    assert alone["output"]["run_dir"] == str(tmp_path / "demo-no-teacher")
    same = {k: v for k, v in demo.items() if k != "output"}
    assert {k: v for k, v in alone.items() if k not in ("output", "curriculum")} == same  # data, seed, steps, LR, models
    assert {k: v for k, v in alone["output"].items() if k != "run_dir"} == {
        k: v for k, v in demo["output"].items() if k != "run_dir"
    }


@pytest.mark.slow
def test_demo_student_moves_toward_teacher_and_reports_the_control(tmp_path, capsys):
    cache = tmp_path / "cache"
    ensure_assets(cache, teacher_steps=60, documents=1500)
    assert run_demo(run_dir=tmp_path / "demo", steps=20, nprocs=2, cache=cache) == 0
    s = summarize(tmp_path / "demo" / METRICS_FILE)
    alone = summarize(tmp_path / "demo-no-teacher" / METRICS_FILE)
    assert s["last_ppl"] < 0.5 * s["first_ppl"] and alone["last_ppl"] < 0.5 * alone["first_ppl"]
    assert s["teacher_ppl"] == alone["teacher_ppl"]  # the same teacher, the same eval split
    out = capsys.readouterr().out
    first = [ln for ln in out.splitlines() if ln.startswith("demo: eval perplexity: teacher ")]
    assert len(first) == 1
    assert f"distilled student {s['last_ppl']:.2f}, same student without the teacher {alone['last_ppl']:.2f}" in first[0]
    # running the finished demo again launches nothing and says the same
    assert run_demo(run_dir=tmp_path / "demo", steps=20, nprocs=2, cache=cache) == 0
    out = capsys.readouterr().out
    again = [ln for ln in out.splitlines() if ln.startswith("demo: eval perplexity: teacher ")]
    assert again == first and out.count("already completed this config's 20 steps; not launched again") == 2
    assert "deepspeed" not in out  # no launch line
    assert Path(tmp_path / "demo-no-teacher" / "run.yaml").exists()
