"""What a teacher with another tokenizer buys on the demo: a byte-level BPE teacher distilled into the demo's
word-level student (`teacher.cross_tokenizer`), against the same student without a teacher, over seeds; the
same-tokenizer teacher in the same setting beside it. Writes the cross-tokenizer table of docs/quality.md.

    DS_ACCELERATOR=cpu python bench/cross_quality.py            # 3 seeds (~12 min on 2 cores)

The demo's assets (`dsdistill.demo.ensure_assets`) plus a BPE teacher trained here exactly as the demo's
teacher is (same shape, steps and corpus, `pretrain`), with a tokenizer learned from that corpus
(`build_bpe_tokenizer`), cached beside them. Every run is the demo's run config (`demo_config`) with KD + LM
(0.9 / 0.1: a cross-tokenizer teacher serves no hidden-state term) and `data.packing: documents` (what a
cross-tokenizer run packs), launched on 2 CPU ranks; the number is the student's last eval perplexity, on the
student's tokens of the same held-out split in every run.
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

from bench.demo_quality import _fmt  # noqa: E402  (mean ± half the range, as in docs/quality.md's other tables)
from dsdistill.demo import (  # noqa: E402
    _launch,
    build_bpe_tokenizer,
    default_cache,
    demo_config,
    ensure_assets,
    no_teacher_config,
    pretrain,
    summarize,
    tiny_llama,
)
from dsdistill.schema import METRICS_FILE  # noqa: E402

KD_LM = {"weights": {"kd": 0.9, "lm": 0.1}}


def bpe_teacher(cache: Path, *, steps: int = 1000, vocab: int = 2000, seed: int = 1) -> Path:
    """The demo teacher's twin with a byte-level BPE tokenizer (initialised with `seed`; the demo's is 1),
    trained once and cached."""
    out = cache / ("teacher-bpe" if seed == 1 else f"teacher-bpe-{seed}")
    if (out / "config.json").exists():
        return out
    import torch

    torch.set_num_threads(2)
    corpus = cache / "teacher-corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = build_bpe_tokenizer(out.with_suffix(".tmp"), texts, vocab_size=vocab)
    model = tiny_llama(len(tok), hidden=128, layers=4, heads=4, kv_heads=2, seed=seed)
    t0 = time.time()
    final = pretrain(model, tok, corpus, steps=steps)
    print(f"cross_quality: BPE teacher ({len(tok)} tokens) trained in {time.time() - t0:.0f}s (final LM loss {final:.3f})")
    model.save_pretrained(out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)
    return out


def word_teacher(cache: Path, paths, *, seed: int, steps: int = 1000) -> Path:
    """The demo's own teacher (word-level tokenizer) initialised with another seed, trained as the demo's is."""
    if seed == 1:
        return paths["teacher"]
    out = cache / f"teacher-{seed}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = tiny_llama(len(tok), hidden=128, layers=4, heads=4, kv_heads=2, seed=seed)
    pretrain(model, tok, cache / "teacher-corpus.jsonl", steps=steps)
    model.save_pretrained(out.with_suffix(".tmp"))
    tok.save_pretrained(out.with_suffix(".tmp"))
    out.with_suffix(".tmp").rename(out)
    return out


def run(
    paths, root: Path, name: str, seed: int, steps: int, *, teacher: Path | None, cross: bool, temperature: float = 1.0
) -> dict:
    run_dir = root / f"seed{seed}" / name
    cfg = demo_config(paths, run_dir, steps=steps, seed=seed)
    cfg["data"]["packing"] = "documents"
    cfg["curriculum"] = {**KD_LM, "temperature": temperature}
    if teacher is None:
        cfg = no_teacher_config(cfg)
        run_dir = Path(cfg["output"]["run_dir"])
    else:
        cfg["teacher"] = {"path": str(teacher), **({"cross_tokenizer": {"top_k": 64}} if cross else {})}
    t0 = time.time()
    rc = _launch(cfg, run_dir / "run.yaml", nprocs=2)
    if rc != 0:
        raise SystemExit(f"cross_quality: {name} (seed {seed}) failed with exit code {rc}")
    s = summarize(run_dir / METRICS_FILE)
    return {"ppl": s["last_ppl"], "teacher_ppl": s["teacher_ppl"], "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("/tmp/dsdistill-cross-quality"))
    ap.add_argument("--teacher-seed", type=int, default=1, help="both teachers' initialisation seed (the demo's: 1)")
    ap.add_argument("--temperature", type=float, default=1.0, help="the KD temperature of the distilled runs")
    args = ap.parse_args(argv)
    cache = default_cache()
    paths = ensure_assets(cache)
    teacher = bpe_teacher(cache, seed=args.teacher_seed)
    same = word_teacher(cache, paths, seed=args.teacher_seed)
    out = args.out if args.teacher_seed == 1 else args.out / f"teachers-{args.teacher_seed}"
    if args.temperature != 1.0:
        out = out / f"T{args.temperature:g}"
    runs = {
        "same student without the teacher (LM only)": dict(teacher=None, cross=False),
        "distilled from the same-tokenizer teacher": dict(teacher=same, cross=False),
        "distilled from the BPE teacher (cross-tokenizer)": dict(teacher=teacher, cross=True),
        "the same-tokenizer teacher through the cross-tokenizer path": dict(teacher=same, cross=True),
    }
    results: dict[str, list[dict]] = {n: [] for n in runs}
    for seed in args.seeds:
        for i, (name, how) in enumerate(runs.items()):
            r = run(paths, out, f"run{i}", seed, args.steps, **how, temperature=args.temperature)
            results[name].append(r)
            print(f"seed {seed}: {name}: eval ppl {r['ppl']:.3f} (teacher {r['teacher_ppl']}) in {r['seconds']:.0f}s", flush=True)
    alone = [r["ppl"] for r in results["same student without the teacher (LM only)"]]
    print("\n| run | eval ppl (student's tokens) | lower than without the teacher (worst seed) | teacher ppl (its own tokens) |")
    print("|---|---:|---:|---:|")
    for name, rs in results.items():
        ppl = [r["ppl"] for r in rs]
        drops = [1 - p / a for p, a in zip(ppl, alone)]
        gain = f"{statistics.fmean(drops):.1%} (worst {min(drops):.1%})" if rs[0]["teacher_ppl"] else ""
        teach = _fmt([r["teacher_ppl"] for r in rs]) if rs[0]["teacher_ppl"] else ""
        print(f"| {name} | {_fmt(ppl)} | {gain} | {teach} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
