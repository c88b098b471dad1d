"""What ZeRO-3 costs a teacher's forward when the teacher would fit on each rank: the same teacher sharded
(`teacher.placement: zero3`) and replicated (`replicated`), timed in the same run on the same micro-batches.

At world 1 ZeRO-3 shards nothing, so the whole difference is its host overhead per forward (the hooks that
gather and release every layer's parameters); on several ranks the gathers move bytes as well.

    python bench/teacher_placement.py [--forwards 30] [--width 256] [--layers 8]

Prints wall and CPU (this process, all its threads) ms per teacher forward (the fused path's form: the final
hidden state, plus every block's hidden states for the feature components) for each placement, and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tiny_pair import write_tiny_pair  # noqa: E402 - bench/ is the script's own folder

from dsdistill.config import validate  # noqa: E402
from dsdistill.needs import Needs  # noqa: E402
from dsdistill.train import open_session  # noqa: E402
from dsdistill.trainer import teacher_input  # noqa: E402


def _per_forward(root: Path, placement: str, forwards: int) -> tuple[float, float]:
    """(wall ms, CPU ms of this process) per teacher forward."""
    cfg = {
        "teacher": {"path": str(root / "teacher"), "placement": placement},
        "student": {"path": str(root / "student")},
        "data": {"path": str(root / "corpus.jsonl"), "eval_fraction": 0.05},
        "train": {"max_steps": 10, "micro_batch_size": 8, "seq_len": 128, "precision": "fp32"},
        "curriculum": {"weights": {"kd": 0.9, "lm": 0.1}},
        "output": {"run_dir": str(root / f"run-{placement}")},
        "checkpoint": {"save_final": False},
    }
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
        teacher, batches = s.teacher, iter(s.data.stream)
        needs = Needs(teacher_logits=True, teacher_hidden=True)
        inputs = []
        for _ in range(forwards + 3):
            batch = next(batches)
            inputs.append(teacher_input(batch, batch["labels"], -100))
        teacher.begin_step(needs)
        for x in inputs[:3]:  # warm-up
            teacher.signal(x, needs)
        t0, c0 = time.perf_counter(), time.process_time()
        for x in inputs[3:]:
            teacher.signal(x, needs)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        teacher.end_step()
    return 1000 * seconds / forwards, 1000 * cpu / forwards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forwards", type=int, default=30)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        write_tiny_pair(root, teacher=(args.width, args.layers), student=(128, 2), documents=2000, max_pos=256)
        ms: dict[str, tuple[float, float]] = {}
        for placement in ("zero3", "replicated", "zero3", "replicated"):  # each twice: the second of each is kept
            ms[placement] = _per_forward(root, placement, args.forwards)
    print(f"teacher {args.width} wide x {args.layers} layers, micro-batch 8 x 128, world 1, {args.forwards} forwards each")
    (zw, zc), (rw, rc) = ms["zero3"], ms["replicated"]
    print(f"ZeRO-3:     {zw:.1f} ms wall, {zc:.1f} ms CPU per forward")
    print(f"replicated: {rw:.1f} ms wall, {rc:.1f} ms CPU per forward ({zw / rw:.2f}x wall, {zc / rc:.2f}x CPU)")
    print(f"ZeRO-3 host overhead: {zc - rc:.1f} ms CPU per forward ({(zc - rc) / args.layers:.2f} ms per layer)")


if __name__ == "__main__":
    main()
