"""What a training step costs while most of the curriculum weighs 0: kd + lm alone vs kd + lm with the
seven other components scheduled to start at 95% of the run (weight 0 until then), in one process.

A step computes only the components weighted above 0 (their losses, q/k captures and teacher outputs);
their modules get a zero gradient where ZeRO needs one (ZeRO-3, no ZeRO). Prints CPU seconds per step
(process time, one thread, the median of each block of steps, the best block of each) and the ratio.

    python bench/zero_weight.py [--steps 12] [--blocks 3] [--stage 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from tiny_pair import write_tiny_pair  # noqa: E402 - bench/ is the script's own folder

from dsdistill.config import validate  # noqa: E402
from dsdistill.train import open_session  # noqa: E402

LATE = {"kind": "linear", "start": 0.95, "end": 1.0, "start_value": 0.0, "end_value": 0.1}
OTHERS = (
    "feature",
    "attention",
    "layerwise",
    "contrastive",
    "routing_feature",
    "routing_load_balance",
    "routing_attention_alignment",
)


def _config(root: Path, weights: dict, stage: int, steps: int) -> dict:
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {
        "teacher": {"path": str(root / "teacher")},
        "student": {"path": str(root / "student")},
        "data": {"path": str(root / "corpus.jsonl"), "eval_fraction": 0.05},
        "train": {"max_steps": steps, "micro_batch_size": 8, "seq_len": 128, "precision": "fp32"},
        "curriculum": {"weights": weights},
        "eval": {"every": 10_000},
        "output": {"run_dir": str(root / f"run-{len(weights)}-{time.monotonic_ns()}"), "log_every": 10_000},
        "checkpoint": {"save_final": False, "every_minutes": 0},
        "deepspeed": {
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "zero_optimization": zero,
            }
        },
    }


def _block(root: Path, weights: dict, stage: int, steps: int) -> float:
    """Median CPU seconds of one step over `steps` steps of a fresh session (the first step left out)."""
    cfg = validate(_config(root, weights, stage, steps + 1))
    times = []
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        batches = iter(s.data.stream)
        for _ in range(steps + 1):
            window = [next(batches)]
            t0 = time.process_time()
            s.trainer.step(window, stop_requested=False)
            times.append(time.process_time() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="zero_weight_"))
    write_tiny_pair(root, teacher=(256, 4), student=(128, 4), documents=800, max_pos=256)
    plain = {"kd": 0.9, "lm": 0.1}
    late = {**plain, **{c: LATE for c in OTHERS}}
    best = {"kd+lm": float("inf"), "kd+lm, 7 more at weight 0": float("inf")}
    for _ in range(args.blocks):  # alternating blocks: the machine's load falls on both alike
        best["kd+lm"] = min(best["kd+lm"], _block(root, plain, args.stage, args.steps))
        best["kd+lm, 7 more at weight 0"] = min(best["kd+lm, 7 more at weight 0"], _block(root, late, args.stage, args.steps))
    base = best["kd+lm"]
    print(f"ZeRO-{args.stage}, student 4x128, teacher 4x256, 8 x 128 tokens per step, CPU seconds per step (1 thread)")
    print("| curriculum | s/step | vs kd+lm |")
    print("|---|---:|---:|")
    for name, sec in best.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f}x |")


if __name__ == "__main__":
    main()
