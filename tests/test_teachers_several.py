"""Several teachers (`teachers:`): KD against each by its share, on the fused and the full-logit paths. The
objective equals the share-weighted sum of single-teacher runs' on the same batches, each teacher's own KD and
perplexity reach the records and the dashboard, and every check names the teacher (`teachers.i`) it is about."""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path

import pytest
import torch

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight
from dsdistill.schema import METRICS_FILE, EvalRecord, RunStart, TrainRecord, parse_line
from dsdistill.train import open_session

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def second_teacher(assets, tmp_path_factory):
    """A teacher of another family (Qwen2) for the same tokenizer, saved as a user's would be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    root = tmp_path_factory.mktemp("qwen_teacher")
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _several(make_config, assets, second_teacher, **sections):
    sections.setdefault("curriculum", {"weights": {"kd": 0.9, "lm": 0.1}})  # logits only: no layer of one teacher
    return make_config(
        teacher=None,
        teachers=[
            {"name": "llama", "path": str(assets["teacher"]), "weight": 3.0},
            {"name": "qwen", "path": str(second_teacher), "weight": 1.0},
        ],
        **sections,
    )


def _first_step(cfg: dict):
    """One optimizer step on the run's first window; (result, the student's parameters after it)."""
    run = validate(cfg)
    with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
        window = [next(iter(s.data.stream)) for _ in range(run.train.grad_accum)]
        r = s.trainer.step(window, stop_requested=False)
        return r, [p.detach().clone() for p in s.student.module.model.parameters()]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full-logits"])
def test_the_objective_is_the_share_weighted_sum_of_single_teacher_runs(make_config, assets, second_teacher, fused):
    sections = {
        "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "seq_len": 32, "precision": "fp32"},
        "curriculum": {"weights": {"kd": 0.7, "lm": 0.3}, "temperature": 2.0},
        "loss": {"fused_logits": fused},
    }
    mixed, after_mixed = _first_step(_several(make_config, assets, second_teacher, **copy.deepcopy(sections)))
    alone = {
        name: _first_step(make_config(teacher={"path": str(path)}, **copy.deepcopy(sections)))[0]
        for name, path in (("llama", assets["teacher"]), ("qwen", second_teacher))
    }
    share = {"llama": 0.75, "qwen": 0.25}
    assert mixed.losses["kd"] == pytest.approx(sum(share[n] * alone[n].losses["kd"] for n in share), rel=1e-5)
    assert mixed.objective == pytest.approx(sum(share[n] * alone[n].objective for n in share), rel=1e-5)
    assert mixed.losses["lm"] == pytest.approx(alone["llama"].losses["lm"], rel=1e-6)
    for n in share:  # each teacher's own KD, as its single-teacher run measures it
        assert mixed.metrics[f"kd.{n}"] == pytest.approx(alone[n].losses["kd"], rel=1e-5)
    assert alone["llama"].losses["kd"] != pytest.approx(alone["qwen"].losses["kd"], rel=1e-2)  # they do differ
    if fused:  # the fused head's gradient is full-logit autograd's: the same update
        _, after_full = _first_step(
            _several(make_config, assets, second_teacher, **{**copy.deepcopy(sections), "loss": {"fused_logits": False}})
        )
        for a, b in zip(after_mixed, after_full):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_each_teachers_kd_and_perplexity_reach_the_records_and_the_dashboard(make_config, assets, second_teacher):
    from tests.test_trainer_core import _monitor_plots

    cfg = _several(
        make_config,
        assets,
        second_teacher,
        train={"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "seq_len": 32, "precision": "fp32"},
        eval={"every": 2, "max_batches": 2, "at_start": True},
    )
    run = validate(cfg)
    with contextlib.redirect_stdout(io.StringIO()) as out, open_session(run) as s:
        s.fit()
    recs = [parse_line(line) for line in (s.plan.run_dir / METRICS_FILE).read_text().splitlines()]
    start = next(r for r in recs if isinstance(r, RunStart))
    assert start.kd["teachers"] == {"llama": {"share": 0.75}, "qwen": {"share": 0.25}}
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert all(set(t.metrics) >= {"kd.llama", "kd.qwen"} for t in trains)
    for t in trains:
        assert t.losses["kd"] == pytest.approx(0.75 * t.metrics["kd.llama"] + 0.25 * t.metrics["kd.qwen"], rel=1e-5)
    first = next(r for r in recs if isinstance(r, EvalRecord))
    ppls = first.teacher_ppls
    assert set(ppls) == {"llama", "qwen"} and ppls["llama"] < ppls["qwen"]  # the pretrained one knows the corpus
    assert first.teacher_ppl == pytest.approx(math.exp(0.75 * math.log(ppls["llama"]) + 0.25 * math.log(ppls["qwen"])))
    # each one's perplexity is what a run with it alone measures
    single = validate(make_config(teacher={"path": str(assets["teacher"])}, eval={"every": 2, "max_batches": 2}))
    with contextlib.redirect_stdout(io.StringIO()), open_session(single) as s1:
        alone = s1.evaluator.teacher_perplexity(s1.eval_batches())
    assert ppls["llama"] == pytest.approx(alone, rel=1e-6)
    assert "teacher llama" in out.getvalue() and "teacher qwen" in out.getvalue()
    assert {"metric/kd.llama", "metric/kd.qwen"} <= _monitor_plots(s.plan.run_dir)
    llama, qwen = (f"{ppls[n]:.4g}"[:4] for n in ("llama", "qwen"))
    for size in ((80, 24), (200, 60)):
        screens = _dashboard_text(s.plan.run_dir, size)
        assert "teachers llama " + llama in screens["eval"] and "qwen " + qwen in screens["eval"]
        assert f"teacher llama  {ppls['llama']:.4g}" in screens["stats"] and "teacher qwen" in screens["stats"]


def _dashboard_text(run_dir, size) -> dict[str, str]:
    """The real dashboard's eval and stats views, as text, at a terminal size."""
    import asyncio

    from dsmonitor.app import DsMonitor

    app = DsMonitor([str(run_dir)], poll_interval=0.02, refresh_interval=0.05)

    async def main():
        out = {}
        async with app.run_test(size=size) as pilot:
            for _ in range(6000):  # a generous outer limit (5 minutes): the file is complete before it opens
                if app.runs[0].end is not None and not app.catching_up:
                    break
                await pilot.pause(0.05)
            for view in ("eval", "stats"):
                for _ in range(10):  # `v` until the view is on screen alone, as a user gets there
                    if app.shown == view:
                        break
                    await pilot.press("v")
                await pilot.pause(0.3)
                out[view] = app.screen_text()
        return out

    return asyncio.run(main())


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            lambda c, a, q: c.update(teacher={"path": str(a["teacher"])}),
            "teacher: set teacher (one teacher) or teachers (a list of named teachers), exactly one",
        ),
        (lambda c, a, q: c["teachers"][1].update(name="llama"), "teachers: names must differ; got llama, llama"),
        (lambda c, a, q: c["teachers"][1].update(path=str(a["corpus"])), "teachers.1.path"),
        (
            lambda c, a, q: c["curriculum"]["weights"].update(feature=0.5),
            "teachers: feature need the teacher's hidden states or attention, which a mixture of teachers does not hold",
        ),
        (
            lambda c, a, q: c["teachers"][1].update(path=None, url="http://127.0.0.1:9"),
            "teachers.1.url: cannot reach http://127.0.0.1:9",
        ),
    ],
    ids=["both-keys", "same-name", "not-a-model", "feature", "server-down"],
)
def test_checks_name_the_teacher_they_are_about(make_config, assets, second_teacher, change, expected):
    cfg = _several(make_config, assets, second_teacher, curriculum={"weights": {"kd": 1.0, "lm": 0.5}})
    change(cfg, assets, second_teacher)
    with pytest.raises(DistillError) as e:
        preflight(validate(cfg), world=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(expected), msg


def test_one_teacher_commands_refuse_a_list_of_teachers(make_config, assets, second_teacher, tmp_path, capsys):
    import yaml

    from dsdistill.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_several(make_config, assets, second_teacher)))
    for command in ("teacher-serve", "teacher-cache"):
        args = ["--port", "0"] if command == "teacher-serve" else ["--out", str(tmp_path / "cache")]
        assert main([command, "--config", str(path), *args]) != 0  # the CLI's own entry, in this process
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"dsdistill: error: {command}: runs one teacher; give it as teacher: (the config lists teachers:)"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "full-logits"])
def test_sources_routed_to_teachers_take_kd_from_their_own(make_config, assets, second_teacher, tmp_path, fused):
    """`data.sources[i].teacher`: every token of a routed source is distilled from its teacher alone, an
    unrouted source's from every teacher by its share. The eval KD is what single-teacher runs measure on
    each source's own rows, weighted by their tokens; each teacher's own KD is over the tokens it scored."""
    from dsdistill.demo import write_corpus

    other = write_corpus(tmp_path / "other.jsonl", documents=300, seed=11)
    sources = [
        {"path": str(assets["corpus"]), "name": "web", "teacher": "llama"},
        {"path": str(other), "name": "books"},
    ]

    def cfg(routed=True, **over):
        plain = [{k: v for k, v in src.items() if routed or k != "teacher"} for src in sources]
        base = {
            "data": {"path": None, "sources": plain, "eval_fraction": 0.1},
            "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "seq_len": 32, "precision": "fp32"},
            "curriculum": {"weights": {"kd": 0.7, "lm": 0.3}, "temperature": 2.0},
            "eval": {"every": 0, "max_batches": 50, "at_start": False},
            "loss": {"fused_logits": fused},
        }
        return {**base, **over}

    def per_source(config) -> dict:
        run = validate(config)
        with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
            whole = s.evaluate(step=0)
            parts = {n: s.evaluator.evaluate(s.eval_batches(rows), step=0) for n, rows in s.data.splits.eval_by_source.items()}
            batch = next(iter(s.data.stream))
            step = s.trainer.step([batch], stop_requested=False)  # the training stream carries the routes too
        return {"whole": whole, **parts, "batch": batch, "step": step}

    routed = per_source(_several(make_config, assets, second_teacher, **cfg()))
    alone = {
        name: per_source(make_config(teacher={"path": str(path)}, **cfg(False, output={"run_dir": str(tmp_path / name)})))
        for name, path in (("llama", assets["teacher"]), ("qwen", second_teacher))
    }
    web, books = routed["web"].tokens, routed["books"].tokens
    assert set(routed["batch"]["route"].unique().tolist()) <= {-1, 0} and "route" not in alone["llama"]["batch"]
    step = routed["step"]  # a training step's own KD per teacher: llama over every token, qwen over the books'
    assert step.metrics["kd.llama"] > 0 and step.metrics["kd.qwen"] >= 0 and math.isfinite(step.losses["kd"])
    # web: llama alone; books: 0.75 llama + 0.25 qwen
    books_kd = 0.75 * alone["llama"]["books"].losses["kd"] + 0.25 * alone["qwen"]["books"].losses["kd"]
    assert routed["web"].losses["kd"] == pytest.approx(alone["llama"]["web"].losses["kd"], rel=1e-5)
    assert routed["books"].losses["kd"] == pytest.approx(books_kd, rel=1e-5)
    expected = (alone["llama"]["web"].losses["kd"] * web + books_kd * books) / (web + books)
    assert routed["whole"].losses["kd"] == pytest.approx(expected, rel=1e-5)
    # each teacher's own KD, over the tokens it scored: llama all of them, qwen the books'
    llama_own = (alone["llama"]["web"].losses["kd"] * web + alone["llama"]["books"].losses["kd"] * books) / (web + books)
    assert routed["whole"].metrics["kd.llama"] == pytest.approx(llama_own, rel=1e-5)
    assert routed["whole"].metrics["kd.qwen"] == pytest.approx(alone["qwen"]["books"].losses["kd"], rel=1e-5)
    assert routed["whole"].losses["lm"] == pytest.approx(alone["llama"]["whole"].losses["lm"], rel=1e-6)


def test_a_source_routed_to_an_unknown_teacher_is_one_line(make_config, assets, second_teacher):
    cfg = _several(make_config, assets, second_teacher)
    cfg["data"] = {"sources": [{"path": str(assets["corpus"]), "teacher": "mistral"}], "eval_fraction": 0.1}
    with pytest.raises(
        DistillError, match=r"^data.sources.0.teacher: got 'mistral'; expected one of the teachers' names \(llama, qwen\)$"
    ):
        validate(cfg)
    one = make_config(data={"path": None, "sources": [{"path": str(assets["corpus"]), "teacher": "llama"}], "eval_fraction": 0.1})
    with pytest.raises(DistillError, match=r"^data.sources.0.teacher: got 'llama'; expected the name of one of `teachers:`$"):
        validate(one)


@pytest.mark.slow
def test_two_teachers_under_zero3_on_two_ranks_through_the_launcher(make_config, assets, second_teacher, tmp_path):
    """Two live teachers, each its own ZeRO-3 engine over the same 2 ranks, with a ZeRO-3 student, launched as
    users launch: the run completes and records each teacher's KD and perplexity."""
    import subprocess

    import yaml

    from dsdistill.demo import launcher_command, launcher_env
    from dsdistill.dist import free_port

    cfg = _several(
        make_config,
        assets,
        second_teacher,
        train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 2, "seq_len": 32, "precision": "fp32"},
        eval={"every": 2, "max_batches": 2, "at_start": False},
        deepspeed={"student": str(ROOT / "ds_configs" / "zero3.json")},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = launcher_command(ROOT / "dsdistill" / "train.py", path, nprocs=2, master_port=free_port())
    proc = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [parse_line(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    start = next(r for r in recs if isinstance(r, RunStart))
    assert start.world_size == 2 and start.teacher_placement == ["zero3", "zero3"]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert [t.step for t in trains] == [0, 1] and all(set(t.metrics) >= {"kd.llama", "kd.qwen"} for t in trains)
    final = [r for r in recs if isinstance(r, EvalRecord)][-1]
    assert set(final.teacher_ppls) == {"llama", "qwen"}
