"""The real Textual app, driven by App.run_test() and Pilot."""

import asyncio
import contextlib
import io
import os
import re
import threading
import time
from pathlib import Path

import pytest

from dsdistill import registry
from dsdistill.config import validate
from dsdistill.schema import METRICS_FILE, dumps
from dsdistill.train import train
from dsmonitor.app import DsMonitor
from dsmonitor.fmt import fmt as _fmt
from dsmonitor.panels import DrawContext, Panel
from dsmonitor.panels.plot import PlotPanel
from dsmonitor.widgets import HelpScreen
from tests.streams import T0, healthy_records, write

SNAPSHOTS = Path(__file__).with_name("snapshots")


def run_app(app, scenario, size=(120, 40)):
    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def wait_for(pilot, cond, timeout=15.0):
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await pilot.pause(0.05)
    await pilot.pause(0.15)


def text_of(widget) -> str:
    return str(widget.render()) if not hasattr(widget.render(), "plain") else widget.render().plain


@pytest.fixture(scope="module")
def real_run(assets, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("monitored") / "run"
    cfg = validate(
        {
            "teacher": {"path": str(assets["teacher"])},
            "student": {"path": str(assets["student"])},
            "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1},
            "train": {"max_steps": 8, "micro_batch_size": 4, "seq_len": 32, "precision": "fp32"},
            "optimizer": {"lr": 3e-3},
            "eval": {"every": 4, "max_batches": 1},
            "output": {"run_dir": str(run_dir), "log_every": 1},
            "checkpoint": {"save_final": False},
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return run_dir


def test_follows_a_real_run(real_run):
    app = DsMonitor([str(real_run)], poll_interval=0.05, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        run = app.runs[0]
        assert len(run.train["objective"]) == 8 and len(run.evals) == 3
        # every component of the default curriculum, then the diagnostics components declare (KD's kd_kl)
        assert set(app._plots) == set(registry.NAMES) | {"metric/kd_kl"}
        assert len(run.train["metric/kd_kl"]) == 8 and len(run.eval["metric/kd_kl"]) == 3
        assert "ended: completed" in str(app.query_one("#status").render())
        alerts = [a for _, a in app.all_alerts() if a.level in ("error", "warning")]
        assert alerts == []
        assert "ppl" in app.query_one("#eval").render().plain
        router = app.query_one("#router").render().plain  # the default curriculum routes over 3 teacher layers
        assert run.gate_usage is not None and len(run.gate_usage) == 3 and "L3" in router  # numbered 1.. like the config
        # the trainer's system record (CPU here: every rank's memory, no GPU numbers) in its own panel
        await pilot.pause(0.2)
        usage = run.system.ranks[0] if run.system is not None else None
        assert usage is not None and usage.rss_gib > 0.1 and usage.gpu_mem_gib is None and usage.peak_rss_gib >= usage.rss_gib
        assert run.system.estimate_gib is not None and run.system.estimate_gib > 0  # check's estimate beside it
        panel = app.query_one("#system").render().plain
        assert "RSS peak GiB" in panel and "host memory" in panel and "check's estimate" in panel

    run_app(app, scenario)


def test_follow_catches_appends_partial_lines_corruption_and_truncation(tmp_path):
    path = tmp_path / "run" / METRICS_FILE
    recs = healthy_records(30, eval_every=10)
    write(path, recs[:1])
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)
    done = threading.Event()

    def writer():
        with open(path, "a") as fh:
            for i, r in enumerate(recs[1:], start=1):
                line = dumps(r) + "\n"
                if i == 5:  # a record arriving in two writes
                    fh.write(line[:20])
                    fh.flush()
                    time.sleep(0.1)
                    fh.write(line[20:])
                else:
                    fh.write(line)
                if i == 8:
                    fh.write("{corrupt\n")
                fh.flush()
                time.sleep(0.01)
        done.set()

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].start is not None)
        threading.Thread(target=writer, daemon=True).start()
        await wait_for(pilot, lambda: done.is_set() and app.runs[0].end is not None)
        run = app.runs[0]
        assert run.records == len(recs) and run.corrupt == 1
        assert [s for s in run.train["objective"].step] == list(range(30))
        # truncation: the file is rewritten with a new, shorter run
        with open(path, "w") as fh:
            for r in healthy_records(4, eval_every=2, end=False):
                fh.write(dumps(r) + "\n")
        await wait_for(pilot, lambda: app.runs[0].records == len(healthy_records(4, eval_every=2, end=False)))
        assert app.runs[0].end is None and len(app.runs[0].train["objective"]) == 4

    run_app(app, scenario)


def test_every_key(tmp_path):
    a = write(tmp_path / "a" / METRICS_FILE, healthy_records(40, end=False))
    b = write(tmp_path / "b" / METRICS_FILE, healthy_records(40))
    export = tmp_path / "shots"
    export.mkdir()
    app = DsMonitor([str(a.parent), str(b.parent)], poll_interval=0.02, refresh_interval=0.05, export_dir=str(export))

    def status():
        return str(app.query_one("#status").render())

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[1].end is not None and "kd" in app._plots)
        kd = app.query_one("#plot-kd", PlotPanel)
        before = kd.render().plain
        await pilot.press("l")
        assert app.opts.logy and "log-y:on" in status() and kd.render().plain != before
        await pilot.press("s")
        assert app.opts.smoothing == 0.8 and "smooth:0.8" in status()
        await pilot.press("S", "S")
        assert app.opts.smoothing == 0.0
        await pilot.press("x")
        assert app.opts.x_axis == "time" and "x:time" in status()
        await pilot.press("x")
        assert app.opts.x_axis == "tokens"
        await pilot.press("r")
        assert app.opts.weighted and "(weighted)" in str(kd.border_title)
        await pilot.press("n")
        assert app.opts.window == 50 and "window:50" in status()
        await pilot.press("b")
        assert app.opts.baseline == 1 and app.query_one("#stats").border_title.startswith("b:")
        await pilot.press("p")
        assert app.paused and "PAUSED" in status()
        title = str(kd.border_title)
        write(a, healthy_records(60, end=False)[41:50])
        await wait_for(pilot, lambda: app.pending > 0)
        assert "PAUSED (+" in status() and str(kd.border_title) == title  # frozen while paused
        await pilot.press("p")
        await pilot.pause(0.2)
        assert not app.paused and "FOLLOW" in status()
        await pilot.press("slash")
        await pilot.press(*"lm")
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert app.opts.filter == "lm" and set(app._plots) == {"lm"} and len(app.query(PlotPanel)) == 1
        await pilot.press("slash", "backspace", "backspace", "enter")
        await pilot.pause(0.2)
        # kd comes back before lm, where it was (not appended at the end)
        assert [p.plotted for p in app.query(PlotPanel)] == ["kd", "lm"]
        await pilot.press("e")
        await pilot.pause(0.2)
        assert len(list(export.glob("*.svg"))) == 1
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("tab")
        assert isinstance(app.focused, Panel)
        await pilot.press("q")
        await pilot.pause(0.1)
        assert app._exit_renderables is not None or not app.is_running

    run_app(app, scenario, size=(140, 45))


def test_alerts_panel_shows_crafted_problems(tmp_path):
    path = write(tmp_path / "run" / METRICS_FILE, healthy_records(40, identical_evals=True, nan_at=33))
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        await pilot.pause(0.2)
        text = " ".join(app.query_one("#alerts").render().plain.split())  # wrapped to the panel's width
        assert "ERROR nan: non-finite train raw/kd (nan) at step 33" in text
        assert "ERROR eval_identical: eval objective 1.5 at step 20 is identical to step 10" in text
        assert "WARNING train_eval_gap" in text  # a constant eval objective also drifts away from train
        assert "alerts (3)" in str(app.query_one("#alerts").border_title)

    run_app(app, scenario)


def test_main_screen_snapshot(tmp_path):
    """The whole screen at 120x40 for a fixed stream and clock. DSMONITOR_UPDATE_SNAPSHOTS=1 rewrites it."""
    path = write(tmp_path / "demo" / METRICS_FILE, healthy_records(40))
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, clock=lambda: T0 + 200)
    shot = {}

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        await pilot.pause(0.3)
        shot["text"] = app.screen_text()

    run_app(app, scenario)
    expected = SNAPSHOTS / "main_120x40.txt"
    if os.environ.get("DSMONITOR_UPDATE_SNAPSHOTS"):
        expected.write_text(shot["text"])
    assert expected.exists(), f"{expected} is missing; write it with DSMONITOR_UPDATE_SNAPSHOTS=1 and review it"
    assert shot["text"] == expected.read_text()


def test_alerts_that_do_not_fit_are_announced_and_shown_alone_with_v(tmp_path):
    from dsdistill.schema import AlertRecord

    recs = healthy_records(40, end=False)
    recs[-1:-1] = [
        AlertRecord(
            step=30, time=recs[-2].time, level="warning", code=f"trainer_{i}", message=f"the trainer's own alert number {i}"
        )
        for i in range(15)
    ]
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, clock=lambda: recs[-1].time)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].records == len(recs))
        await pilot.pause(0.3)
        text = " ".join(app.query_one("#alerts").render().plain.split())
        assert "trainer_0:" in text and "more line(s): `v` shows the alerts alone" in text  # announced, not clipped
        while app.shown != "alerts":
            await pilot.press("v")
        await pilot.pause(0.3)
        text = " ".join(app.query_one("#alerts").render().plain.split())
        assert "more line(s)" not in text and all(f"trainer_{i}:" in text for i in range(15))

    run_app(app, scenario)


STAT_ROWS = {
    "objective": ("train", "objective"),
    "kd": ("train", "raw/kd"),
    "lm": ("train", "raw/lm"),
    "lr": ("train", "lr"),
    "temperature": ("train", "temperature"),
    "tokens/s": ("train", "tokens_per_s"),
    "eval obj": ("eval", "objective"),
    "eval ppl": ("eval", "ppl"),
    "teacher ppl": ("eval", "teacher_ppl"),
}


def _stats_lines(text: str) -> list[str]:
    """The stats table's rows as they are on screen (inside the panel's border)."""
    lines = text.splitlines()
    i, head = next((i, line) for i, line in enumerate(lines) if "│ metric" in line)
    col = head.index("│ metric") + 1
    out = []
    for line in lines[i + 1 :]:
        cell = line[col:]
        cell = cell[: cell.find("│")] if "│" in cell else cell
        if not cell.strip() or cell.strip().startswith("─"):
            break
        out.append(cell)
    return out


@pytest.mark.parametrize("size", [(80, 24), (200, 60)], ids=["80x24", "200x60"])
def test_no_number_on_screen_is_cut(tmp_path, size):
    """Every value the stats view shows equals the formatting of a value from the records, whole."""

    recs = healthy_records(40, end=False)
    for r in recs:
        if getattr(r, "kind", "") == "train":
            r.lr, r.tokens_per_s, r.temperature = 0.003, 29_876.5, 2.25
    path = write(tmp_path / "qwen2.5-lr3e-4" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, clock=lambda: recs[-1].time + 5)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].records == len(recs))
        await pilot.pause(0.4)
        text = app.screen_text()
        assert ("stats" if size[0] < 100 else "all") == app.shown  # a small terminal gets one view at a time
        run = app.runs[0]
        assert "qwen2.5-lr3e-4: live, last record 5s ago" in text  # the run directory's own name, liveness by record time
        rows = _stats_lines(text)
        seen = set()
        for line in rows:
            label = next((k for k in STAT_ROWS if line.strip().startswith(k + " ") or line.strip() == k), None)
            if label is None:
                continue
            where, key = STAT_ROWS[label]
            s = getattr(run, where)[key]
            delta = s.value[-1] - s.value[-2] if len(s) > 1 else None
            allowed = {_fmt(s.last), _fmt(s.finite_min()), _fmt(delta)}
            numbers = [tok for tok in line.strip()[len(label) :].split() if any(ch.isdigit() for ch in tok)]
            assert numbers and numbers[0] == _fmt(s.last), (label, line)
            assert set(numbers) <= allowed, (label, line, allowed)  # nothing cut, nothing made up
            seen.add(label)
        assert {"objective", "lr", "tokens/s", "temperature", "eval ppl"} <= seen, rows
        assert "0.003" in text and "29,876" in text

    run_app(app, scenario, size=size)


def test_pause_freezes_the_screen_and_export_writes_a_self_contained_svg_elsewhere(tmp_path):
    recs = healthy_records(40, end=False)
    path = write(tmp_path / "run" / METRICS_FILE, recs[:20])
    out = tmp_path / "exports"
    out.mkdir()
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, export_dir=str(out))

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].records == 20)
        await pilot.press("p")
        write(path, recs[20:])
        await pilot.pause(0.5)
        await pilot.press("l")  # a view change while paused redraws the frozen data, not the new records
        await pilot.pause(0.2)
        assert app.runs[0].records == 20 and app.pending == len(recs) - 20 and "PAUSED (+" in app.screen_text()
        await pilot.press("p")
        await wait_for(pilot, lambda: app.runs[0].records == len(recs))
        app.notify("a toast that must not be in the picture")
        await pilot.press("e")
        await wait_for(pilot, lambda: app.last_export is not None)
        svg = app.last_export.read_text()
        assert app.last_export.parent == out and not list(path.parent.glob("*.svg"))
        assert not re.search(r"url\(\s*[\"']?https?:", svg)  # no font (or anything) fetched from the network
        assert "toast" not in svg and "<svg" in svg

    run_app(app, scenario)


def test_a_large_file_shows_its_latest_state_first_then_its_whole_history(tmp_path):
    recs = healthy_records(3000, eval_every=100)
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, preview_bytes=64 << 10)

    async def scenario(pilot):
        await wait_for(pilot, lambda: not app.catching_up and app.runs[0].records == len(recs))
        await pilot.pause(0.2)

    run_app(app, scenario)
    step, records = app.previewed[0]
    assert step == 3000 and records < len(recs) / 10  # drawn from the file's end before its history was read
    run = app.runs[0]
    assert run.start is not None and len(run.train["objective"]) == 3000 and run.end is not None


def test_views_users_expect_crosshair_zoom_outliers_csv_config_records_temperature(tmp_path):
    import csv

    from rich.text import Text

    from dsdistill.curriculum import CurriculumConfig
    from dsmonitor.widgets import SearchScreen

    recs = healthy_records(40, end=False)
    recs[0].schedule = {
        **recs[0].schedule,
        "temperature": {"kind": "linear", "start": 0.0, "end": 1.0, "start_value": 3.0, "end_value": 1.0},
    }
    CurriculumConfig.model_validate({"weights": recs[0].schedule["weights"], "temperature": recs[0].schedule["temperature"]})
    recs[0].config = {"train": {"max_steps": 40, "seq_len": 512}, "loss": {"kd_divergence": "jsd"}}
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05, export_dir=str(tmp_path))

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].records == len(recs) and not app.catching_up)
        await pilot.pause(0.2)
        await pilot.press("right_square_bracket")  # the crosshair appears at the newest step
        assert app.opts.cursor == 39
        await pilot.press("left_square_bracket", "left_square_bracket")
        await pilot.pause(0.2)
        kd = app.runs[0].train["raw/kd"]
        title = Text.from_markup(str(app.query_one("#plot-kd").border_title)).plain
        assert app.opts.cursor == 37 and f"@ 37  {_fmt(kd.value[37])}" in title  # every plot reads its value there
        await pilot.press("plus")
        assert app.opts.zoom[1] - app.opts.zoom[0] == pytest.approx(0.5)
        from textual import events

        plot = app.query_one("#plot-kd")  # the wheel zooms out again (a terminal reporting the mouse)
        plot.post_message(events.MouseScrollDown(plot, 5, 5, 0, 1, 0, False, False, False))
        await pilot.pause(0.2)
        assert app.opts.zoom[1] - app.opts.zoom[0] == pytest.approx(0.625)
        await pilot.press("less_than_sign")
        await pilot.press("0", "c", "o")
        assert app.opts.zoom == (0.0, 1.0) and app.opts.cursor is None and app.opts.robust
        await pilot.press("E")
        await wait_for(pilot, lambda: app.last_export is not None and app.last_export.suffix == ".csv")
        await pilot.press("i")
        await pilot.pause(0.2)
        screen = app.screen
        assert isinstance(screen, SearchScreen) and "kd_divergence: jsd" in screen.shown_text()
        await pilot.press(*"seq")
        await pilot.pause(0.2)
        assert "seq_len: 512" in screen.shown_text() and "kd_divergence" not in screen.shown_text()
        await pilot.press("escape", "j")
        await pilot.pause(0.2)
        assert isinstance(app.screen, SearchScreen) and '"kind":"train"' in app.screen.shown_text()
        await pilot.press("escape")
        await pilot.pause(0.2)
        curriculum = app.query_one("#curriculum").render().plain
        assert "temperature" in curriculum  # a changing temperature gets its own plot
        app.query_one("#plot-lm").focus()
        await pilot.press("m")  # the focused plot fills the screen
        await pilot.pause(0.3)
        assert app.maximised == "lm" and not app.query_one("#plot-kd").display and not app.side.display
        assert app.query_one("#plot-lm").size.height > 30
        await pilot.press("m")
        await pilot.pause(0.2)
        assert app.maximised is None and app.query_one("#plot-kd").display and app.side.display

    run_app(app, scenario, size=(160, 50))
    rows = [r for r in csv.DictReader(app.last_export.open()) if r["kind"] == "train"]
    assert len(rows) == 40 and rows[7]["step"] == "7" and float(rows[7]["raw/kd"]) == app.runs[0].train["raw/kd"].value[7]


@pytest.mark.parametrize("size", [(80, 24), (200, 60)])
def test_the_curriculum_panel_draws_the_on_policy_fraction(tmp_path, size):
    recs = healthy_records(40, end=False)
    ramp = {"kind": "linear", "start": 0.0, "end": 1.0, "start_value": 0.0, "end_value": 1.0}
    recs[0].schedule = {**recs[0].schedule, "on_policy": ramp}
    for r in recs[1:]:
        if getattr(r, "kind", "") == "train":
            r.on_policy = r.step / 40
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].records == len(recs) and not app.catching_up)
        await pilot.pause(0.3)
        panel = app.query_one("#curriculum")
        now = min(app.runs[0].current_step, 40)
        assert f"on_policy={_fmt(now / 40)}" in panel.render().plain  # first in the legend: a narrow screen keeps it
        schedule = app.runs[0].schedule()
        assert schedule is not None and schedule.on_policy_at(step=20, total_steps=40) == 0.5

    run_app(app, scenario, size=size)


def test_the_help_scrolls_to_its_last_key_at_80x24(tmp_path):
    """At 80x24 everything after `+ / -` was cut off with no way to scroll."""
    from textual.containers import VerticalScroll

    path = write(tmp_path / "run" / METRICS_FILE, healthy_records(10))
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        await pilot.press("question_mark")
        await pilot.pause(0.2)
        scroll = app.screen.query_one(VerticalScroll)
        assert scroll.max_scroll_y > 0 and "Escape closes this screen" not in app.screen_text()
        await pilot.press("end")
        await pilot.pause(0.2)
        assert "Escape closes this screen" in app.screen_text()

    run_app(app, scenario, size=(80, 24))


def test_a_killed_run_that_wrote_often_is_stalled_within_its_own_pace(tmp_path):
    """A run writing a record every 2 s that stops writing looks stalled after 30 s, not after 300 s."""
    from dsmonitor.alerts import AlertRules, evaluate_alerts
    from dsmonitor.app import load_states

    recs = healthy_records(20, end=False)
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    (state,) = load_states([str(path.parent)])
    last = recs[-1].time
    rules = AlertRules()
    assert not [a for a in evaluate_alerts(state, rules, now=last + 20) if a.code == "stalled"]
    assert [a for a in evaluate_alerts(state, rules, now=last + 45) if a.code == "stalled"]


def test_an_estimated_teacher_perplexity_is_no_reference_line(tmp_path):
    """From a cache the teacher's perplexity was +48% off and drawn as the reference the student is judged
    by; an estimate is now labelled as one and not drawn."""
    recs = healthy_records(20)
    recs = [r.model_copy(update={"teacher_ppl_exact_share": 0.6}) if r.kind == "eval" else r for r in recs]
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        await pilot.pause(0.3)
        panel = app.panels["eval"]
        panel.draw(DrawContext(app.runs, app.opts, app.clock(), []))  # it may sit in another view than the one on screen
        await pilot.pause(0.2)
        text = " ".join(text_of(panel).split())
        assert "(teacher ~2.5, estimated for 40% of tokens)" in text, text[:400]

    run_app(app, scenario, size=(160, 50))


def test_at_80x24_the_key_bar_is_whole_both_runs_are_in_the_status_line_and_a_deep_router_is_all_there(tmp_path):
    """The key bar was cut mid-key (`r▏^p palette`), a second run was missing from the status line, and the
    router list showed 18 of 30 teacher layers with no way to see the rest."""
    recs = healthy_records(40, end=False)
    usage = [(i + 1) / 465 for i in range(30)]
    for r in recs:
        if getattr(r, "kind", "") == "train":
            r.gate_usage = usage
    a = write(tmp_path / "first-run-with-a-long-name" / METRICS_FILE, recs)
    b = write(tmp_path / "second-run-with-a-long-name" / METRICS_FILE, healthy_records(40, end=False))
    now = recs[-1].time + 5
    app = DsMonitor([str(a.parent), str(b.parent)], poll_interval=0.02, refresh_interval=0.05, clock=lambda: now)

    async def scenario(pilot):
        await wait_for(pilot, lambda: all(r.records for r in app.runs) and not app.catching_up)
        lines = app.screen_text().splitlines()
        keys = lines[-1]
        shown = re.findall(r" (\S+) (\S+) ", keys)
        assert keys.startswith(" q quit  ? help") and "▏" not in keys and len(keys) <= 80
        described = {desc for _, desc, _ in app.query_one("#keys").items}
        assert shown and all(desc in described for _, desc in shown)  # only whole keys
        status = app.status_bar.render().plain
        assert "first-run" in status and "second-run" in status and "live" in status and "rec/s" not in status
        while app.shown != "router":
            await pilot.press("v")
            await pilot.pause(0.1)
        await pilot.pause(0.2)
        text = app.screen_text()
        assert all(re.search(rf"\bL{i}\b", text) for i in range(1, 31)), text

    run_app(app, scenario, size=(80, 24))


def test_the_eta_is_estimated_from_the_first_record_instead_of_a_dash(tmp_path):
    """Before a run's second train record the ETA was "-" (minutes on a real model): it is now an upper
    bound from the run's start to its first record, and before that it says what it waits for."""
    from dsmonitor.fmt import eta_text
    from dsmonitor.state import RunState

    recs = healthy_records(40, end=False)
    run = RunState("run")
    run.add(recs[0])
    assert eta_text(run) == "after the first step"
    run.add(recs[1])  # step 0 written 2 s after the run_start: 39 steps left at <= 2 s each
    eta, how = run.eta_estimate()
    assert how == "first" and eta == pytest.approx(39 * 2.0) and eta_text(run).startswith("<1m18s")
    run.add(recs[2])
    assert run.eta_estimate() == (pytest.approx(38 * 2.0), "pace")


@pytest.fixture
def toy_panel():
    from dsmonitor import panels
    from tests.toy_panel import RecordsPanel

    panels.PANELS.append(RecordsPanel)  # adding a panel: its file (tests/toy_panel.py) and this one line
    yield
    panels.PANELS.remove(RecordsPanel)


def test_a_new_panel_is_one_file_and_one_line(tmp_path, toy_panel):
    recs = healthy_records(12)
    path = write(tmp_path / "run" / METRICS_FILE, recs)
    app = DsMonitor([str(path.parent)], poll_interval=0.02, refresh_interval=0.05)

    async def scenario(pilot):
        await wait_for(pilot, lambda: app.runs[0].end is not None)
        n_train = sum(r.kind == "train" for r in recs)
        assert f"run: {len(recs)} records, {n_train} train" in text_of(app.query_one("#records"))  # beside the others
        while app.shown != "records":  # and a view of its own in a small terminal
            await pilot.press("v")
            await pilot.pause(0.1)
        assert f"{len(recs)} records" in app.screen_text()

    run_app(app, scenario, size=(80, 24))
