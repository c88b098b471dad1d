"""Cross-tokenizer alignment cost per token, per CPU core: the demo corpus tokenised by its word-level
tokenizer (student) and by a byte-level BPE trained on it (teacher), then cut into common chunks.

    python bench/align_cost.py                     # 2,000 documents
    python bench/align_cost.py --documents 5000 --vocab 1000

Prints CPU microseconds per student token for the alignment alone and for tokenising both sides with
offsets (what a cross-tokenizer data path adds), best of 3, and the alignment plan (`crosstok.plan`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsdistill.crosstok import align, plan  # noqa: E402
from dsdistill.demo import build_bpe_tokenizer, build_tokenizer, write_corpus  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=2000)
    ap.add_argument("--vocab", type=int, default=300, help="the BPE teacher tokenizer's vocabulary size")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(Path(tmp) / "corpus.jsonl", documents=args.documents)
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        student = build_tokenizer(Path(tmp) / "student")
        teacher = build_bpe_tokenizer(Path(tmp) / "teacher", texts, vocab_size=args.vocab)
    enc = {}

    def tokenise() -> None:
        enc["s"] = student(texts, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        enc["t"] = teacher(texts, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]

    t_tok = best_of(tokenise)
    t_align = best_of(lambda: [align(s, t) for s, t in zip(enc["s"], enc["t"])])
    tokens = sum(len(s) for s in enc["s"])
    p = plan(student, teacher, texts[:500])
    print(f"{len(texts)} documents, {tokens} student tokens ({p.teacher_per_student:.2f} teacher tokens per student token)")
    print(f"align:             {1e6 * t_align / tokens:.3f} CPU-us per student token ({tokens / t_align:,.0f} tokens/s)")
    print(f"tokenise both:     {1e6 * t_tok / tokens:.3f} CPU-us per student token")
    print(
        f"plan: shared vocabulary {p.shared_share:.1%} of the student's, exact positions {p.exact_share:.1%}, "
        f"KD pairs {p.pair_share:.1%}, unaligned examples {p.unaligned} of {p.examples}"
    )


if __name__ == "__main__":
    main()
