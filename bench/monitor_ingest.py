"""How fast dsmonitor opens a large metrics file, as ratios against a baseline measured in the same run.

    python bench/monitor_ingest.py [--records 100000] [--no-ui]

baseline: read the file and json.loads every line (the least any reader must do);
ingest:   Tailer.poll (pydantic-core validation of every record) + RunState, in this process;
dashboard (a child process, so its memory is its own): time until the latest step is on screen (large
          files are drawn from their end first), until the whole history is drawn, the longest time the UI's
          event loop was busy while the history loaded (what a key press would wait), and the child's peak RSS. Records are realistic: every
          component of the default curriculum, evals every 10 steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsdistill.schema import dumps  # noqa: E402
from dsmonitor.state import RunState  # noqa: E402
from dsmonitor.tail import Tailer  # noqa: E402
from tests.streams import healthy_records  # noqa: E402

BLOCK = 1000


def write_stream(path: Path, records: int) -> int:
    """A run of about `records` records: a 1,000-step template repeated with steps, times and tokens moved on."""
    steps = max(10, int(records / 1.1))
    template = [json.loads(dumps(r)) for r in healthy_records(min(BLOCK, steps), eval_every=10, end=False)]
    start, body = template[0], template[1:]
    start["total_steps"] = steps
    dt = body[-1]["time"] - body[0]["time"] + 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(json.dumps(start) + "\n")
        for b in range(-(-steps // BLOCK)):
            for rec in body:
                step = rec["step"] + b * BLOCK
                if step >= steps:
                    continue
                out = dict(rec, step=step, time=rec["time"] + b * dt)
                if "tokens" in out:
                    out["tokens"] = rec["tokens"] + b * BLOCK * 512
                if "total_steps" in out:
                    out["total_steps"] = steps
                    out["progress"] = (step + 1) / steps
                fh.write(json.dumps(out) + "\n")
        fh.write(
            json.dumps(
                {"kind": "run_end", "step": steps, "time": body[-1]["time"] + (steps // BLOCK) * dt, "reason": "completed"}
            )
            + "\n"
        )
    return steps


def ui_child(path: str, steps: int, follow_seconds: int) -> None:
    """Open the dashboard on `path`, then follow it while a record is appended every second; print the
    timings as JSON (run in its own process, so its memory and CPU are its own)."""
    import threading

    from dsmonitor.app import DsMonitor

    async def run():
        app = DsMonitor([str(Path(path).parent)], poll_interval=0.01, refresh_interval=0.5)
        start = time.perf_counter()
        first, stalls = None, []
        async with app.run_test(size=(160, 50)) as pilot:
            last = time.perf_counter()
            while app.catching_up or app.runs[0].current_step < steps:
                if first is None and app.runs[0].current_step >= steps:
                    first = time.perf_counter() - start
                # how long the UI's event loop was busy: what a key press would have waited for
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                stalls.append(now - last - 0.01)
                last = now
            app.refresh_views(force=True)
            await pilot.pause(0)
            whole = time.perf_counter() - start
            # following: the defaults (poll every second) while the trainer appends a record a second
            app.poll_interval = 1.0
            with open(path, "rb") as fh:  # the newest train record, read from the end (the file may be GBs)
                fh.seek(max(0, Path(path).stat().st_size - (64 << 10)))
                tail = [json.loads(line) for line in fh.read().splitlines()[1:] if line.strip()]
            template = next(r for r in reversed(tail) if r.get("kind") == "train")
            stop = threading.Event()

            def trainer():
                for i in range(1, follow_seconds + 1):
                    with open(path, "a") as fh:
                        fh.write(json.dumps(dict(template, step=template["step"] + i, time=template["time"] + i)) + "\n")
                    if stop.wait(1.0):
                        return

            writer = threading.Thread(target=trainer)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            writer.start()
            await asyncio.sleep(follow_seconds)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            stop.set()
            writer.join()
        return {
            "latest": first if first is not None else whole,
            "whole": whole,
            "stall_max_ms": 1000 * max(stalls, default=0.0),
            "stalls_over_100ms": sum(x > 0.1 for x in stalls),
            "follow_core_share": cpu / wall,
        }

    result = asyncio.run(run())
    # the peak of this process image (ru_maxrss would include the parent's size at fork)
    status = Path("/proc/self/status").read_text()
    result["rss_mib"] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(json.dumps(result))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--no-ui", action="store_true", help="skip the dashboard timings")
    ap.add_argument("--follow-seconds", type=int, default=10, help="how long to measure following (default 10)")
    ap.add_argument("--ui-child", nargs=3, metavar=("FILE", "STEPS", "FOLLOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ui_child:
        ui_child(args.ui_child[0], int(args.ui_child[1]), int(args.ui_child[2]))
        return 0
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run" / "metrics.jsonl"
        steps = write_stream(path, args.records)
        n_lines = sum(1 for _ in open(path))

        t = time.perf_counter()
        with open(path, "rb") as fh:
            base = [json.loads(line) for line in fh]
        baseline = time.perf_counter() - t
        del base

        t = time.perf_counter()
        tailer, state = Tailer(path), RunState("bench")
        total = 0
        while True:  # in chunks, as the dashboard's worker reads
            res = tailer.poll(max_bytes=16 << 20)
            for rec in res.records:
                state.add(rec)
            total += len(res.records)
            if not res.records and not res.corrupt:
                break
        ours = time.perf_counter() - t
        assert total == n_lines, (total, n_lines)
        size_mb = path.stat().st_size / 1e6
        ui = None  # after the ingest above: the child appends to the file while it follows
        if not args.no_ui:
            out_path = Path(d) / "ui.json"
            with open(out_path, "w") as out:
                code = subprocess.call(
                    [sys.executable, __file__, "--ui-child", str(path), str(steps), str(args.follow_seconds)], stdout=out
                )
            if code != 0:
                return 1
            ui = json.loads(out_path.read_text().strip().splitlines()[-1])

    result = {
        "records": n_lines,
        "file_mb": round(size_mb, 1),
        "baseline_json_loads_s": round(baseline, 3),
        "ingest_s": round(ours, 3),
        "ingest_vs_baseline": round(ours / baseline, 2),
        "records_per_s": round(n_lines / ours),
    }
    if ui is not None:
        result.update(
            {
                "latest_step_on_screen_s": round(ui["latest"], 3),
                "latest_on_screen_vs_baseline": round(ui["latest"] / baseline, 3),
                "whole_history_drawn_s": round(ui["whole"], 3),
                "ui_longest_stall_during_load_ms": round(ui["stall_max_ms"]),
                "ui_stalls_over_100ms": ui["stalls_over_100ms"],
                "dashboard_peak_rss_mib": round(ui["rss_mib"]),
                "following_share_of_a_core": round(ui["follow_core_share"], 3),
            }
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
