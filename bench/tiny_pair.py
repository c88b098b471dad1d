"""A tiny teacher and student (Llama-style, from configs) with a word-level tokenizer and a corpus, written
to a folder: what the in-process benchmarks train on."""

from __future__ import annotations

from pathlib import Path

from dsdistill.demo import build_tokenizer, tiny_llama, write_corpus


def write_tiny_pair(root: Path, *, teacher: tuple[int, int], student: tuple[int, int], documents: int, max_pos: int) -> None:
    """`root`/corpus.jsonl, `root`/teacher and `root`/student; teacher and student are (width, layers)."""
    write_corpus(root / "corpus.jsonl", documents=documents, seed=3)
    tok = build_tokenizer(root / "tokenizer")
    for name, ((width, layers), seed) in {"teacher": (teacher, 1), "student": (student, 2)}.items():
        model = tiny_llama(len(tok), hidden=width, layers=layers, heads=4, kv_heads=2, max_pos=max_pos, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
