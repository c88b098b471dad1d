"""Two tokenisations of one text, cut into chunks that cover the same characters (cross-tokenizer distillation).

Each tokenizer's fast offsets give every token a character span. A token is taken to own the text from the
end of the token before it to its own end, so the whitespace a tokenizer drops (WordPiece) or leaves outside
its offsets (byte-level BPE with trimmed offsets) belongs to the token after it, and the tokens of one
tokenizer tile the text. A chunk runs between two consecutive positions where both tilings cut. The tokens of
a multi-byte character split over several byte-level tokens share one span, so they never fall into different
chunks. Zero-width tokens (a BOS or EOS the post-processor adds, with no text) belong to no chunk.

The first token of every chunk starts at the same character in both sequences, so the positions that predict
those tokens have read the same text: those are the pairs a cross-tokenizer KD term compares
(`Alignment.pairs`). A chunk of one token on each side whose strings both vocabularies share is an exact
pair; the rest is what span merging or a distribution-free term must handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Alignment:
    """Chunk k covers characters `spans[k]`, student tokens `student[k]:student[k+1]`-style ranges
    (`s_start[k]`, `s_end[k]`) and teacher tokens (`t_start[k]`, `t_end[k]`)."""

    spans: np.ndarray
    """[chunks, 2] character spans."""
    s_start: np.ndarray
    s_end: np.ndarray
    t_start: np.ndarray
    t_end: np.ndarray
    s_tokens: int
    t_tokens: int

    def __len__(self) -> int:
        return len(self.spans)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(student positions, teacher positions) that predict the first token of a chunk, for every chunk
        that has a position before it on both sides (a chunk that opens either sequence has none)."""
        keep = (self.s_start > 0) & (self.t_start > 0)
        return self.s_start[keep] - 1, self.t_start[keep] - 1

    def one_to_one(self) -> np.ndarray:
        """Chunks of exactly one token on each side."""
        return (self.s_end - self.s_start == 1) & (self.t_end - self.t_start == 1)

    def aligned_share(self) -> float:
        """Share of the student's text-bearing tokens that open a chunk (what a KD pair covers)."""
        covered = int((self.s_end - self.s_start).sum())
        return len(self) / covered if covered else 0.0


def _tiling(offsets: Offsets) -> tuple[np.ndarray, np.ndarray]:
    """(token ends, indices) of the tokens that carry text, in order."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    idx = np.nonzero(spans[:, 1] > spans[:, 0])[0]
    ends = spans[idx, 1]
    if len(ends) > 1 and (np.diff(ends) < 0).any():
        raise ValueError("token offsets go backwards; expected the offsets of one left-to-right tokenisation")
    return ends, idx


def align(student: Offsets, teacher: Offsets) -> Alignment:
    """Chunks of `student` and `teacher` tokens (their character offsets into one text) that cover the same
    characters; tokens past the shorter tiling's end (a truncated sequence) belong to no chunk."""
    s_ends, s_idx = _tiling(student)
    t_ends, t_idx = _tiling(teacher)
    limit = min(s_ends[-1] if len(s_ends) else 0, t_ends[-1] if len(t_ends) else 0)
    cuts = np.intersect1d(s_ends[s_ends <= limit], t_ends[t_ends <= limit])  # sorted, unique
    starts = np.concatenate([[0], cuts[:-1]]) if len(cuts) else np.zeros(0, dtype=np.int64)

    def ranges(ends: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the tokens of chunk k are those whose end lies in (cut[k-1], cut[k]]: an index range of `idx`
        hi = np.searchsorted(ends, cuts, side="right")
        lo = np.concatenate([[0], hi[:-1]]) if len(hi) else hi
        first = idx[lo] if len(lo) else lo
        last = idx[hi - 1] + 1 if len(hi) else hi
        return first, last

    s_start, s_end = ranges(s_ends, s_idx)
    t_start, t_end = ranges(t_ends, t_idx)
    return Alignment(
        spans=np.stack([starts, cuts], axis=1) if len(cuts) else np.zeros((0, 2), dtype=np.int64),
        s_start=s_start,
        s_end=s_end,
        t_start=t_start,
        t_end=t_end,
        s_tokens=len(student),
        t_tokens=len(teacher),
    )


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: a printable byte stands for itself, any other for chr(256 + its rank)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _byte_level(tok) -> bool:
    import json

    decoder = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
    return "ByteLevel" in json.dumps(decoder)


def token_bytes(tok) -> list[bytes]:
    """Each id's text as bytes: a byte-level token's own bytes (a lone byte of a multi-byte character too),
    otherwise what the token decodes to alone (WordPiece's `##` and SentencePiece's `▁` as the decoder reads
    them); special tokens as written."""
    table = _byte_alphabet() if _byte_level(tok) else None
    specials = set(tok.all_special_tokens) | {str(t) for t in tok.added_tokens_decoder.values()}
    out = []
    for i in range(len(tok)):
        piece = tok.convert_ids_to_tokens(i)
        if piece is None:
            out.append(b"")
        elif piece in specials:
            out.append(piece.encode())
        elif table is not None and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(tok.convert_tokens_to_string([piece]).encode())
    return out


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of the tokens whose bytes (`token_bytes`) both vocabularies have, one pair
    per distinct byte string; with one tokenizer on both sides, every id paired with itself."""

    def by_bytes(tok) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for i, raw in enumerate(token_bytes(tok)):
            if raw:
                out.setdefault(raw, i)
        return out

    s, t = by_bytes(student_tokenizer), by_bytes(teacher_tokenizer)
    common = sorted(set(s) & set(t))
    return np.array([s[x] for x in common], dtype=np.int64), np.array([t[x] for x in common], dtype=np.int64)


@dataclass(frozen=True)
class Plan:
    """How two tokenizers align over sample texts (what `dsdistill check` is to print for a cross-tokenizer run)."""

    examples: int
    unaligned: int
    """Examples with no chunk both sides can be compared on (dropped by a cross-tokenizer run)."""
    shared_share: float
    """Share of the student's vocabulary whose bytes the teacher's vocabulary has."""
    teacher_per_student: float
    """Teacher tokens per student token over the text-bearing tokens."""
    exact_share: float
    """Share of the student's text-bearing tokens in one-token chunks on both sides whose bytes are shared."""
    pair_share: float
    """Share of the student's text-bearing tokens that open a chunk (the positions a KD pair compares)."""


def plan(student_tokenizer, teacher_tokenizer, texts: Sequence[str]) -> Plan:
    s_shared, t_shared = shared_vocabulary(student_tokenizer, teacher_tokenizer)
    pairs = dict(zip(s_shared.tolist(), t_shared.tolist()))
    unaligned = s_tokens = t_tokens = exact = opened = 0
    for text in texts:
        s = student_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        t = teacher_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        a = align(s["offset_mapping"], t["offset_mapping"])
        if len(a.pairs()[0]) == 0:
            unaligned += 1
            continue
        s_tokens += int((a.s_end - a.s_start).sum())
        t_tokens += int((a.t_end - a.t_start).sum())
        opened += len(a)
        s_ids, t_ids = s["input_ids"], t["input_ids"]
        for k in np.nonzero(a.one_to_one())[0]:
            exact += pairs.get(s_ids[a.s_start[k]]) == t_ids[a.t_start[k]]
    return Plan(
        examples=len(texts),
        unaligned=unaligned,
        shared_share=len(s_shared) / len(student_tokenizer),
        teacher_per_student=t_tokens / s_tokens if s_tokens else 0.0,
        exact_share=exact / s_tokens if s_tokens else 0.0,
        pair_share=opened / s_tokens if s_tokens else 0.0,
    )
