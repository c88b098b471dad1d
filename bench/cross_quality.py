"""What a teacher with another tokenizer buys on the demo: a byte-level BPE teacher distilled into the demo's
word-level student (`teacher.cross_tokenizer`), against the same student without a teacher, over seeds; the
same-tokenizer teacher in the same setting beside it. Writes the cross-tokenizer table of docs/quality.md.

    DS_ACCELERATOR=cpu python bench/cross_quality.py            # 3 seeds (~15 min on 2 cores)
    DS_ACCELERATOR=cpu python bench/cross_quality.py --bpe-vocab 300 --only 0 2 4   # a BPE that splits words
    DS_ACCELERATOR=cpu python bench/cross_quality.py --teacher-steps 3000            # teachers trained longer

The demo's assets (`dsdistill.demo.ensure_assets`) plus a BPE teacher trained here exactly as the demo's
teacher is (same shape, steps and corpus, `pretrain`), with a tokenizer learned from that corpus
(`build_bpe_tokenizer`), cached beside them. Rows: the student alone, the same-tokenizer teacher, the BPE
teacher by `shared_topk`, the same-tokenizer teacher through the cross path, the BPE teacher by
`chunk_likelihood` (`--only` picks some by index; row 0 is every table's control). Every run is the demo's
run config (`demo_config`) with KD + LM (0.9 / 0.1 unless `--kd-weight`: a cross-tokenizer teacher serves no
hidden-state term) and `data.packing: documents` (what a
cross-tokenizer run packs), launched on 2 CPU ranks; the number is the student's last eval perplexity, on the
student's tokens of the same held-out split in every run.
"""

from __future__ import annotations

import argparse
import json
import shutil
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


def _suffix(seed: int, steps: int) -> str:
    return ("" if seed == 1 else f"-{seed}") + ("" if steps == 1000 else f"-s{steps}")


def bpe_teacher(cache: Path, *, steps: int = 1000, vocab: int = 2000, seed: int = 1) -> Path:
    """The demo teacher's twin with a byte-level BPE tokenizer (initialised with `seed`; the demo's is 1),
    trained once and cached. `vocab` caps the tokenizer (the demo corpus learns 455 tokens below 2,000; a cap
    of a few hundred leaves most words in several pieces)."""
    out = cache / ("teacher-bpe" + _suffix(seed, steps) + ("" if vocab == 2000 else f"-v{vocab}"))
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
    if seed == 1 and steps == 1000:
        return paths["teacher"]
    out = cache / f"teacher{_suffix(seed, steps)}"
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
    paths,
    root: Path,
    name: str,
    seed: int,
    steps: int,
    *,
    teacher: Path | None,
    cross: bool,
    temperature: float = 1.0,
    method: str = "shared_topk",
    kd_weight: float = 0.9,
) -> dict:
    run_dir = root / f"seed{seed}" / name
    cfg = demo_config(paths, run_dir, steps=steps, seed=seed)
    cfg["data"]["packing"] = "documents"
    cfg["curriculum"] = {"weights": {"kd": kd_weight, "lm": round(1.0 - kd_weight, 6)}, "temperature": temperature}
    if teacher is None:
        cfg = no_teacher_config(cfg)
        run_dir = Path(cfg["output"]["run_dir"])
    else:
        crossed = {"top_k": 64} if method == "shared_topk" else {"method": method}
        cfg["teacher"] = {"path": str(teacher), **({"cross_tokenizer": crossed} if cross else {})}
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier invocation's run would resume, not rerun
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
    ap.add_argument("--teacher-steps", type=int, default=1000, help="both teachers' pretraining steps (the demo's: 1000)")
    ap.add_argument("--kd-weight", type=float, default=0.9, help="KD's weight in the distilled runs (LM takes the rest)")
    ap.add_argument("--only", type=int, nargs="+", help="run only these rows (0-based; row 0, the control, is needed)")
    ap.add_argument("--bpe-vocab", type=int, default=2000, help="the BPE tokenizer's size cap (below ~450 it splits words)")
    args = ap.parse_args(argv)
    cache = default_cache()
    paths = ensure_assets(cache)
    teacher = bpe_teacher(cache, seed=args.teacher_seed, steps=args.teacher_steps, vocab=args.bpe_vocab)
    same = word_teacher(cache, paths, seed=args.teacher_seed, steps=args.teacher_steps)
    out = (
        args.out / f"teachers{_suffix(args.teacher_seed, args.teacher_steps)}"
        if _suffix(args.teacher_seed, args.teacher_steps)
        else args.out
    )
    if args.bpe_vocab != 2000:
        out = out / f"v{args.bpe_vocab}"
    if args.kd_weight != 0.9:
        out = out / f"kd{args.kd_weight:g}"
    if args.temperature != 1.0:
        out = out / f"T{args.temperature:g}"
    runs = {
        "same student without the teacher (LM only)": dict(teacher=None, cross=False),
        "distilled from the same-tokenizer teacher": dict(teacher=same, cross=False),
        "distilled from the BPE teacher (cross-tokenizer)": dict(teacher=teacher, cross=True),
        "the same-tokenizer teacher through the cross-tokenizer path": dict(teacher=same, cross=True),
        "distilled from the BPE teacher (cross-tokenizer, chunk_likelihood)": dict(
            teacher=teacher, cross=True, method="chunk_likelihood"
        ),
    }
    keep = [i for i in range(len(runs)) if not args.only or i in args.only]
    results: dict[str, list[dict]] = {n: [] for i, n in enumerate(runs) if i in keep}
    for seed in args.seeds:
        for i, (name, how) in enumerate(runs.items()):
            if i not in keep:
                continue
            r = run(paths, out, f"run{i}", seed, args.steps, **how, temperature=args.temperature, kd_weight=args.kd_weight)
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
