"""Two tokenisations of one text, cut into chunks that cover the same characters (cross-tokenizer distillation).

Each tokenizer's fast offsets give every token a character span. A token is taken to own the text from the
end of the token before it to its own end, so the whitespace a tokenizer drops (WordPiece) or leaves outside
its offsets (byte-level BPE with trimmed offsets) belongs to the token after it, and the tokens of one
tokenizer tile the text. A chunk runs between two consecutive positions where both tilings cut. The tokens of
a multi-byte character split over several byte-level tokens share one span, so they never fall into different
chunks. Zero-width tokens (a BOS or EOS the post-processor adds, with no text) belong to no chunk.

The first token of every chunk starts at the same character in both sequences, so the positions that predict
those tokens have read the same text: those are the pairs a cross-tokenizer KD term compares
(`Alignment.pairs`). A chunk of one token on each side whose two tokens add the same text is an exact pair;
the rest is what span merging or a distribution-free term must handle. What a token adds depends on where it
starts when one tokenizer keeps spaces inside its tokens (byte-level BPE, SentencePiece) and the other drops
them (word-level, WordPiece): after a space, ` likes` of the one is `likes` of the other. So the shared
vocabulary is taken per context (`CONTEXTS`, `pair_contexts`) for such a pair of tokenizers, and by bytes
alone otherwise (one tokenizer on both sides pairs every id with itself).

`project_sequence` turns the teacher's distribution at each pair into a top-k + rest teacher over the
student's vocabulary (`SparseTeacher`, what a cache or a server gives), so a teacher with another tokenizer
can feed the same KD path as any sparse teacher.
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


def _spec(tok) -> dict:
    import json

    return json.loads(tok.backend_tokenizer.to_str())


def _byte_level(tok) -> bool:
    return "ByteLevel" in str(_spec(tok).get("decoder") or {})


def spaced(tok) -> bool:
    """Whether the tokenizer keeps spaces inside its tokens (byte-level BPE's `Ġ`, SentencePiece's `▁`), as
    opposed to dropping them between words (word-level, WordPiece)."""
    spec = _spec(tok)
    return (
        _byte_level(tok) or "Metaspace" in str(spec.get("decoder") or {}) or "Metaspace" in str(spec.get("pre_tokenizer") or {})
    )


def token_bytes(tok) -> list[bytes]:
    """Each id's text as bytes: a byte-level token's own bytes (a lone byte of a multi-byte character too),
    a SentencePiece token's with `▁` as a space, otherwise what the token decodes to alone (WordPiece's
    `##` dropped); special tokens as written."""
    table = _byte_alphabet() if _byte_level(tok) else None
    metaspace = not table and spaced(tok)
    prefix = _continuation(tok)
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
        elif metaspace:
            out.append(piece.replace("\u2581", " ").encode())
        elif prefix and piece.startswith(prefix):
            out.append(piece[len(prefix) :].encode())  # a word's continuation, as it reads inside the word
        else:
            out.append(tok.convert_tokens_to_string([piece]).encode())
    return out


CONTEXTS = ("space", "word", "other")
"""Where a pair's next token starts: after one space, right after a letter or digit, or anywhere else."""


def _continuation(tok) -> str:
    return str((_spec(tok).get("model") or {}).get("continuing_subword_prefix") or "")


def _keys(tok, context: str) -> dict[tuple[bool, bytes], int]:
    """The text each token adds at a position in `context` (bytes, first id of each), for comparing a
    tokenizer that keeps spaces with one that drops them: after a space, a spaced tokenizer's next token
    starts with it and a dropping one's next token is a word start that the space precedes; right after a
    letter, a dropping tokenizer continues the word (`##` pieces, if it has them)."""
    raw, keep = token_bytes(tok), spaced(tok)
    prefix = _continuation(tok)
    pieces = [tok.convert_ids_to_tokens(i) or "" for i in range(len(tok))]
    out: dict[tuple[bool, bytes], int] = {}
    for i, (b, piece) in enumerate(zip(raw, pieces)):
        if not b:
            continue
        lead = b[:1].isspace()
        if keep:
            key = b if (context == "space") == lead else None
        else:
            cont = bool(prefix) and piece.startswith(prefix)
            if context == "space":
                key = None if cont or lead else b" " + b
            elif context == "word" and prefix:
                key = b if cont else None
            else:
                key = None if cont else b
        if key is not None:
            out.setdefault((False, key), i)
    return out


def shared_vocabulary(student_tokenizer, teacher_tokenizer, context: str = "any") -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of the tokens that add the same text. When both tokenizers keep spaces in
    their tokens, or both drop them, that is the same bytes (`token_bytes`) in any context, and one tokenizer
    on both sides pairs every id with itself. When one keeps and one drops spaces, what a token adds depends
    on where it starts: `context` (one of `CONTEXTS`) says where."""

    def by_bytes(tok) -> dict[tuple[bool, bytes], int]:
        # a word's continuation (WordPiece's `##ed`) is another token than the word `ed`
        prefix = _continuation(tok)
        out: dict[tuple[bool, bytes], int] = {}
        for i, raw in enumerate(token_bytes(tok)):
            if raw:
                piece = tok.convert_ids_to_tokens(i) or ""
                out.setdefault((bool(prefix) and piece.startswith(prefix), raw), i)
        return out

    if context == "any" or spaced(student_tokenizer) == spaced(teacher_tokenizer):
        s, t = by_bytes(student_tokenizer), by_bytes(teacher_tokenizer)
    else:
        s, t = _keys(student_tokenizer, context), _keys(teacher_tokenizer, context)
    common = sorted(set(s) & set(t))
    return np.array([s[x] for x in common], dtype=np.int64), np.array([t[x] for x in common], dtype=np.int64)


def pair_contexts(text: str, alignment: Alignment) -> np.ndarray:
    """The context (an index into `CONTEXTS`, or -1: none compares) of each pair of `alignment.pairs()`: a
    chunk that opens with one space then text is "space"; one that opens with other whitespace (a newline, a
    run of spaces) has no counterpart token on a tokenizer that drops whitespace, so -1; else "word" right
    after a letter or digit, "other" otherwise."""
    keep = (alignment.s_start > 0) & (alignment.t_start > 0)
    out = []
    for lo, _ in alignment.spans[keep]:
        head = text[lo : lo + 2]
        if head[:1] == " " and head[1:2] and not head[1].isspace():
            out.append(0)
        elif head[:1].isspace():
            out.append(-1)
        else:
            out.append(1 if lo > 0 and text[lo - 1].isalnum() else 2)
    return np.array(out, dtype=np.int64)


@dataclass(frozen=True)
class SharedMaps:
    """The shared vocabulary of a student and a teacher tokenizer, built once (it reads every token of both):
    one map when both keep spaces in their tokens or both drop them, else one per context."""

    same: bool
    maps: dict[str, tuple[np.ndarray, np.ndarray]]
    """"any" (when `same`), else each of `CONTEXTS` -> (student ids, teacher ids)."""

    def of(self, context: int) -> tuple[np.ndarray, np.ndarray]:
        """The map of a pair whose context is `CONTEXTS[context]` (an index from `pair_contexts`)."""
        return self.maps["any"] if self.same else self.maps[CONTEXTS[context]]

    def contexts(self, text: str, alignment: Alignment) -> np.ndarray:
        """`pair_contexts` where the maps differ by context; else 0 for every pair (any pair compares)."""
        if self.same:
            return np.zeros(len(alignment.pairs()[0]), dtype=np.int64)
        return pair_contexts(text, alignment)


def shared_maps(student_tokenizer, teacher_tokenizer) -> SharedMaps:
    same = spaced(student_tokenizer) == spaced(teacher_tokenizer)
    names = ("any",) if same else CONTEXTS
    return SharedMaps(same, {c: shared_vocabulary(student_tokenizer, teacher_tokenizer, c) for c in names})


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
    """Share of the student's text-bearing tokens that open a chunk with a position before it on both sides
    (what a KD pair compares; a text's first chunk has none)."""


def plan(student_tokenizer, teacher_tokenizer, texts: Sequence[str]) -> Plan:
    s_shared, _ = shared_vocabulary(student_tokenizer, teacher_tokenizer)
    maps = shared_maps(student_tokenizer, teacher_tokenizer)
    by_context = [dict(zip(*(x.tolist() for x in maps.of(c)))) for c in range(len(CONTEXTS))]
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
        s_ids, t_ids = s["input_ids"], t["input_ids"]
        opens = np.nonzero((a.s_start > 0) & (a.t_start > 0))[0]
        opened += len(opens)
        single = a.one_to_one()
        for k, context in zip(opens, maps.contexts(text, a)):
            if context >= 0 and single[k]:
                exact += by_context[context].get(s_ids[a.s_start[k]]) == t_ids[a.t_start[k]]
    return Plan(
        examples=len(texts),
        unaligned=unaligned,
        shared_share=len(s_shared) / len(student_tokenizer),
        teacher_per_student=t_tokens / s_tokens if s_tokens else 0.0,
        exact_share=exact / s_tokens if s_tokens else 0.0,
        pair_share=opened / s_tokens if s_tokens else 0.0,
    )


def project(teacher_logp, student_ids, teacher_ids, *, top_k: int, temperatures: Sequence[float] = ()):
    """The teacher's next-token distributions at some positions ([P, Vt] log-probabilities at T = 1), as a
    `SparseTeacher` over the student's vocabulary: per position the top-k of the tokens both vocabularies
    share (`student_ids[j]` adds what `teacher_ids[j]` adds), with every other token's mass, shared or not, in
    the rest bucket, and the tail statistics at `temperatures`. Then the student's KD machinery (fused head,
    cache, server) compares it as it compares any top-k + rest teacher."""
    import torch

    from dsdistill.losses.fused import SparseTeacher

    t_ids = torch.as_tensor(teacher_ids, device=teacher_logp.device)
    s_ids = torch.as_tensor(student_ids, device=teacher_logp.device)
    k = min(top_k, len(t_ids))
    logp, pick = teacher_logp.index_select(1, t_ids).topk(k, dim=-1)
    tail = teacher_logp.scatter(-1, t_ids[pick], float("-inf"))
    tails = [torch.logsumexp(tail / t, dim=-1) for t in temperatures]
    return SparseTeacher(
        ids=s_ids[pick],
        logp=logp,
        log_rest=torch.logsumexp(tail, dim=-1),
        tails=torch.stack(tails, dim=-1) if tails else None,
        temperatures=tuple(temperatures),
    )


def project_sequence(teacher_logits, alignment: Alignment, text: str, maps: SharedMaps, *, top_k: int, temperatures=()):
    """(student positions, `SparseTeacher` rows in that order) for one sequence: the teacher's distribution at
    each aligned pair, over the student's vocabulary by the shared map of the pair's context (`maps`, built
    once per tokenizer pair). A pair with no counterpart tokens (-1 in `pair_contexts`) gives no row: KD there
    has nothing to compare, so it is left out (its position's weight is 0), and the LM term still counts it."""
    import torch

    sp, tp = alignment.pairs()
    contexts = maps.contexts(text, alignment)
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    used = sorted(set(contexts.tolist()) - {-1})
    k = min([top_k] + [len(maps.of(c)[0]) for c in used])  # one k for every row
    positions, parts = [], []
    for c in used:
        at = np.nonzero(contexts == c)[0]
        rows = logp.index_select(0, torch.as_tensor(tp[at], device=logp.device))
        parts.append(project(rows, *maps.of(c), top_k=k, temperatures=temperatures))
        positions.append(sp[at])
    if not parts:
        return np.zeros(0, dtype=np.int64), None
    order = np.argsort(np.concatenate(positions), kind="stable")
    cat = lambda xs: torch.cat(xs)[torch.as_tensor(order)]  # noqa: E731
    from dsdistill.losses.fused import SparseTeacher

    tails = cat([p.tails for p in parts]) if parts[0].tails is not None else None
    merged = SparseTeacher(
        cat([p.ids for p in parts]), cat([p.logp for p in parts]), cat([p.log_rest for p in parts]), tails, parts[0].temperatures
    )
    return np.concatenate(positions)[order], merged
