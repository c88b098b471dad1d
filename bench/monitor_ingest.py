"""How fast dsmonitor opens a large metrics file, as a ratio against a baseline measured in the same run.

    python bench/monitor_ingest.py [--records 100000]

baseline: read the file and json.loads every line (the least any reader must do);
dsmonitor: Tailer.poll (pydantic-core JSON validation of every record) + RunState ingest, i.e. everything
the app does before the first draw. Also times, in the dashboard at 160x50, how long until the latest step is
on screen (large files are drawn from their end first) and until the whole history is drawn, and the peak
RSS of the process (the ingest above and the app together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsmonitor.app import DsMonitor  # noqa: E402
from dsmonitor.state import RunState  # noqa: E402
from dsmonitor.tail import Tailer, gc_paused  # noqa: E402
from tests.streams import healthy_records, write  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--no-ui", action="store_true", help="skip the dashboard draw timing")
    args = ap.parse_args()
    steps = max(10, int(args.records / 1.1))
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d) / "run" / "metrics.jsonl", healthy_records(steps, eval_every=10))
        n_lines = sum(1 for _ in open(path))
        size_mb = path.stat().st_size / 1e6

        t = time.perf_counter()
        with open(path, "rb") as fh:
            base = [json.loads(line) for line in fh]
        baseline = time.perf_counter() - t

        t = time.perf_counter()
        tailer, state = Tailer(path), RunState("bench")
        res = tailer.poll()
        with gc_paused():  # as the app does around ingest
            for rec in res.records:
                state.add(rec)
        ours = time.perf_counter() - t
        assert len(res.records) == len(base) == n_lines

        draw = latest = None
        if not args.no_ui:

            async def run_ui():
                app = DsMonitor([str(path.parent)], poll_interval=0.01, refresh_interval=0.05)
                start = time.perf_counter()
                first = None
                async with app.run_test(size=(160, 50)) as pilot:
                    while app.runs[0].end is None or app.catching_up:
                        if first is None and app.runs[0].current_step >= steps:
                            first = time.perf_counter() - start  # the latest step is on screen
                        await pilot.pause(0.01)
                    app.refresh_views(force=True)
                    await pilot.pause(0)
                    whole = time.perf_counter() - start
                    return (first if first is not None else whole), whole

            latest, draw = asyncio.run(run_ui())

    result = {
        "records": n_lines,
        "file_mb": round(size_mb, 1),
        "baseline_json_loads_s": round(baseline, 3),
        "dsmonitor_ingest_s": round(ours, 3),
        "ratio_vs_baseline": round(ours / baseline, 2),
        "records_per_s": round(n_lines / ours),
        "open_to_latest_step_on_screen_s": None if latest is None else round(latest, 3),
        "latest_on_screen_vs_baseline": None if latest is None else round(latest / baseline, 2),
        "open_to_full_history_drawn_s": None if draw is None else round(draw, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
