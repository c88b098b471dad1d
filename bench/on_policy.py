"""On-policy distillation on CPU with the demo's models: what generation costs and what it buys.

    python bench/on_policy.py [--steps 150] [--fractions 0 0.5 1]

Prompt/completion pairs are cut from the demo corpus (a document's first sentence is the prompt, the rest
its completion). The same student is distilled for the same steps with the same seed at each constant
on-policy fraction (0 is off-policy). Reported per run: generation's share of the training time, sampled
tokens per second, mean completion length, and the student's held-out perplexity on the dataset's
completions at the end (the same eval data and weights for every run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsdistill.demo import default_cache, ensure_assets  # noqa: E402


def pairs(corpus: Path, out: Path) -> Path:
    with open(out, "w") as fh:
        for line in corpus.read_text().splitlines():
            text = json.loads(line)["text"]
            cut = text.find(" . ")
            if cut > 0:
                fh.write(json.dumps({"prompt": text[: cut + 3], "completion": text[cut + 3 :]}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    args = ap.parse_args()
    paths = ensure_assets(default_cache(), log=print)
    work = Path(tempfile.mkdtemp(prefix="on-policy-"))
    data = pairs(paths["corpus"], work / "pairs.jsonl")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for f in args.fractions:
        run_dir = work / f"run-{f}"
        cfg = {
            "teacher": {"path": str(paths["teacher"])},
            "student": {"path": str(paths["student"])},
            "data": {"path": str(data), "format": "prompt_completion", "packing": "none", "eval_fraction": 0.05},
            "train": {"max_steps": args.steps, "micro_batch_size": 8, "seq_len": 48, "seed": 0, "precision": "fp32"},
            "optimizer": {"lr": 3e-3},
            "scheduler": {"kind": "cosine", "warmup_steps": 10},
            # KD alone: cross-entropy on the student's own samples would reinforce them (schedule lm to 0 on-policy)
            "curriculum": {"weights": {"kd": 1.0}, "on_policy": f},
            "loss": {"kd": {"divergence": "reverse_kl"}},
            "generation": {"max_new_tokens": 32, "temperature": 1.0},
            "eval": {"every": 0, "at_start": False, "max_batches": 20},
            "output": {"run_dir": str(run_dir), "log_every": 1},
            "checkpoint": {"save_final": False},
        }
        path = work / f"run-{f}.json"
        path.write_text(json.dumps(cfg))
        p = subprocess.run(
            [sys.executable, "-m", "dsdistill", "train", "--config", str(path)], capture_output=True, text=True, env=env
        )
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in recs if r["kind"] == "train"]
        ev = [r for r in recs if r["kind"] == "eval"][-1]
        train_s = trains[-1]["time"] - trains[0]["time"]
        gen = [r["rollout"] for r in trains[1:] if r.get("rollout")]
        gen_s = sum(g["generation_s"] for g in gen)
        tokens = sum(g["rollout_tokens"] for g in gen)
        seqs = sum(g["sequences"] for g in gen)
        print(
            f"on_policy {f:.1f}: {args.steps} steps in {train_s:.0f}s; generation {gen_s:.0f}s ({gen_s / train_s:.0%} of training),"
            f" {tokens / gen_s if gen_s else 0:,.0f} sampled tokens/s, mean completion {tokens / seqs if seqs else 0:.1f} tokens;"
            f" held-out ppl {ev['ppl']:.3f} (teacher {ev['teacher_ppl']:.3f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
