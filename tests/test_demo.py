"""The README's first command, shortened: cached assets, real launcher, two ranks."""
from dsdistill.demo import ensure_assets, run_demo, summarize
from dsdistill.schema import METRICS_FILE


def test_demo_student_moves_toward_teacher(tmp_path, capsys):
    cache = tmp_path / "cache"
    ensure_assets(cache, teacher_steps=150, documents=1500)
    assert run_demo(run_dir=tmp_path / "demo", steps=40, nprocs=2, cache=cache) == 0
    s = summarize(tmp_path / "demo" / METRICS_FILE)
    assert s["last_ppl"] < 0.5 * s["first_ppl"]
    assert s["teacher_ppl"] < s["last_ppl"]
    first = [ln for ln in capsys.readouterr().out.splitlines() if "student eval perplexity" in ln]
    assert len(first) == 1
    # running the finished demo again resumes at its last step, trains nothing, and says the same again
    assert run_demo(run_dir=tmp_path / "demo", steps=40, nprocs=2, cache=cache) == 0
    again = [ln for ln in capsys.readouterr().out.splitlines() if "student eval perplexity" in ln]
    assert again == first
