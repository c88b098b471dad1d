"""Cross-tokenizer alignment cost per token, per CPU core: the demo corpus tokenised by its word-level
tokenizer (student) and by a byte-level BPE trained on it (teacher), then cut into common chunks.

    python bench/align_cost.py                     # 2,000 documents
    python bench/align_cost.py --documents 5000 --vocab 1000

Prints CPU microseconds per student token for the alignment alone and for tokenising both sides with
offsets (what a cross-tokenizer data path adds), best of 3, and the alignment plan (`crosstok.plan`); then the
whole render path with and without the teacher's side (`formats.TeacherText`), and the per-pair projection a
training step does (`crosstok.project_rows`).
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
    render_cost(student, teacher, texts, tokens)
    projection_cost(student, teacher)
    chunk_cost()


def render_cost(student, teacher, texts: list[str], tokens: int) -> None:
    """The data path a run takes: the text renderer alone, and with the teacher's side (its tokens, the pairs)."""
    from dsdistill.config import FormatFields
    from dsdistill.crosstok import spaced
    from dsdistill.formats import TeacherText, renderer

    src = FormatFields()
    side = TeacherText(teacher, None, same_spacing=spaced(teacher) == spaced(student))
    batch, rows = {"text": texts}, list(range(len(texts)))
    alone = renderer(src, student, field="data", where="bench", ignore_index=-100)
    both = renderer(src, student, field="data", where="bench", ignore_index=-100, teacher=side)
    t_alone = best_of(lambda: alone(batch, rows))
    t_both = best_of(lambda: both(batch, rows))
    print(
        f"render (student alone):       {1e6 * t_alone / tokens:.3f} CPU-us per student token\n"
        f"render (with the teacher's):  {1e6 * t_both / tokens:.3f} CPU-us per student token "
        f"({t_both / t_alone:.1f}x; {tokens / t_both:,.0f} tokens/s per core)"
    )


def projection_cost(student, teacher, rows: int = 1024) -> None:
    """The training step's part: the teacher's logits at `rows` paired positions projected onto the student's
    vocabulary (top-64 + rest), per pair, at the demo's teacher vocabulary and at a Qwen-sized one (the same
    shared map, the teacher's logits widened with tokens no student token shares)."""
    import numpy as np
    import torch

    from dsdistill.crosstok import project_rows, shared_maps

    torch.set_num_threads(1)
    maps = shared_maps(student, teacher)
    contexts = np.random.default_rng(0).integers(0, 3, rows) if not maps.same else np.zeros(rows, dtype=np.int64)
    for vocab in (len(teacher), 151_936):
        logits = torch.randn(rows, vocab)
        t = best_of(lambda x=logits: project_rows(x, contexts, maps, top_k=64, temperatures=(2.0,)))
        print(f"project (teacher vocab {vocab:,}): {1e6 * t / rows:.1f} CPU-us per pair (1 thread)")
    # what the teacher itself spends per position on the same thread: its lm_head GEMM alone (Qwen2.5-1.5B's
    # width), the least of a teacher's forward
    h, w = torch.randn(rows, 1536), torch.randn(151_936, 1536)
    g = best_of(lambda: h @ w.T, repeats=1)
    print(
        f"teacher lm_head GEMM (width 1,536, vocab 151,936): {1e6 * g / rows:.1f} CPU-us per position (1 thread); "
        f"the projection is {t / g:.0%} of it"
    )


def chunk_cost(rows: int = 8, width: int = 2048, vocab: int = 32_000, hidden: int = 512) -> None:
    """`chunk_likelihood`'s parts: the host's chunking of a packed micro-batch (`crosstok.chunks_of`) per student
    token, and the fused head's LM + chunk term (two chunked passes over the rows) against its LM alone (one
    pass) on the same rows, forward and backward, one thread."""
    import numpy as np
    import torch

    from dsdistill.crosstok import chunks_of
    from dsdistill.losses.chunk_likelihood import fused_chunk_likelihood
    from dsdistill.losses.fused import KDOptions, fused_kd_lm

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, (rows, width))
    labels[:, 0] = -100
    t_width = int(width * 1.3)
    x_pos = np.full((rows, width), -1)
    for b in range(rows):  # about 4 in 5 student positions paired, monotone into the teacher's row
        at = np.sort(rng.choice(width - 1, int(0.8 * (width - 1)), replace=False))
        x_pos[b, at] = np.sort(rng.choice(t_width - 1, len(at), replace=False))
    t_labels = rng.integers(0, 100, (rows, t_width))
    t = best_of(lambda: chunks_of(labels, x_pos, t_labels, -100))
    print(
        f"chunks_of ({rows} x {width} student, {rows} x {t_width} teacher): {1e6 * t / (rows * width):.3f} CPU-us per student token"
    )
    ch = chunks_of(labels, x_pos, t_labels, -100)
    n = 1024
    h = torch.randn(n + 1, hidden, requires_grad=True)  # the LM pass reads rows 0..n-1 of a [1, n + 1] row
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    labels_row = torch.cat([targets.new_full((1,), -100), targets])[None]
    chunk_of = torch.from_numpy(ch.s_chunk[:n] - ch.s_chunk[0])
    teacher = -torch.rand(int(chunk_of.max()) + 1) * 3
    options = KDOptions(temperature=1.0, want_kd=False, chunk=1024)

    def lm() -> None:
        fused_kd_lm(h[None], w, None, None, labels_row, coef_kd=0.0, coef_lm=1.0, options=options)[0].backward()

    def chunked() -> None:
        out, _ = fused_chunk_likelihood(h[:n], w, targets, chunk_of, teacher, coef=1.0, coef_lm=1.0, temperature=1.0, chunk=1024)
        out.backward()

    merge_cost(ch, rows * width)
    t_lm = best_of(lm, repeats=2)
    t_chunk = best_of(chunked, repeats=2)
    print(
        f"fused head, {n} rows at vocab {vocab:,}: LM alone {1e3 * t_lm:.0f} CPU-ms, LM + chunk term "
        f"{1e3 * t_chunk:.0f} CPU-ms ({t_chunk / t_lm:.2f}x)"
    )


def merge_cost(ch, tokens: int, k: int = 64, t_vocab: int = 151_936) -> None:
    """`shared_topk`'s span merging (`crosstok.merge_spans`) on a packed micro-batch's pairs, one thread."""
    import numpy as np
    import torch

    from dsdistill.crosstok import merge_spans
    from dsdistill.losses.fused import SparseTeacher

    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(ch.count, k + 1, generator=g), -1)
    rows = SparseTeacher(torch.randint(0, 32_000, (ch.count, k), generator=g), logp[:, :k], logp[:, k])
    merged, sel = ch.to_merge
    table = torch.randint(-1, 32_000, (1, t_vocab), generator=g)
    args = dict(
        next_ids=torch.randint(0, 32_000, (ch.count,), generator=g),
        t_logp=-torch.rand(len(sel), generator=g, dtype=torch.float64),
        t_next=torch.randint(0, t_vocab, (len(sel),), generator=g),
        contexts=np.zeros(ch.count, dtype=np.int64),
        table=table,
    )
    t = best_of(lambda: merge_spans(rows, ch, **args))
    print(f"merge_spans ({ch.count} pairs, {len(merged)} merged, k = {k}): {1e6 * t / tokens:.3f} CPU-us per student token")


if __name__ == "__main__":
    main()
