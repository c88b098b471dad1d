"""The monitor's pure layers: tailing, state, smoothing, downsampling, alerts, one-shot output."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsdistill.schema import dumps
from dsmonitor.alerts import AlertRules, evaluate_alerts
from dsmonitor.app import load_states, summary_json, summary_text
from dsmonitor.series_math import debiased_ema, minmax_indices
from dsmonitor.state import RunState, summary
from dsmonitor.tail import Tailer
from tests.streams import STREAM_CURRICULUM, T0, healthy_records, write

DSMONITOR = os.path.join(os.path.dirname(sys.executable), "dsmonitor")
"""The installed console script, as a user runs it."""


def state_of(records):
    s = RunState("r")
    for r in records:
        s.add(r)
    return s


def test_tailer_partial_lines_corrupt_truncation_and_rotation(tmp_path):
    path = tmp_path / "metrics.jsonl"
    t = Tailer(tmp_path)
    assert t.poll().missing
    recs = healthy_records(6, eval_every=3)
    lines = [dumps(r) for r in recs]
    with open(path, "w") as fh:
        fh.write(lines[0] + "\n" + lines[1][:25])  # a partial second line
    res = t.poll()
    assert [r.kind for r in res.records] == ["run_start"] and t.partial
    with open(path, "a") as fh:
        fh.write(lines[1][25:] + "\n{not json\n" + "\x00\xff garbage\n" + '{"kind": "train"}\n' + lines[2] + "\n")
    res = t.poll()
    assert [r.kind for r in res.records] == ["train", "train"] and res.corrupt == 3 and t.corrupt_total == 3
    with open(path, "w") as fh:  # truncated and rewritten shorter
        fh.write(lines[0] + "\n")
    res = t.poll()
    assert res.restarted == "truncated" and [r.kind for r in res.records] == ["run_start"]
    rotated = tmp_path / "new.jsonl"
    rotated.write_text(lines[0] + "\n" + lines[1] + "\n")
    os.replace(rotated, path)  # a new inode under the same name
    res = t.poll()
    assert res.restarted == "rotated" and len(res.records) == 2


def test_tailer_reads_in_bounded_chunks(tmp_path):
    path = write(tmp_path / "metrics.jsonl", healthy_records(50))
    t = Tailer(path, chunk=257)
    first = t.poll(max_bytes=1000)
    assert 0 < t.offset <= 1028 and len(first.records) < 5
    rest = t.poll()
    assert len(first.records) + len(rest.records) == len(healthy_records(50)) and first.corrupt + rest.corrupt == 0


def test_debiased_ema_is_tensorboards():
    values = [1.0, 3.0, float("nan"), 2.0, 5.0]
    w = 0.6
    expected, last, n = [], 0.0, 0
    for v in values:  # TensorBoard's smoothing, written out
        if math.isnan(v):
            expected.append(v)
            continue
        last = last * w + (1 - w) * v
        n += 1
        expected.append(last / (1 - w**n))
    got = debiased_ema(values, w)
    assert got[0] == 1.0  # debiased: the first point is not pulled toward zero
    assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b) for a, b in zip(got, expected))
    assert debiased_ema(values[:2], 0.0) == values[:2]


def test_minmax_downsampling_keeps_spikes():
    ys = [1.0] * 10_000
    ys[4321] = 99.0
    ys[777] = -5.0
    keep = minmax_indices(ys, 50)
    assert len(keep) <= 100 and 4321 in keep and 777 in keep and keep == sorted(keep)


def test_state_series_segments_and_eta():
    recs = healthy_records(20, eval_every=5, end=False)
    restart = healthy_records(20, eval_every=5, end=False, t0=T0 + 100)[1:6]  # steps go back to 0
    s = state_of(recs + restart)
    obj = s.train["objective"]
    assert obj.segment[19] == 0 and obj.segment[20] == 1  # the line breaks where steps went backwards
    assert s.components == ["kd", "lm"]
    assert s.eval["ppl"].value[-1] == pytest.approx(math.exp(s.last_eval.lm_ce))
    from dsdistill.curriculum import Curriculum

    rebuilt = s.schedule()
    assert rebuilt.weights_at(step=7, total_steps=20) == Curriculum(STREAM_CURRICULUM).weights_at(step=7, total_steps=20)
    half = state_of([r for r in recs if r.kind == "run_start" or (r.kind == "train" and r.step < 10)])
    assert half.current_step == 10 and half.progress() == 0.5
    assert half.eta_seconds() == pytest.approx(10 * 2.0)  # 2 s per step in the crafted stream


def test_alerts_fire_on_crafted_streams_and_stay_silent_when_healthy():
    rules = AlertRules(stall_seconds=60)
    healthy = state_of(healthy_records(40))
    assert [a for a in evaluate_alerts(healthy, rules, now=T0 + 10_000) if a.level != "info"] == []

    def codes(recs, now=T0 + 100):
        return {a.code for a in evaluate_alerts(state_of(recs), rules, now=now)}

    assert "eval_identical" in codes(healthy_records(40, identical_evals=True))
    assert "nan" in codes(healthy_records(40, nan_at=17))
    assert "lr_zero" in codes(healthy_records(40, zero_lr_at=30))
    assert "spike" in codes(healthy_records(40, spike_at=39))
    recs = healthy_records(40, end=False)
    stalled, last = state_of(recs), recs[-1].time  # liveness counts from the newest record's own time
    assert "stalled" in {a.code for a in evaluate_alerts(stalled, rules, now=last + 61)}
    # a record every 2 s: ten median intervals (20 s) is under the 30 s floor, so 30 s, sooner than --stall 60
    assert "stalled" in {a.code for a in evaluate_alerts(stalled, rules, now=last + 31)}
    assert "stalled" not in {a.code for a in evaluate_alerts(stalled, rules, now=last + 29)}
    slow = AlertRules(stall_seconds=20)  # a --stall below the run's own pace wins
    assert "stalled" in {a.code for a in evaluate_alerts(stalled, slow, now=last + 21)}
    gap = healthy_records(40)
    for r in gap:
        if r.kind == "eval":
            r.objective *= 3
    assert "train_eval_gap" in codes(gap)


def test_once_and_json(tmp_path):
    write(tmp_path / "run" / "metrics.jsonl", healthy_records(30, nan_at=29))
    (tmp_path / "run" / "metrics.jsonl").open("a").write("garbage line\n")
    states = load_states([str(tmp_path / "run")])
    text = summary_text(states, AlertRules())
    assert "run run: step 30/30 (100.0%), 35 records, 1 corrupt, ended: completed" in text
    assert "ERROR nan: non-finite train" in text
    (data,) = json.loads(summary_json(states, AlertRules()))  # a list, one entry per run, even for one
    assert data["step"] == 30 and data["eval"]["teacher_ppl"] == 2.5 and data["corrupt_lines"] == 1
    assert any(a["code"] == "nan" for a in data["alerts"])
    proc = subprocess.run([DSMONITOR, str(tmp_path / "run"), "--once"], capture_output=True, text=True)
    assert proc.returncode == 1 and "ERROR nan" in proc.stdout  # an ERROR alert fails a CI step
    proc = subprocess.run([DSMONITOR, str(tmp_path / "nope")], capture_output=True, text=True)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == f"dsmonitor: error: '{tmp_path / 'nope'}' does not exist; expected a run directory or a metrics.jsonl file"
    )


def test_ingest_benchmark_script_runs():
    """Smoke test of the benchmark (no timing assertion: speed is reported by the script, not tested)."""
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "monitor_ingest.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--records", "3000", "--follow-seconds", "2"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["records"] >= 3000 and out["ingest_vs_baseline"] > 0 and out["dashboard_peak_rss_mib"] > 0
    assert out["latest_step_on_screen_s"] <= out["whole_history_drawn_s"] and out["ui_longest_stall_during_load_ms"] >= 0
    assert 0 < out["following_share_of_a_core"] < 2


# ------------------------------------------------------------------ regressions from real use


def test_the_newest_point_is_always_drawn():
    ys = [float(i % 7) for i in range(100_001)]
    keep = minmax_indices(ys, 50)
    assert keep[0] == 0 and keep[-1] == 100_000 and len(keep) <= 2 * 50 + 2


def test_the_window_clips_eval_points_to_the_train_window():
    from dsmonitor.view import ViewOptions, series_trace, view_bounds

    s = state_of(healthy_records(40))
    opts = ViewOptions(window=10, smoothing=0.0)
    bounds = view_bounds(s.train["raw/kd"], opts)
    assert bounds == (30, math.inf)
    (trace,) = series_trace(s.eval["raw/kd"], opts, "white", 60, "eval", points_only=True, bounds=bounds)
    assert trace.xs and min(trace.xs) >= 30  # step 0's eval point no longer stretches the axis
    zoomed = ViewOptions(zoom=(0.5, 1.0), smoothing=0.0)
    (trace,) = series_trace(s.train["raw/kd"], zoomed, "white", 60, "kd", bounds=view_bounds(s.train["raw/kd"], zoomed))
    assert min(trace.xs) >= 19.5 and max(trace.xs) == 39  # zoomed into the newer half


def test_run_names_and_paths_whatever_they_look_like(tmp_path):
    from dsmonitor.tail import metrics_path, run_name

    dotted = tmp_path / "qwen2.5-lr3e-4"
    write(dotted / "metrics.jsonl", healthy_records(3))
    assert run_name(dotted) == "qwen2.5-lr3e-4" and run_name(dotted / "metrics.jsonl") == "qwen2.5-lr3e-4"
    plain = tmp_path / "stream"  # a metrics file without a suffix
    plain.write_bytes((dotted / "metrics.jsonl").read_bytes())
    assert metrics_path(plain) == plain and len(Tailer(plain).poll().records) == 5
    proc = subprocess.run([DSMONITOR, str(plain), "--once"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "run tmp" not in proc.stdout


def test_a_resumed_run_continues_its_time_axis_and_eta_uses_the_new_pace():
    first = healthy_records(20, end=False)
    trains = [r for r in first if r.kind == "train"]
    pace = trains[-1].time - trains[-2].time
    restart_at = first[-1].time + 3600  # resumed an hour later, from step 20
    resumed = healthy_records(40, end=False, t0=restart_at - 20 * pace)
    resumed[0].time = restart_at
    resumed[0].resumed = True  # what the trainer writes when it continues from a checkpoint
    s = state_of(first + [resumed[0]] + [r for r in resumed[1:] if 20 <= getattr(r, "step", 0) < 30])
    times = s.train_x.time
    assert all(b >= a for a, b in zip(times, times[1:]))  # no restart at 0 drawn over the earlier curve
    assert times[-1] - times[0] < 3600  # the hour between the runs is not training time
    assert s.current_step == 30 and s.eta_seconds() == pytest.approx(10 * pace, rel=1e-6)


def test_a_file_replaced_in_place_within_one_poll_is_read_anew(tmp_path):
    path = write(tmp_path / "metrics.jsonl", healthy_records(5))
    tailer = Tailer(path)
    assert len(tailer.poll().records) == 7
    other = healthy_records(8, t0=T0 + 999)
    with open(path, "r+", encoding="utf-8") as fh:  # same inode, at least as long, other contents
        fh.seek(0)
        fh.truncate()
        fh.write("".join(dumps(r) + "\n" for r in other))
    res = tailer.poll()
    assert res.restarted == "replaced" and len(res.records) == len(other) and res.records[0].time == T0 + 999


def test_records_of_unknown_kinds_are_skipped_not_corrupt(tmp_path):
    path = write(tmp_path / "metrics.jsonl", healthy_records(3))
    with open(path, "a") as fh:
        fh.write(
            '{"kind": "from_a_newer_trainer", "step": 3, "time": 1.0, "gpus": []}\n{"kind": "train", "step": "x"}\nnot json\n'
        )
    res = Tailer(path).poll()
    assert res.unknown == 1 and res.corrupt == 2 and len(res.records) == 5


def test_an_absurd_record_time_does_not_break_the_axes():
    recs = healthy_records(10)
    recs[5].time = 1e308
    s = state_of(recs)
    assert all(math.isfinite(t) and t < 1e6 for t in s.train_x.time)


def test_once_output_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    write(tmp_path / "run" / "metrics.jsonl", healthy_records(200))
    proc = subprocess.run(f"'{DSMONITOR}' '{tmp_path / 'run'}' --json | head -c 10", shell=True, capture_output=True, text=True)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_block_extremes_keep_what_a_plot_of_the_whole_history_needs():
    import numpy as np

    from dsmonitor.series_math import BlockMinMax

    v = np.random.default_rng(0).random(200_000)
    v[5_000], v[123_456], v[-1] = np.nan, 50.0, -3.0
    blocks = BlockMinMax()
    blocks.candidates(v[:70_000])  # grown in steps, as a followed run is
    cand = blocks.candidates(v)
    assert len(cand) <= 2 * (200_000 // 1024) + 1024 + 2  # two per block, the open block, the first, a break
    keep = cand[minmax_indices(v[cand], 60)]
    assert {0, 5_000, 123_456, 199_999} <= set(keep.tolist())  # first, a break, the spike, the newest
    # each 1,024-point block's extremes are among the candidates
    for b in range(0, 199_000, 1024 * 37):
        block = v[b : b + 1024]
        if np.isfinite(block).all():
            assert b + int(block.argmax()) in set(cand.tolist()) and b + int(block.argmin()) in set(cand.tolist())


def test_a_file_rewritten_in_place_with_the_same_start_is_read_anew(tmp_path):
    """The audit's case: the same first 256 bytes (a long run_start) and a larger size lost 3 of 6 new
    records; samples of the whole region read so far notice the rewrite."""
    recs = healthy_records(6)
    path = write(tmp_path / "metrics.jsonl", recs[:4])
    tailer = Tailer(path)
    first = tailer.poll().records
    assert len(first) == 4
    changed = [recs[0]] + [r.model_copy(update={"time": r.time + 0.5}) for r in recs[1:]]  # same start, new bodies
    with open(path, "r+", encoding="utf-8") as fh:  # same inode, larger, the first record unchanged
        fh.seek(0)
        fh.write("".join(dumps(r) + "\n" for r in changed))
    assert Path(path).read_bytes()[:256] == "".join(dumps(r) + "\n" for r in recs[:4]).encode()[:256]
    res = tailer.poll()
    assert res.restarted == "replaced" and len(res.records) == len(changed)
    assert [r.time for r in res.records] == [r.time for r in changed]


def test_a_fresh_run_in_the_same_directory_replaces_the_dead_one_in_view(tmp_path):
    """The audit's case: a run died at step 9, a fresh run (not a resume) started in the same directory. The
    CSV went 4, 9, 4, 9, trends and minima came from the dead run, the header showed its step."""
    import io

    from dsmonitor.export import write_csv

    dead = healthy_records(12, end=False)
    fresh = healthy_records(10, end=False, t0=dead[-1].time + 60)
    s = state_of(dead + fresh)
    assert s.earlier_runs == 1 and s.current_step == 10 and s.start is fresh[0]
    assert list(s.train_x.step) == list(range(10))
    assert s.train["raw/kd"].finite_min() == min(r.losses["kd"] for r in fresh if r.kind == "train")
    out = io.StringIO()
    write_csv([s], out)
    rows = [line.split(",") for line in out.getvalue().splitlines()[1:]]
    assert [int(r[2]) for r in rows if r[1] == "train"] == list(range(10))  # not 4, 9, 4, 9
    assert [int(r[2]) for r in rows if r[1] == "eval"] == [10]  # the eval series is in the CSV too
    assert summary(s)["earlier_runs"] == 1
