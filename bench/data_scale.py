"""Does startup grow with the corpus? `dsdistill check` and a 10-step run on a small and a large generated
corpus, streamed and read whole, as ratios against the small corpus measured in the same run.

    python bench/data_scale.py [--small 10000] [--large 2000000] [--steps 10] [--whole-large 200000]

Each measurement is a child process (its wall time and peak RSS are its own): `dsdistill check` (the plan)
and `dsdistill train` for `--steps` optimizer steps, both on the demo's tiny teacher and student. Streamed
(`data.streaming: true`), both should be flat; read whole, tokenising up front grows with the corpus, so
that row is measured at `--whole-large` documents to keep the run short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsdistill.demo import build_tokenizer, tiny_llama, write_corpus  # noqa: E402


def child(argv: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # a fresh datasets cache per measurement: nothing is reused from an earlier one
    env["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hfcache-", dir=cwd)
    t0 = time.perf_counter()
    # run through a tiny wrapper so the RSS measured is the child's own (getrusage of a waited grandchild)
    code = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
        "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{proc.stderr[-2000:]}")
    rss_kib = int(next(line for line in proc.stderr.splitlines() if line.startswith("RSS ")).split()[1])
    return wall, rss_kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=2_000_000)
    ap.add_argument("--whole-large", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    tok = build_tokenizer(work / "tok")
    for name, hidden, layers in (("teacher", 64, 2), ("student", 32, 2)):
        tiny_llama(len(tok), hidden=hidden, layers=layers, heads=4, kv_heads=2, max_pos=256).save_pretrained(work / name)
        tok.save_pretrained(work / name)
    corpora = {}
    for n in sorted({args.small, args.large, args.whole_large}):
        t0 = time.perf_counter()
        corpora[n] = write_corpus(work / f"corpus-{n}.jsonl", documents=n, seed=1)
        print(
            f"generated {n:,} documents ({corpora[n].stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )

    def config(n: int, streaming: bool) -> Path:
        cfg = {
            "teacher": {"path": str(work / "teacher")},
            "student": {"path": str(work / "student")},
            "data": {"path": str(corpora[n]), "streaming": streaming, "eval_examples": 200},
            "train": {"max_steps": args.steps, "micro_batch_size": 4, "seq_len": 128, "precision": "fp32"},
            "eval": {"every": 0, "at_start": False, "max_batches": 2},
            "output": {"run_dir": str(work / f"run-{n}-{streaming}"), "log_every": 5},
            "checkpoint": {"save_final": False},
        }
        p = work / f"run-{n}-{streaming}.json"
        p.write_text(json.dumps(cfg))
        return p

    rows = []
    # streamed at three sizes: the middle one shows where reading's fixed buffers stop growing
    for streaming, sizes in ((True, (args.small, args.whole_large, args.large)), (False, (args.small, args.whole_large))):
        base = None
        for n in sizes:
            cfg = config(n, streaming)
            check = child([sys.executable, "-m", "dsdistill", "check", "--config", str(cfg)], work)
            run = child([sys.executable, "-m", "dsdistill", "train", "--config", str(cfg)], work)
            base = base or (check, run)
            rows.append((("streamed" if streaming else "whole"), n, check, run, base))
            print(
                f"{'streamed' if streaming else 'whole':8} {n:>9,} docs: check {check[0]:6.1f}s {check[1]:6.0f} MiB"
                f" | {args.steps}-step run {run[0]:6.1f}s {run[1]:6.0f} MiB"
                f" | ratio vs {sizes[0]:,}: check time {check[0] / base[0][0]:.2f}x, RSS {check[1] / base[0][1]:.2f}x;"
                f" run time {run[0] / base[1][0]:.2f}x, RSS {run[1] / base[1][1]:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
