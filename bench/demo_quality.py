"""What distillation buys on the demo: the distilled student vs the same student without the teacher, over
seeds, and an ablation of the default curriculum. Writes the tables of docs/quality.md.

    DS_ACCELERATOR=cpu python bench/demo_quality.py                       # 3 seeds, everything (~30 min, 2 cores)
    DS_ACCELERATOR=cpu python bench/demo_quality.py --only headline       # teacher / distilled / alone only
    DS_ACCELERATOR=cpu python bench/demo_quality.py --only on-policy      # on_policy 0 / 0.5 / 1 on prompt/completion pairs

Every variant is the demo's own run config (`dsdistill.demo.demo_config`: same data, steps, seed, LR
schedule, models) with one change, launched through the real DeepSpeed launcher on 2 CPU ranks; the
number is the student's final eval perplexity from its metrics stream. The same variants on your own
run: `--set curriculum.weights='{kd: 0.7, lm: 0.3}'` (or drop any component from the default schedule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsdistill.curriculum import CurriculumConfig  # noqa: E402
from dsdistill.demo import _launch, default_cache, demo_config, ensure_assets, no_teacher_config, summarize  # noqa: E402
from dsdistill.schema import METRICS_FILE  # noqa: E402

FAMILIES = {
    "hidden-state terms": ("feature", "layerwise", "routing_feature"),
    "attention terms": ("attention", "routing_attention_alignment"),
    "contrastive": ("contrastive",),
    "router terms": ("routing_feature", "routing_load_balance", "routing_attention_alignment"),
}
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tv")
SEED_DESIGN = "previous default (kd 0.7 / lm 0.3, temperature 3)"


def default_weights() -> dict:
    return CurriculumConfig().model_dump(mode="json")["weights"]


def variants(only: str) -> dict[str, dict]:
    """Name -> changes to the demo config (a curriculum and/or loss options)."""
    if only == "divergences":
        return {f"default with kd divergence {d}": {"loss": {"kd": {"divergence": d}}} for d in DIVERGENCES[1:]}
    if only == "on-policy":
        # the demo's documents as prompt (first sentence) / completion (the rest), so there are prompts to
        # complete; every row probes the student's own completions at each eval (generation.eval_prompts)
        gen = {"max_new_tokens": 32, "eval_prompts": 16}
        data = {"format": "prompt_completion", "packing": "none"}
        out = {
            f"on_policy {v:g}": {"curriculum": {"on_policy": v}, "generation": gen, "data": data, "_pairs": True}
            for v in (0.0, 0.5, 1.0)
        }
        # what the README advises for on-policy: a mode-seeking divergence, and no LM term on own samples
        for v in (0.0, 1.0):
            out[f"on_policy {v:g}, kd jsd, kd only"] = {
                "curriculum": {"on_policy": v, "weights": {"kd": 1.0}},
                "loss": {"kd": {"divergence": "jsd"}},
                "generation": gen,
                "data": data,
                "_pairs": True,
            }
        return out
    if only == "seed-design":
        return {SEED_DESIGN: {"curriculum": {"weights": {**default_weights(), "kd": 0.7, "lm": 0.3}, "temperature": 3.0}}}
    out: dict[str, dict] = {
        "same student without the teacher (LM only)": {"curriculum": {"weights": {"lm": 1.0}}},
        "default curriculum (distilled)": {},
    }
    if only == "headline":
        return out
    out["KD only"] = {"curriculum": {"weights": {"kd": 1.0}}}
    out["KD + LM (0.7 / 0.3)"] = {"curriculum": {"weights": {"kd": 0.7, "lm": 0.3}}}
    for family, names in FAMILIES.items():
        out[f"default without {family}"] = {
            "curriculum": {"weights": {k: v for k, v in default_weights().items() if k not in names}}
        }
    for d in DIVERGENCES[1:]:
        out[f"default with kd divergence {d}"] = {"loss": {"kd": {"divergence": d}}}
    return out


def run_variant(paths, root: Path, name: str, change: dict, seed: int, steps: int) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    run_dir = root / f"seed{seed}" / slug
    cfg = demo_config(paths, run_dir, steps=steps, seed=seed)
    if change.get("curriculum", {}).get("weights") == {"lm": 1.0}:
        cfg = no_teacher_config(cfg)
        run_dir = Path(cfg["output"]["run_dir"])
    if change.get("_pairs"):
        cfg["data"]["path"] = str(prompt_completion_corpus(Path(cfg["data"]["path"])))
    for section, values in change.items():
        if not section.startswith("_"):
            cfg[section] = {**cfg.get(section, {}), **values}
    t0 = time.time()
    rc = _launch(cfg, run_dir / "run.yaml", nprocs=2)
    if rc != 0:
        raise SystemExit(f"demo_quality: {name} (seed {seed}) failed with exit code {rc}")
    s = summarize(run_dir / METRICS_FILE)
    return {
        "ppl": s["last_ppl"],
        "teacher_ppl": s["teacher_ppl"],
        "seconds": time.time() - t0,
        **{k: s[k] for k in ("reverse_kl", "mean_length", "stop_rate") if k in s},
    }


def prompt_completion_corpus(corpus: Path) -> Path:
    """The demo corpus as prompt_completion rows: the first sentence prompts, the rest completes."""
    out = corpus.with_name("corpus-pairs.jsonl")
    if not out.exists():
        rows = []
        for line in corpus.read_text().splitlines():
            text = json.loads(line)["text"]
            cut = text.find(" . ") + 2
            if 1 < cut < len(text):
                rows.append(json.dumps({"prompt": text[:cut], "completion": text[cut:]}))
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(rows) + "\n")
        tmp.rename(out)
    return out


def on_policy_table(results: dict[str, list[dict]]) -> list[str]:
    """Eval ppl on the held-out completions and the student's own completions as the teacher scores them."""
    lines = [
        "| run | eval ppl | reverse KL of own samples (nats/token) | mean length | stop rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in results.items():
        cells = [
            _fmt([r[k] for r in rs]) if all(k in r for r in rs) else "-"
            for k in ("ppl", "reverse_kl", "mean_length", "stop_rate")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", choices=["headline", "all", "divergences", "seed-design", "on-policy"], default="all")
    ap.add_argument("--merge", default=None, help="a --json file of an earlier run whose variants join the table")
    ap.add_argument("--root", default="runs/quality", help="where the runs go")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args(argv)
    paths = ensure_assets(default_cache())
    results: dict[str, list[dict]] = json.loads(Path(args.merge).read_text()) if args.merge else {}
    for name, change in variants(args.only).items():
        if len(results.get(name, [])) >= len(args.seeds):
            continue  # measured in the --merge file
        for seed in args.seeds:
            r = run_variant(paths, Path(args.root), name, change, seed, args.steps)
            results.setdefault(name, []).append(r)
            print(f"demo_quality: {name} seed {seed}: eval ppl {r['ppl']:.3f} ({r['seconds']:.0f}s)", flush=True)
    if args.only == "on-policy":
        print("\n".join(on_policy_table(results)))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0
    if "default curriculum (distilled)" not in results:
        return 0
    teacher = [r["teacher_ppl"] for r in results["default curriculum (distilled)"]]
    alone = [r["ppl"] for r in results["same student without the teacher (LM only)"]]
    lines = [
        f"Seeds {', '.join(map(str, args.seeds))}; {args.steps} optimizer steps; eval perplexity of the student at the "
        "last step (mean ± half the range over seeds).",
        "",
        "| run | eval ppl | vs without the teacher |",
        "|---|---:|---:|",
        f"| teacher | {_fmt(teacher)} | |",
    ]
    for name, rs in results.items():
        ppl = [r["ppl"] for r in rs]
        gains = [1 - p / a for p, a in zip(ppl, alone)]
        lines.append(f"| {name} | {_fmt(ppl)} | {statistics.fmean(gains) * 100:+.1f}% (min {min(gains) * 100:+.1f}%) |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
