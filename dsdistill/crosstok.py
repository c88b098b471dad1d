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
can feed the same KD path as any sparse teacher; `merge_spans` then gives a student token that the teacher
spells in several tokens its chain-rule probability. `chunks_of` cuts a packed batch into the chunks between
pairs, which `chunk_likelihood` compares by their likelihoods instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

Offsets = Sequence[tuple[int, int]]
Segments = Sequence[tuple[int, int, int, int]]


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

    def k(self, top_k: int) -> int:
        """Slots per position: `top_k`, or fewer when no context shares that many tokens. A row whose context
        shares fewer holds its own shared tokens and absent slots (`SparseTeacher.absent`) after them."""
        return min(top_k, max(len(s) for s, _ in self.maps.values()))

    def teacher_span(self) -> int:
        """One past the largest teacher id any map holds."""
        return max(int(t.max()) + 1 if len(t) else 0 for _, t in self.maps.values())

    def contexts(self, text: str, alignment: Alignment) -> np.ndarray:
        """`pair_contexts` where the maps differ by context; else 0 for every pair (any pair compares)."""
        if self.same:
            return np.zeros(len(alignment.pairs()[0]), dtype=np.int64)
        return pair_contexts(text, alignment)


def shared_maps(student_tokenizer, teacher_tokenizer) -> SharedMaps:
    """Both tokenizers' end-of-text tokens (EOS) mean the same whatever their strings, so they are paired in
    every map: a document's last position predicts EOS on both sides."""
    same = spaced(student_tokenizer) == spaced(teacher_tokenizer)
    names = ("any",) if same else CONTEXTS
    maps = {c: shared_vocabulary(student_tokenizer, teacher_tokenizer, c) for c in names}
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    if s_eos is not None and t_eos is not None:
        for c, (s, t) in maps.items():
            keep = (s != s_eos) & (t != t_eos)
            maps[c] = (np.append(s[keep], s_eos), np.append(t[keep], t_eos))
    return SharedMaps(same, maps)


def pair_positions(
    student: Offsets, teacher: Offsets, text: str, *, teacher_text: Optional[str] = None, segments: Optional[Segments] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(student positions, teacher positions, contexts) of the positions that have read the same text: position
    i of the student and j of the teacher pair when token i ends where token j ends, inside a stretch of text
    both sides render alike (`segments`: (student start, end, teacher start, end) character spans holding the
    same text; by default the whole text, when both sides render one), and both have a next token there. The
    contexts are indices into `CONTEXTS` (-1: the next text opens with whitespace other than one space, which a
    tokenizer that drops whitespace has no token for). With one text this is `align(...).pairs()`; with two
    (each side's chat template around the same messages) only the messages' content is compared, and a
    position right after a template's own markup pairs when the content that follows starts there on both."""
    t_text = text if teacher_text is None else teacher_text
    if segments is None:
        if t_text != text:
            raise ValueError("two different texts need the segments they share")
        segments = [(0, len(text), 0, len(text))]
    if len(student) + len(teacher) <= SMALL:
        return _pairs_small(student, teacher, text, segments)
    s_ends, s_idx = _tiling(student)
    t_ends, t_idx = _tiling(teacher)
    sp, tp, cuts = [], [], []
    for s_lo, s_hi, t_lo, t_hi in segments:
        if s_hi - s_lo != t_hi - t_lo:
            raise ValueError("a segment covers the same text on both sides")
        s_at, s_pos = _cuts(s_ends, s_idx, s_lo, s_hi)
        t_at, t_pos = _cuts(t_ends, t_idx, t_lo, t_hi)
        common, si, ti = np.intersect1d(s_at - s_lo, t_at - t_lo, assume_unique=True, return_indices=True)
        sp.append(s_pos[si])
        tp.append(t_pos[ti])
        cuts.append(common + s_lo)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
    s_all, t_all, c_all = cat(sp), cat(tp), cat(cuts)
    return s_all, t_all, np.array([_context(text, int(c)) for c in c_all], dtype=np.int64)


SMALL = 1024
"""Up to this many tokens on both sides together, `pair_positions` walks them in Python (numpy's per-call cost
is most of a short example's time); longer ones go through numpy. Both give the same pairs."""


def _pairs_small(student: Offsets, teacher: Offsets, text: str, segments: Segments):
    sp: list[int] = []
    tp: list[int] = []
    cuts: list[int] = []
    for s_lo, s_hi, t_lo, t_hi in segments:
        if s_hi - s_lo != t_hi - t_lo:
            raise ValueError("a segment covers the same text on both sides")
        s_at = _cuts_small(student, s_lo, s_hi)
        t_at = _cuts_small(teacher, t_lo, t_hi)
        for c in sorted(s_at.keys() & t_at.keys()):
            sp.append(s_at[c])
            tp.append(t_at[c])
            cuts.append(c + s_lo)
    arr = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
    return arr(sp), arr(tp), arr([_context(text, c) for c in cuts])


def _cuts_small(offsets: Offsets, lo: int, hi: int) -> dict[int, int]:
    """`_cuts` in Python: {cut character - lo: the position before it}."""
    bearing = [(i, int(e)) for i, (a, e) in enumerate(offsets) if e > a]
    out = {}
    for (i, e), (j, nxt) in zip(bearing, bearing[1:]):
        if nxt < e:
            raise ValueError("token offsets go backwards; expected the offsets of one left-to-right tokenisation")
        if nxt != e and j == i + 1 and lo <= e < hi:
            out[e - lo] = i
    return out


def _cuts(ends: np.ndarray, idx: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(cut characters, the position before each) inside [lo, hi): the last token ending at a character, when
    the next token carries text and follows it directly (no zero-width token between)."""
    if len(ends) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    last = np.nonzero((ends[:-1] != ends[1:]) & (idx[1:] == idx[:-1] + 1))[0]  # a token whose next one moves on
    keep = last[(ends[last] >= lo) & (ends[last] < hi)]
    return ends[keep], idx[keep]


def _context(text: str, c: int) -> int:
    """The context of a pair whose next text starts at character c (see `pair_contexts`)."""
    head = text[c : c + 2]
    if head[:1] == " " and head[1:2] and not head[1].isspace():
        return 0
    if head[:1].isspace():
        return -1
    return 1 if c > 0 and text[c - 1].isalnum() else 2


def project_rows(teacher_logits, contexts: np.ndarray, maps: SharedMaps, *, top_k: int, temperatures=(), chunk: int = 1024):
    """The teacher's logits at some positions ([P, Vt], any dtype) as a `SparseTeacher` over the student's
    vocabulary, row i by the shared map of context `contexts[i]` (none is -1), in the given order; k is
    `maps.k(top_k)` for every row. Chunked, so a large vocabulary never takes more than `chunk` rows of
    fp32 log-probs at once."""
    import torch

    from dsdistill.losses.fused import SparseTeacher

    k = maps.k(top_k)
    parts = []
    for lo in range(0, teacher_logits.shape[0], chunk):
        block = teacher_logits[lo : lo + chunk]
        logp = torch.log_softmax(block if block.dtype == torch.float64 else block.float(), dim=-1)
        ctx = contexts[lo : lo + chunk]
        pieces, where = [], []
        for c in sorted(set(ctx.tolist())):
            at = np.nonzero(ctx == c)[0]
            rows = logp.index_select(0, torch.as_tensor(at, device=logp.device))
            pieces.append(_padded(project(rows, *maps.of(c), top_k=k, temperatures=temperatures), k))
            where.append(at)
        if pieces:
            parts.append(_reorder(pieces, np.concatenate(where)))
    if not parts:
        empty = torch.zeros(0, k, device=teacher_logits.device)
        tails = torch.zeros(0, len(temperatures), device=teacher_logits.device) if temperatures else None
        return SparseTeacher(empty.long(), empty, empty[:, 0], tails, tuple(temperatures))
    return _concat(parts)


def _padded(sp, k: int):
    """`sp` with k slots per row: slots past its own marked absent (repeating each row's first token)."""
    import torch

    from dsdistill.losses.fused import SparseTeacher

    have = sp.ids.shape[1]
    if have >= k:
        return sp
    absent = torch.zeros(sp.ids.shape[0], k, dtype=torch.bool, device=sp.ids.device)
    absent[:, have:] = True
    ids = torch.cat([sp.ids, sp.ids[:, :1].expand(-1, k - have)], dim=1)
    logp = torch.cat([sp.logp, sp.logp.new_full((sp.logp.shape[0], k - have), float("-inf"))], dim=1)
    return SparseTeacher(ids, logp, sp.log_rest, sp.tails, sp.temperatures, absent)


def student_of(maps: SharedMaps, teacher_vocab: int):
    """[contexts, teacher_vocab] the student id each teacher id adds the same text as, per context (-1: none):
    `project_sparse`'s lookup table, built once per run."""
    import torch

    table = torch.full((1 if maps.same else len(CONTEXTS), max(teacher_vocab, maps.teacher_span())), -1, dtype=torch.long)
    for c in range(table.shape[0]):
        s_ids, t_ids = maps.of(c)
        table[c, torch.as_tensor(t_ids)] = torch.as_tensor(s_ids)
    return table


def project_sparse(teacher, contexts: np.ndarray, maps: SharedMaps, *, top_k: int, table=None):
    """A `SparseTeacher` over the teacher's vocabulary (a server's or a cache's top-k + rest), over the
    student's: of each row's k tokens those the shared map of its context pairs keep their log-probs (the
    first `maps.k(top_k)` of them by probability), and the mass of the others joins the rest bucket at T = 1
    and in every tail. Exact for what the top-k held; the teacher's tail beyond its k stays a bucket.
    `table`: `student_of(maps, teacher vocabulary)` on the rows' device (built here when not given)."""
    import torch

    from dsdistill.losses.fused import SparseTeacher

    k, device = maps.k(top_k), teacher.ids.device
    wide = lambda t: t if t.dtype == torch.float64 else t.float()  # noqa: E731
    n = teacher.ids.shape[0]
    if table is None:
        table = student_of(maps, int(teacher.ids.max()) + 1 if teacher.ids.numel() else 1).to(device)
    ctx = torch.as_tensor(np.where(np.asarray(contexts) < 0, 0, contexts) if not maps.same else np.zeros(n, dtype=np.int64))
    mapped = table[ctx.to(device)[:, None], teacher.ids]  # [n, K] student id, or -1
    if teacher.ids.shape[1] < k:
        raise ValueError(f"the teacher gives {teacher.ids.shape[1]} tokens per position; the cross-tokenizer term keeps {k}")
    logp = wide(teacher.logp).masked_fill(mapped < 0, float("-inf"))
    top, pick = logp.topk(k, dim=-1)
    absent = top == float("-inf")  # fewer than k of the row's tokens have a counterpart
    ids = mapped.gather(1, pick)
    ids = torch.where(absent, ids[:, :1].clamp(min=0), ids)  # absent slots repeat the row's first token
    kept = wide(teacher.logp).gather(1, pick).masked_fill(absent, float("-inf"))
    # every token of the teacher's top-k the student side does not keep joins its rest, at T = 1 and at each T
    dropped = wide(teacher.logp).scatter(1, pick, float("-inf"))
    dropped = torch.where(torch.zeros_like(dropped, dtype=torch.bool).scatter(1, pick, absent), wide(teacher.logp), dropped)
    log_rest = torch.logaddexp(wide(teacher.log_rest), torch.logsumexp(dropped, dim=-1))
    tails = None
    if teacher.tails is not None:
        extra = torch.stack([torch.logsumexp(dropped / t, dim=-1) for t in teacher.temperatures], dim=-1)
        tails = torch.logaddexp(wide(teacher.tails), extra)
    return SparseTeacher(ids, kept, log_rest, tails, teacher.temperatures, absent if bool(absent.any()) else None)


def _reorder(parts, where: np.ndarray):
    import torch

    order = torch.as_tensor(np.argsort(where, kind="stable"))
    merged = _concat(parts)
    return merged.take(order.to(merged.ids.device))


def _concat(parts):
    import torch

    from dsdistill.losses.fused import SparseTeacher

    tails = torch.cat([p.tails for p in parts]) if parts[0].tails is not None else None
    absent = None
    if any(p.absent is not None for p in parts):
        absent = torch.cat([p.absent if p.absent is not None else torch.zeros_like(p.ids, dtype=torch.bool) for p in parts])
    return SparseTeacher(
        torch.cat([p.ids for p in parts]),
        torch.cat([p.logp for p in parts]),
        torch.cat([p.log_rest for p in parts]),
        tails,
        parts[0].temperatures,
        absent,
    )


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
    kept = t_ids[pick]

    def log_tail(power: float):
        # the tail's mass summed directly (no 1 - kept cancellation): one exp pass, the kept zeroed in place
        mass = (teacher_logp / power).exp_() if power != 1.0 else teacher_logp.exp()
        return mass.scatter_(-1, kept, 0.0).sum(-1).log()

    tails = [log_tail(t) for t in temperatures]
    return SparseTeacher(
        ids=s_ids[pick],
        logp=logp,
        log_rest=log_tail(1.0),
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
    keep = contexts >= 0
    if not keep.any():
        return np.zeros(0, dtype=np.int64), None
    rows = teacher_logits.float().index_select(0, torch.as_tensor(tp[keep], device=teacher_logits.device))
    return sp[keep], project_rows(rows, contexts[keep], maps, top_k=top_k, temperatures=temperatures)


@dataclass(frozen=True)
class Chunks:
    """A cross-tokenizer micro-batch cut into chunks for `chunk_likelihood`: chunk k starts at pair k (in KD
    order) and runs, on each side, up to the next pair of the same run of loss-bearing positions (or the run's
    end). Both sides of a chunk then predict the same text: the student's and the teacher's likelihoods of it
    compare, whatever the two tokenisations of it."""

    count: int
    """Chunks (= pairs)."""
    s_members: np.ndarray
    """Ordinals into the student's loss-bearing positions that lie in a chunk."""
    s_chunk: np.ndarray
    """The chunk of each of `s_members`."""
    t_rows: np.ndarray
    """Flat teacher positions b * Lt + j that lie in a chunk (each predicts its next token), ascending."""
    t_chunk: np.ndarray
    """The chunk of each of `t_rows`."""

    @functools.cached_property
    def to_merge(self) -> tuple[np.ndarray, np.ndarray]:
        """(the chunks the student reads as one token and the teacher as several, the indices into `t_rows` of
        their teacher rows): what `merge_spans` needs the teacher's log-probs of (worked out once per batch)."""
        s_len = np.bincount(self.s_chunk, minlength=self.count)
        t_len = np.bincount(self.t_chunk, minlength=self.count)
        merged = np.nonzero((s_len == 1) & (t_len >= 2))[0]
        return merged, np.nonzero(np.isin(self.t_chunk, merged))[0]


def _fill_forward(mark: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Per position of [B, L] (row-major), the last `mark` (>= 0) at or before it with no `stop` between, or -1;
    rows never carry over. A position that is both keeps its mark."""
    b, n = mark.shape
    at = np.arange(b * n).reshape(b, n)
    event = (mark >= 0) | stop
    event[:, 0] = True  # a row starts afresh
    last = np.maximum.accumulate(np.where(event, at, 0).reshape(-1)).reshape(b, n)
    out = mark.reshape(-1)[last.reshape(-1)].reshape(b, n)
    return np.where(stop & (mark < 0), -1, out)


def chunks_of(labels: np.ndarray, x_pos: np.ndarray, t_labels: np.ndarray, ignore_index: int) -> Chunks:
    """The chunks of a packed cross-tokenizer batch: `labels` [B, S] the student's, `x_pos` [B, S] each
    position's paired teacher position (-1: none), `t_labels` [B, Lt] the teacher's (negative: no loss)."""
    s_bearing = np.zeros(labels.shape, dtype=bool)
    s_bearing[:, :-1] = labels[:, 1:] != ignore_index
    paired = s_bearing & (x_pos >= 0)
    count = int(paired.sum())
    pair_id = np.full(labels.shape, -1, dtype=np.int64)
    pair_id[paired] = np.arange(count)
    s_fill = _fill_forward(pair_id, ~s_bearing)
    ordinal_of = s_fill[s_bearing]  # in the loss-bearing positions' order (row-major), as `host_positions`
    s_members = np.nonzero(ordinal_of >= 0)[0]
    t_bearing = np.zeros(t_labels.shape, dtype=bool)
    t_bearing[:, :-1] = t_labels[:, 1:] >= 0
    t_mark = np.full(t_labels.shape, -1, dtype=np.int64)
    b, s = np.nonzero(paired)
    t_mark[b, x_pos[b, s]] = pair_id[b, s]
    t_fill = _fill_forward(t_mark, ~t_bearing)
    t_rows = np.nonzero(t_fill.reshape(-1) >= 0)[0]
    return Chunks(count, s_members, ordinal_of[s_members], t_rows, t_fill.reshape(-1)[t_rows])


def merge_spans(rows, chunks: Chunks, *, next_ids, t_logp, t_next, contexts: np.ndarray, table):
    """`shared_topk`'s rows with the teacher's multi-token spans merged by the chain rule (GOLD's span merging):
    where the student reads a chunk as one token v and the teacher as several, the teacher's probability of v is
    the product of its own tokens' probabilities over the chunk, p. That mass was counted under the chunk's
    first teacher token (in its shared slot, or the rest bucket when it has none), so it moves from there to v:
    v's slot gains p (a slot of its own: the row's first absent slot, else the last kept slot, whose mass then
    joins the rest). Rows keep their k slots, so a cache, a server and a live teacher hold the same shape.

    `rows` [P, k] in KD order; `next_ids` [P] the student's next token at each pair; `t_logp` / `t_next` [N] the
    teacher's log-prob of, and id of, its next token at the rows `chunks.to_merge` names (in that order);
    `table` = `student_of`. At
    T != 1 the tails lose p^(1/T) where the rest bucket loses p (the first token's tail share is not split
    exactly)."""
    import torch

    from dsdistill.losses.fused import SparseTeacher

    merged, sel = chunks.to_merge
    if not len(merged):
        return rows
    dev = rows.ids.device
    t_chunk = chunks.t_chunk[sel]
    first = np.searchsorted(t_chunk, merged)  # t_chunk is sorted: each chunk's first teacher row
    at = torch.as_tensor(merged, device=dev)
    lt = torch.zeros(chunks.count, dtype=torch.float64, device=dev)
    lt.index_add_(0, torch.as_tensor(t_chunk, device=dev), t_logp.to(dev).double())
    log_p = lt.index_select(0, at).clamp(max=-1e-6)
    ctx = torch.as_tensor(
        np.where(contexts[merged] < 0, 0, contexts[merged]) if table.shape[0] > 1 else np.zeros(len(merged), dtype=np.int64)
    )
    piece = table[ctx.to(dev), t_next.to(dev).index_select(0, torch.as_tensor(first, device=dev))]  # student id or -1
    v = next_ids.to(dev).index_select(0, at)

    ids, logp = rows.ids.index_select(0, at).clone(), rows.logp.index_select(0, at).double()
    absent = rows.absent.index_select(0, at).clone() if rows.absent is not None else torch.zeros_like(ids, dtype=torch.bool)
    rest = rows.log_rest.index_select(0, at).double()
    temps = torch.tensor([float(t) for t in rows.temperatures], dtype=torch.float64, device=dev)
    tails = rows.tails.index_select(0, at).double() if rows.tails is not None else None
    k = ids.shape[1]
    rng = torch.arange(len(merged), device=dev)
    present = (ids == v[:, None]) & ~absent
    has_v, slot_v = present.any(1), present.float().argmax(1)
    has_gap, gap = absent.any(1), absent.float().argmax(1)
    release = ~has_v & ~has_gap
    # the released slot's mass joins the rest (at T = 1 and in every tail)
    freed = logp[:, k - 1]
    rest = torch.where(release, torch.logaddexp(rest, freed), rest)
    if tails is not None:
        tails = torch.where(release[:, None], torch.logaddexp(tails, freed[:, None] / temps), tails)
    slot = torch.where(has_v, slot_v, torch.where(has_gap, gap, torch.full_like(gap, k - 1)))
    live = ~absent & ~(release[:, None] & (torch.arange(k, device=dev) == k - 1))
    # the first teacher token's share: its slot loses p, or the rest does
    holds = (ids == piece[:, None]) & live & (torch.arange(k, device=dev) != slot[:, None]) & (piece[:, None] >= 0)
    has_piece, slot_piece = holds.any(1), holds.float().argmax(1)
    tiny = -69.0  # e^-69: what is left where rounding takes more than was there
    cut = lambda a, b: torch.log((a.exp() - b.exp()).clamp(min=math.exp(tiny)))  # noqa: E731
    old = logp[rng, slot_piece]
    logp[rng, slot_piece] = torch.where(has_piece, cut(old, log_p), old)
    rest = torch.where(has_piece, rest, cut(rest, log_p))
    if tails is not None:
        tails = torch.where(has_piece[:, None], tails, cut(tails, log_p[:, None] / temps))
    # v's slot gains p
    logp[rng, slot] = torch.where(has_v, torch.logaddexp(logp[rng, slot], log_p), log_p)
    ids[rng, slot] = v
    absent[rng, slot] = False

    def put(whole, part):
        return whole.index_copy(0, at, part.to(whole.dtype))

    return SparseTeacher(
        put(rows.ids, ids),
        put(rows.logp, logp),
        put(rows.log_rest, rest),
        None if rows.tails is None else put(rows.tails, tails),
        rows.temperatures,
        None if rows.absent is None else put(rows.absent, absent),
    )
