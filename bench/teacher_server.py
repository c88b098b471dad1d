"""A teacher on its own process: what the student's step costs with the teacher behind `dsdistill
teacher-serve` against the same teacher live in the job, and what the server answers with 1, 2 and 4
clients. Everything on this machine's CPU (the server and the student share it, so the server's time is
the student's: on separate machines the waiting share is the number to read).

Prints, in the same run:
- student tokens/s (wall clock) for live top-k + rest KD and for server-fed KD (JSON and binary replies, each
  window asked for when it runs, and binary with the next window asked for while this one computes, as the
  training loop does), their ratio to live, and the share of the step spent waiting for the teacher;
- server throughput in scored positions/s with 1, 2 and 4 concurrent clients.

    python bench/teacher_server.py [--steps 20] [--seconds 10] [--ranks 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import yaml  # noqa: E402
from tiny_pair import write_tiny_pair  # noqa: E402 - bench/ is the script's own folder

from dsdistill.config import validate  # noqa: E402
from dsdistill.dist import free_port, without_world_env  # noqa: E402
from dsdistill.train import open_session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K = 32


def _config(root: Path, steps: int, teacher: dict, loss: dict) -> dict:
    return {
        "teacher": teacher,
        "student": {"path": str(root / "student")},
        "data": {"path": str(root / "corpus.jsonl"), "eval_fraction": 0.05},
        "train": {"max_steps": steps, "micro_batch_size": 8, "seq_len": 128, "precision": "fp32"},
        "curriculum": {"weights": {"kd": 0.9, "lm": 0.1}},
        "loss": loss,
        "eval": {"every": 10_000},
        "output": {"run_dir": str(root / f"run-{time.monotonic_ns()}"), "log_every": 10_000},
        "checkpoint": {"save_final": False, "every_minutes": 0},
    }


def _steps(cfg: dict, steps: int, *, ahead: bool = False) -> tuple[float, float, int]:
    """(wall seconds of the steps after the first, seconds of them in the teacher's prepare, tokens);
    `ahead`: each step is given the next window, as the training loop does for a remote teacher."""
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
        teacher, waited = s.forward.teacher, [0.0]
        prepare = teacher.prepare

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return prepare(*a, **kw)
            finally:
                waited[0] += time.perf_counter() - t0

        teacher.prepare = timed
        batches = iter(s.data.stream)
        window, tokens, t0 = [next(batches)], 0, time.perf_counter()
        for i in range(steps + 1):  # the first is a warm-up
            if i == 1:
                waited[0], t0, tokens = 0.0, time.perf_counter(), 0
            upcoming = [next(batches)]
            r = s.trainer.step(window, stop_requested=False, upcoming=upcoming if ahead else None)
            tokens += r.tokens if i else 0
            window = upcoming
        return time.perf_counter() - t0, waited[0], tokens


def _launched(cfg: dict, root: Path, name: str, ranks: int) -> tuple[float, Optional[float]]:
    """`deepspeed --num_gpus RANKS dsdistill/train.py` on `cfg`: (tokens/s over the steps after the first, from
    the records' clocks; the mean share of a step rank 0 waited for the teacher, or None)."""
    from dsdistill.demo import launcher_command, launcher_env
    from dsdistill.schema import METRICS_FILE, TrainRecord, parse_line

    run = {**cfg, "output": {**cfg["output"], "run_dir": str(root / name), "log_every": 1}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    cmd = launcher_command(ROOT / "dsdistill" / "train.py", path, nprocs=ranks, master_port=free_port())
    proc = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: the launch failed\n{proc.stderr[-2000:]}")
    recs = [parse_line(line) for line in (root / name / METRICS_FILE).read_text().splitlines()]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    tokens = trains[-1].tokens - trains[0].tokens
    waits = [r.teacher_wait for r in trains[1:] if r.teacher_wait is not None]
    return tokens / (trains[-1].time - trains[0].time), (sum(waits) / len(waits) if waits else None)


def _server(root: Path, port: int) -> subprocess.Popen:
    cfg = root / "teacher.yaml"
    cfg.write_text(yaml.safe_dump(_config(root, 1, {"path": str(root / "teacher")}, {})))
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsdistill", "teacher-serve", "--config", str(cfg), "--port", str(port)],
        cwd=ROOT,
        env=without_world_env(dict(os.environ)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("teacher-serve:"):
            return proc
    raise SystemExit("teacher-serve did not start")


def _throughput(url: str, clients: int, seconds: float, body: bytes) -> float:
    """Scored positions per second with `clients` threads sending the same request back to back."""
    positions = sum(len(p) for p in json.loads(body)["positions"])
    done = [0] * clients
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < stop:
            req = urllib.request.Request(f"{url}/dsdistill/v1/score", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                r.read()
            done[i] += positions

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0, help="per client count, for the throughput")
    ap.add_argument("--ranks", type=int, default=0, help="also launch live and server-fed runs on this many ranks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_tiny_pair(root, teacher=(256, 4), student=(128, 2), documents=3000, max_pos=256)
        port = free_port()
        server = _server(root, port)
        url = f"http://127.0.0.1:{port}"
        try:
            live = _steps(
                _config(
                    root,
                    args.steps + 1,
                    {"path": str(root / "teacher")},
                    {"kd": {"top_k": K, "top_k_rest": True, "top_k_support": "teacher"}},
                ),
                args.steps,
            )
            as_json = _config(root, args.steps + 2, {"url": url, "options": {"top_k": K, "reply": "json"}}, {})
            texted = _steps(as_json, args.steps)
            served = _config(root, args.steps + 2, {"url": url, "options": {"top_k": K}}, {})
            remote = _steps(served, args.steps)
            ahead = _steps({**served, "output": {**served["output"], "run_dir": str(root / "run-ahead")}}, args.steps, ahead=True)
            info = json.loads(urllib.request.urlopen(f"{url}/dsdistill/v1/info", timeout=60).read())
            seqs = [[(7 * i + j) % info["vocab"] for j in range(128)] for i in range(8)]
            body = json.dumps(
                {
                    "sequences": seqs,
                    "positions": [list(range(127))] * 8,
                    "k": K,
                    "temperatures": [],
                    "tokenizer": info["tokenizer"],
                }
            ).encode()
            rates = {n: _throughput(url, n, args.seconds, body) for n in (1, 2, 4)}
            sizes = {}
            for reply in ("json", "binary", "codec"):
                ask = {**json.loads(body), "reply": reply, "temperatures": [2.0]}
                req = urllib.request.Request(f"{url}/dsdistill/v1/score", data=json.dumps(ask).encode())
                with urllib.request.urlopen(req, timeout=300) as r:
                    sizes[reply] = len(r.read()) / sum(len(p) for p in ask["positions"])
            launched = {}
            if args.ranks:
                live_cfg = _config(
                    root,
                    args.steps + 1,
                    {"path": str(root / "teacher")},
                    {"kd": {"top_k": K, "top_k_rest": True, "top_k_support": "teacher"}},
                )
                launched["live"] = _launched(live_cfg, root, "ranks-live", args.ranks)
                launched["server"] = _launched(served, root, "ranks-server", args.ranks)
        finally:
            server.terminate()
            server.wait()
    (lt, _, ltok) = live
    print(f"student tokens/s, live teacher (top-{K} + rest): {ltok / lt:,.0f}")
    for name, (t, wait, tok) in (
        ("JSON replies, asked per window", texted),
        ("binary replies, asked per window", remote),
        ("binary replies, next window ahead", ahead),
    ):
        print(
            f"student tokens/s, teacher server, {name}: {tok / t:,.0f} ({(tok / t) / (ltok / lt):.2f}x live); "
            f"waiting for the teacher {wait / t:.0%} of the step"
        )
    for n, rate in rates.items():
        print(f"server throughput, {n} client(s): {rate:,.0f} positions/s")
    print(
        f"reply bytes per position (top-{K}, one temperature): "
        + ", ".join(f"{name} {size:,.0f}" for name, size in sizes.items())
    )
    for name, (rate, wait) in launched.items():
        waiting = f"; rank 0 waiting for the teacher {wait:.0%} of the step" if wait is not None else ""
        print(f"{args.ranks} ranks through the launcher, {name} teacher: {rate:,.0f} tokens/s{waiting}")
    print(f"(one block of {args.steps} steps each, wall clock; the CPU is shared by the server and the student)")


if __name__ == "__main__":
    main()
