"""Host syncs in `Trainer.step`: per optimizer step, and per extra micro-batch (the marginal count between a
window of 2 and one of 4), with where each comes from. Real in-process DeepSpeed engine on CPU (ZeRO-2).

    python bench/syncs.py [--fused 1] [--curriculum default|kdlm]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from tiny_pair import write_tiny_pair  # noqa: E402 - bench/ is the script's own folder

from dsdistill import registry  # noqa: E402
from dsdistill.config import validate  # noqa: E402
from dsdistill.syncs import SyncCounter  # noqa: E402
from dsdistill.train import open_session  # noqa: E402


def count(root: Path, accum: int, weights: dict, fused: bool) -> SyncCounter:
    cfg = validate(
        {
            "teacher": {"path": str(root / "teacher")},
            "student": {"path": str(root / "student")},
            "data": {"path": str(root / "corpus.jsonl"), "eval_fraction": 0.05},
            "train": {"max_steps": 4, "micro_batch_size": 4, "grad_accum": accum, "seq_len": 64, "precision": "fp32"},
            "curriculum": {"weights": weights},
            "loss": {"fused_logits": fused},
            "eval": {"every": 10_000},
            "output": {"run_dir": str(root / f"run-{accum}-{fused}-{len(weights)}"), "log_every": 10_000},
            "checkpoint": {"save_final": False, "every_minutes": 0},
        }
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        batches = iter(s.data.stream)
        s.trainer.step([next(batches) for _ in range(accum)], stop_requested=False)  # warm-up
        window = [next(batches) for _ in range(accum)]
        with SyncCounter() as c:
            s.trainer.step(window, stop_requested=False)
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fused", type=int, default=1)
    ap.add_argument("--curriculum", choices=["kdlm", "every"], default="kdlm")
    ap.add_argument("--sites", action="store_true", help="list every sync site")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="syncs_"))
    write_tiny_pair(root, teacher=(64, 3), student=(32, 2), documents=300, max_pos=128)
    weights = {"kd": 0.9, "lm": 0.1}
    if args.curriculum == "every":
        weights = {**{name: 0.1 for name in registry.NAMES}, **weights}
    two = count(root, 2, weights, bool(args.fused))
    four = count(root, 4, weights, bool(args.fused))
    print(
        f"fused {bool(args.fused)}, curriculum {args.curriculum}: syncs per step with 2 micro-batches {two.total} "
        f"({two.ours} dsdistill's own), with 4 {four.total} ({four.ours}); per extra micro-batch "
        f"{(four.total - two.total) / 2:g} ({(four.ours - two.ours) / 2:g} dsdistill's own)"
    )
    per_mb = {k: (four.by_site[k] - two.by_site.get(k, 0)) / 2 for k in four.by_site}
    for site, n in sorted(per_mb.items(), key=lambda kv: -kv[1]):
        if n or args.sites:
            print(f"  {n:g} per micro-batch  {site}")
    if args.sites:
        for site, n in two.by_site.most_common():
            print(f"  {n} per step (2 micro-batches)  {site}")


if __name__ == "__main__":
    main()
