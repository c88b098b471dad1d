"""Cross-tokenizer alignment and KD terms, on two tokenizers built here that really differ: a byte-level BPE
(with a BOS its post-processor adds) and a WordPiece, over text with multi-byte UTF-8, whitespace runs and an
end-of-turn marker that only one of them has as a special token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsdistill.crosstok import (
    CONTEXTS,
    align,
    pair_contexts,
    plan,
    project_sequence,
    shared_maps,
    shared_vocabulary,
    spaced,
    token_bytes,
)
from dsdistill.losses.closed_form import kd_loss
from dsdistill.losses.cross import chunk_likelihood, exact_and_sorted

TEXTS = [
    "The café's naïve señor ate 数据 and 🙂 twice.",
    "a   b\n\n\tc  d<|im_end|>\nnext   turn: Ünïcödé   wörds",
    "tokenizers split words differently; mismatched spans merge.  Twice   spaced\t\ttabs.",
    "emoji 🙂🙂 then 数据数据 then café café<|im_end|>",
]
CORPUS = TEXTS * 3 + ["plain words to learn merges from, again and again and again."] * 5


def _bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<s>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    alphabet = sorted({c for text in CORPUS for c in text if not c.isspace()})
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def tokenizers_():
    return _bpe(), _wordpiece()


def _byte_table() -> dict[str, int]:
    """Which character the byte-level pre-tokenizer writes for each byte, asked of the pre-tokenizer itself:
    ASCII one character at a time, the other bytes as they occur in 2-, 3- and 4-byte UTF-8 characters."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    table: dict[str, int] = {}
    probes = [chr(c) for c in range(1, 0x80)] + [chr(c) for c in range(0x80, 0x800, 0x3F)]
    probes += [chr(0x800)] + [chr((c << 12) + 0x100) for c in range(1, 16)]  # 3-byte leads (no surrogate)
    probes += [chr(max(0x10000, c << 18)) for c in range(5)]  # 4-byte leads
    probes += [chr(0x80 + c) for c in range(0x40)]
    for ch in probes:
        (mapped, _), *_ = split.pre_tokenize_str(ch)
        for char, byte in zip(mapped, ch.encode()):
            table.setdefault(char, byte)
    return table


def _bpe_byte_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Each token's byte span, read from its own bytes alone: byte-level BPE is lossless, so the tokens'
    bytes laid end to end are the text's bytes."""
    table, spans, at = _byte_table(), [], 0
    for piece in tok.convert_ids_to_tokens(ids):
        raw = piece.encode() if piece in tok.all_special_tokens else bytes(table[c] for c in piece)
        if piece == "<s>":
            spans.append((at, at))  # the BOS the post-processor adds: no text
            continue
        spans.append((at, at + len(raw)))
        at += len(raw)
    assert at == len(text.encode())
    return spans


def _wordpiece_byte_spans(tok, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Each token's byte span, by finding its text at a cursor that skips whitespace (WordPiece drops it)."""
    data, spans, at = text.encode(), [], 0
    for piece in tok.convert_ids_to_tokens(ids):
        assert piece != "[UNK]"
        raw = piece.removeprefix("##").encode()
        while data[at : at + 1].isspace():
            at += 1
        assert data[at : at + len(raw)] == raw, (piece, data[at : at + 20])
        spans.append((at, at + len(raw)))
        at += len(raw)
    assert data[at:].strip() == b""
    return spans


def test_chunks_cover_the_same_bytes_in_both_tokenisations(tokenizers_):
    bpe, wp = tokenizers_
    assert bpe("a")["input_ids"][0] == bpe.bos_token_id  # a zero-width token the alignment must skip
    for text in TEXTS:
        s = bpe(text, return_offsets_mapping=True)
        t = wp(text, return_offsets_mapping=True)
        a = align(s["offset_mapping"], t["offset_mapping"])
        s_bytes = _bpe_byte_spans(bpe, s["input_ids"], text)
        t_bytes = _wordpiece_byte_spans(wp, t["input_ids"], text)
        assert s["input_ids"] != t["input_ids"] and len(a) > 5
        assert not a.one_to_one().all()  # the tokenisations really differ here
        data = text.encode()
        covered_s, covered_t = [], []
        for k in range(len(a)):
            lo, hi = (len(text[:c].encode()) for c in a.spans[k])  # the chunk's characters, as bytes
            s_tok = range(a.s_start[k], a.s_end[k])
            t_tok = range(a.t_start[k], a.t_end[k])
            # the student's tokens are exactly the chunk's bytes (a leading whitespace gap belongs to the chunk)
            s_lo, s_hi = s_bytes[s_tok[0]][0], s_bytes[s_tok[-1]][1]
            assert s_hi == hi and data[lo:s_lo].isspace() | (lo == s_lo), (text, k)
            assert b"".join(data[slice(*s_bytes[i])] for i in s_tok) == data[s_lo:s_hi]
            # the teacher's tokens are the same bytes without the whitespace WordPiece drops
            t_lo, t_hi = t_bytes[t_tok[0]][0], t_bytes[t_tok[-1]][1]
            assert t_hi == hi and (data[lo:t_lo].strip() == b""), (text, k)
            assert b"".join(data[slice(*t_bytes[i])] for i in t_tok) == b"".join(data[s_lo:s_hi].split())
            covered_s += list(s_tok)
            covered_t += list(t_tok)
        # every text-bearing token is in exactly one chunk, in order; the BOS is in none
        assert covered_s == list(range(1, len(s["input_ids"])))
        assert covered_t == list(range(len(t["input_ids"])))
        # a multi-byte character split over byte-level tokens never straddles two chunks
        for i in range(1, len(s_bytes) - 1):
            if s["offset_mapping"][i] == s["offset_mapping"][i + 1]:
                k = np.searchsorted(a.s_end, i, side="right")
                assert a.s_start[k] <= i + 1 < a.s_end[k]


def _aligned(bpe, wp, text: str):
    s = bpe(text, return_offsets_mapping=True)
    t = wp(text, return_offsets_mapping=True)
    return s, t, align(s["offset_mapping"], t["offset_mapping"])


def test_the_pairs_predict_tokens_that_start_at_the_same_character(tokenizers_):
    bpe, wp = tokenizers_
    text = TEXTS[1]
    s, t, a = _aligned(bpe, wp, text)
    sp, tp = a.pairs()
    assert len(sp) == len(a) - 1  # every chunk but the first (nothing before it on the teacher side)
    for i, j in zip(sp, tp):
        s_next, t_next = s["offset_mapping"][i + 1], t["offset_mapping"][j + 1]
        # both next tokens open the same chunk: the text before them is the same, up to whitespace
        assert text[: s_next[0]].rstrip() == text[: t_next[0]].rstrip()
    s_ids, t_ids = shared_vocabulary(bpe, wp)
    texts = {bpe.convert_tokens_to_string([bpe.convert_ids_to_tokens(int(i))]) for i in s_ids}
    assert "c" in texts and any(len(x) > 3 and x.isalpha() for x in texts) and len(s_ids) == len(t_ids) == len(texts)


def _logits(n: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_(True)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_with_one_tokenizer_on_both_sides_the_term_is_ordinary_kd(tokenizers_, kind, temperature):
    """Values and gradients equal `kd_loss` on the same logits to float64 rounding."""
    bpe, _ = tokenizers_
    enc = bpe(TEXTS[0], return_offsets_mapping=True)
    a = align(enc["offset_mapping"], enc["offset_mapping"])
    assert a.one_to_one().all() and a.aligned_share() == 1.0
    s_ids, t_ids = (torch.from_numpy(x) for x in shared_vocabulary(bpe, bpe))
    n, v = len(enc["input_ids"]), len(bpe)
    assert (s_ids == t_ids).all() and sorted(s_ids.tolist()) == list(range(v))  # every id, paired with itself
    sp, tp = (torch.from_numpy(x) for x in a.pairs())
    assert sp.tolist() == tp.tolist() == list(range(n - 1))  # the BOS position predicts the first token
    s, t = _logits(n, v, 0), _logits(n, v, 1)
    got, m = exact_and_sorted(s, t, sp, tp, s_ids, t_ids, temperature=temperature, divergence_kind=kind)
    want, _ = kd_loss(s[None], t[None], torch.zeros(1, n, dtype=torch.long), temperature=temperature, divergence_kind=kind)
    assert m["count"] == n - 1 and m["sorted"] == 0.0 and m["shared_mass"] == pytest.approx(n - 1, rel=1e-12)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g_got, g_want = torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0]
    assert torch.allclose(g_got, g_want, rtol=1e-10, atol=1e-15)


def test_across_tokenizers_both_terms_are_finite_zero_for_equal_chunk_likelihoods_and_differentiable(tokenizers_):
    bpe, wp = tokenizers_
    s_enc, t_enc, a = _aligned(bpe, wp, TEXTS[2])
    s_shared, t_shared = (torch.from_numpy(x) for x in shared_vocabulary(bpe, wp))
    assert 0 < len(s_shared) < min(len(bpe), len(wp))
    s, t = _logits(len(s_enc["input_ids"]), len(bpe), 2), _logits(len(t_enc["input_ids"]), len(wp), 3)
    sp, tp = (torch.from_numpy(x) for x in a.pairs())
    gold, m = exact_and_sorted(s, t, sp, tp, s_shared, t_shared, temperature=2.0)
    assert m["count"] == len(sp) > 0 and m["exact"] > 0 and m["sorted"] > 0 and 0 < m["shared_mass"] < len(sp)
    ranges = [torch.from_numpy(x) for x in (a.s_start, a.s_end, a.t_start, a.t_end)]
    s_ids, t_ids = torch.tensor(s_enc["input_ids"]), torch.tensor(t_enc["input_ids"])
    alm, c = chunk_likelihood(s, t, s_ids, t_ids, *ranges, temperature=1.0)
    assert c["count"] == len(sp) and alm > 0
    for loss in (gold, alm):
        grad = torch.autograd.grad(loss, s)[0]
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # a student whose chunk likelihoods are the teacher's scores zero: give each of its chunks' tokens the
    # teacher's chunk log-probability, spread over the chunk's tokens
    log_t = torch.log_softmax(t.detach()[:-1], -1).gather(1, t_ids[1:, None])[:, 0]
    target = s.detach().clone()
    for k in range(len(a)):
        if a.s_start[k] == 0 or a.t_start[k] == 0:
            continue
        chunk = float(log_t[a.t_start[k] - 1 : a.t_end[k] - 1].sum())
        width = a.s_end[k] - a.s_start[k]
        for j in range(a.s_start[k], a.s_end[k]):
            row = torch.full((len(bpe),), -1e4, dtype=torch.float64)
            row[s_ids[j]] = 0.0  # near-certain next token ...
            row[(s_ids[j] + 1) % len(bpe)] = np.log(np.expm1(-chunk / width))  # ... with its log-prob at chunk/width
            target[j - 1] = row
    zero, _ = chunk_likelihood(target, t.detach(), s_ids, t_ids, *ranges, temperature=1.0)
    assert float(zero) == pytest.approx(0.0, abs=1e-9)


def test_the_plan_counts_what_aligns(tokenizers_):
    bpe, wp = tokenizers_
    same = plan(bpe, bpe, TEXTS + [""])
    assert (same.examples, same.unaligned) == (5, 1)  # an empty text has nothing to compare
    assert same.shared_share == 1.0 and same.teacher_per_student == 1.0
    assert same.exact_share == same.pair_share > 0.9  # every pair exact; a text's first token has no pair
    cross = plan(bpe, wp, TEXTS)
    assert cross.unaligned == 0 and 0 < cross.shared_share < 1
    assert 0 < cross.exact_share < cross.pair_share < 1 and cross.teacher_per_student != 1.0


def test_a_tokenizer_that_keeps_spaces_pairs_with_one_that_drops_them_by_where_the_token_starts(tokenizers_):
    bpe, wp = tokenizers_
    assert spaced(bpe) and not spaced(wp)
    ids = lambda tok, piece: tok.convert_tokens_to_ids(piece)  # noqa: E731
    after_space = dict(zip(*(x.tolist() for x in shared_vocabulary(bpe, wp, "space"))))
    assert after_space[ids(bpe, "Ġand")] == ids(wp, "and")  # " and" is what both add after a space
    anywhere = dict(zip(*(x.tolist() for x in shared_vocabulary(bpe, wp))))
    assert ids(bpe, "Ġand") not in anywhere  # by bytes alone " and" and "and" differ
    mid_word = shared_vocabulary(bpe, wp, "word")[1].tolist()
    assert mid_word and all(wp.convert_ids_to_tokens(i).startswith("##") for i in mid_word)
    text = "ate 数据 and\n\ntwice."
    s, t, a = _aligned(bpe, wp, text)
    contexts = pair_contexts(text, a)
    keep = (a.s_start > 0) & (a.t_start > 0)
    opening = [text[lo:hi] for lo, hi in a.spans[keep]]
    assert len(contexts) == len(opening)
    for chunk, c in zip(opening, contexts):
        if chunk.startswith(" "):
            assert c == 0
        elif chunk[0].isspace():
            assert c == -1  # after a blank line the spaced tokenizer's next token is the newline: no counterpart
    assert plan(bpe, wp, TEXTS).exact_share > 0
    # one WordPiece on both sides: every id with itself (`##ed` and `ed` stay apart)
    s_ids, t_ids = shared_vocabulary(wp, wp)
    assert (s_ids == t_ids).all() and sorted(s_ids.tolist()) == list(range(len(wp)))


def test_with_one_tokenizer_the_projected_teacher_is_its_own_top_k_and_rest(tokenizers_):
    """What the cache writer stores for a live teacher (top-k, rest, tails) is what the projection gives when
    both sides share the tokenizer: the cross-tokenizer teacher rides on the sparse-teacher KD path."""
    bpe, _ = tokenizers_
    text = TEXTS[1]
    enc = bpe(text, return_offsets_mapping=True)
    a = align(enc["offset_mapping"], enc["offset_mapping"])
    logits = _logits(len(enc["input_ids"]), len(bpe), 4).detach()
    positions, sparse = project_sequence(logits, a, text, shared_maps(bpe, bpe), top_k=8, temperatures=(2.0,))
    n = len(enc["input_ids"])
    assert positions.tolist() == list(range(n - 1))
    lp = torch.log_softmax(logits[: n - 1].float(), dim=-1)
    top, ids = lp.topk(8, dim=-1)
    tail = lp.scatter(-1, ids, float("-inf"))
    assert torch.equal(sparse.ids, ids) and torch.allclose(sparse.logp, top)
    assert torch.allclose(sparse.log_rest, torch.logsumexp(tail, -1))
    assert torch.allclose(sparse.tails[:, 0], torch.logsumexp(tail / 2.0, -1))


def test_across_tokenizers_the_projection_keeps_the_mass_and_pairs_tokens_that_add_the_same_text(tokenizers_):
    bpe, wp = tokenizers_
    text = TEXTS[2]
    s, t, a = _aligned(bpe, wp, text)
    logits = _logits(len(t["input_ids"]), len(wp), 5).detach()
    positions, sparse = project_sequence(logits, a, text, shared_maps(bpe, wp), top_k=4)
    contexts = pair_contexts(text, a)
    sp, tp = a.pairs()
    assert positions.tolist() == sp[contexts >= 0].tolist() and len(positions) > 0  # no row where nothing compares
    mass = sparse.logp.exp().sum(-1) + sparse.log_rest.exp()
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)  # top-k + rest is the whole distribution
    s_text = token_bytes(bpe)
    for row, (pos, ctx) in enumerate(zip(sp[contexts >= 0], contexts[contexts >= 0])):
        lp = torch.log_softmax(logits[tp[sp.tolist().index(pos)]].float(), -1)
        t_map = dict(zip(*(x.tolist() for x in shared_vocabulary(bpe, wp, CONTEXTS[ctx]))))
        for sid, value in zip(sparse.ids[row].tolist(), sparse.logp[row].tolist()):
            assert value == pytest.approx(float(lp[t_map[sid]]), abs=1e-6)  # the teacher's own log-prob of that text
            assert s_text[sid].strip()  # a real piece of text, not a lone byte


def test_merged_spans_give_the_student_token_the_teachers_chain_rule_probability(tokenizers_):
    """Where the WordPiece student reads a chunk as one token and the BPE teacher as several, `merge_spans`
    gives that token the product of the teacher's probabilities of its own tokens over the chunk (computed here
    from the teacher's log-softmax directly), takes that mass from where the chunk's first teacher token had
    it, and keeps every row a distribution (its slots and rest sum to 1) of the same k slots."""
    from dsdistill.crosstok import chunks_of, merge_spans, pair_positions, project_rows, student_of

    bpe, wp = tokenizers_
    maps = shared_maps(wp, bpe)
    table = student_of(maps, len(bpe))
    gen = torch.Generator().manual_seed(3)
    merged_total = 0
    for text in TEXTS + [CORPUS[-1]]:
        s = wp(text, add_special_tokens=False, return_offsets_mapping=True)
        t = bpe(text, add_special_tokens=False, return_offsets_mapping=True)
        sp, tp, ctx = pair_positions(s["offset_mapping"], t["offset_mapping"], text)
        labels = np.array([[-100] + s["input_ids"][1:]])
        x_pos = np.full(labels.shape, -1)
        x_pos[0, sp] = tp
        t_labels = np.array([[-1] + t["input_ids"][1:]])
        ch = chunks_of(labels, x_pos, t_labels, -100)
        keep = sp < len(s["input_ids"]) - 1  # pairs whose next student token exists, in KD order
        sp, tp, ctx = sp[keep], tp[keep], ctx[keep]
        assert ch.count == len(sp)
        logits = torch.randn(len(t["input_ids"]), len(bpe), generator=gen, dtype=torch.float64) * 3
        logp = torch.log_softmax(logits, -1)
        rows = project_rows(logits[tp], np.where(ctx < 0, 0, ctx), maps, top_k=6)
        merged, sel = ch.to_merge
        t_rows = ch.t_rows[sel]
        t_ids = torch.tensor(t["input_ids"])
        out = merge_spans(
            rows,
            ch,
            next_ids=torch.tensor(s["input_ids"])[sp + 1],
            t_logp=logp[t_rows, t_ids[t_rows + 1]],
            t_next=t_ids[t_rows + 1],
            contexts=np.where(ctx < 0, 0, ctx),
            table=table,
        )
        assert out.ids.shape == rows.ids.shape
        live = out.logp.masked_fill(out.absent, float("-inf")) if out.absent is not None else out.logp
        total = live.exp().sum(1) + out.log_rest.exp()
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9)
        untouched = np.setdiff1d(np.arange(ch.count), merged)
        assert torch.equal(out.logp[untouched], rows.logp[untouched]) and torch.equal(out.ids[untouched], rows.ids[untouched])
        for k in merged:
            j = ch.t_rows[ch.t_chunk == k]
            chain = float(logp[j, t_ids[j + 1]].sum())
            v = s["input_ids"][sp[k] + 1]
            slot = (out.ids[k] == v).nonzero().flatten()
            before = rows.logp[k][rows.ids[k] == v].exp().sum() if (rows.ids[k] == v).any() else 0.0
            assert len(slot) == 1 and float(out.logp[k, slot[0]].exp()) == pytest.approx(float(before) + np.exp(chain), rel=1e-9)
            merged_total += 1
    assert merged_total >= 8, merged_total
