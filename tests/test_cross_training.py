"""Training with a teacher whose tokenizer is not the student's (`teacher.cross_tokenizer`), as users run it:
real tiny models saved to disk, a byte-level BPE teacher and a word-level student built from the same local
corpus, the real engine and `dsdistill check` on the command line.

- With one tokenizer on both sides the cross-tokenizer path is ordinary KD: to float64 rounding in the fused
  head (values and gradients), and step for step in a real run.
- With two tokenizers it trains, KD averaged over the paired positions, and `check` prints the plan.
- Chat data with each model's own template pairs only the messages' content; a template that rewrites the
  content is refused in one line, as are the runs it cannot serve.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from dsdistill.config import validate
from dsdistill.crosstok import align, pair_positions, project_rows, shared_maps
from dsdistill.demo import build_bpe_tokenizer, pretrain, tiny_llama
from dsdistill.errors import DistillError
from dsdistill.losses.fused import KDOptions, fused_kd_lm
from dsdistill.preflight import preflight
from dsdistill.train import train

TEACHER_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + (m['content'] or '') + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
"""Another template than the student's ChatML: other markup around the same content."""


def _bpe_teacher(root, corpus, *, steps: int, chat: bool = False, family: str = "llama"):
    """A BPE teacher trained briefly on `corpus`: Llama-shaped, or (`family="qwen2"`) a Qwen2 of the same size."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = build_bpe_tokenizer(root / "tokenizer", texts, vocab_size=400)
    if chat:
        tok.chat_template = TEACHER_TEMPLATE
    model = tiny_llama(len(tok), hidden=64, layers=3, heads=4, kv_heads=2, max_pos=256, seed=1)
    if family == "qwen2":
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(1)
        shape = {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
        heads = {k: getattr(model.config, k) for k in ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
        cfg = Qwen2Config(**shape, **heads, tie_word_embeddings=False, eos_token_id=1, pad_token_id=2)
        model = AutoModelForCausalLM.from_config(cfg)
    pretrain(model, tok, corpus, steps=steps, seq_len=48, batch=8)
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root / "teacher"


@pytest.fixture(scope="module")
def bpe_teacher(assets, tmp_path_factory):
    return _bpe_teacher(tmp_path_factory.mktemp("bpe"), assets["corpus"], steps=60)


@pytest.fixture(scope="module")
def bpe_chat_teacher(chat_assets, tmp_path_factory):
    return _bpe_teacher(tmp_path_factory.mktemp("bpe_chat"), chat_assets["corpus"], steps=20, chat=True)


def _records(run_dir, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == event]


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("divergence,temperature", [("forward_kl", 1.0), ("jsd", 2.0), ("reverse_kl", 1.5)])
def test_one_tokenizer_projected_teacher_is_ordinary_kd_in_float64(assets, divergence, temperature):
    """The fused head with the teacher projected through the shared map (every id to itself, top-k = the whole
    vocabulary) against the same head with the teacher's dense logits: values and gradients, in float64."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["student"])
    maps = shared_maps(tok, tok)
    vocab, n, d = len(tok), 24, 16
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(2, n // 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(vocab, d, generator=g, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(2, n // 2, d, generator=g, dtype=torch.float64)
    t_weight = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2, n // 2), generator=g)
    labels[0, 3] = -100
    options = KDOptions(temperature=temperature, divergence=divergence, chunk=5)
    dense, m_dense = fused_kd_lm(s_hidden, s_weight, t_hidden, t_weight, labels, coef_kd=0.7, coef_lm=0.3, options=options)
    grads_dense = torch.autograd.grad(dense, (s_hidden, s_weight))
    mask = labels[:, 1:] != -100
    rows = (t_hidden[:, :-1][mask] @ t_weight.T).double()
    contexts = np.zeros(rows.shape[0], dtype=np.int64)
    temps = (temperature,) if temperature != 1.0 else ()
    sparse = project_rows(rows, contexts, maps, top_k=vocab, temperatures=temps)
    assert sparse.ids.shape == (rows.shape[0], vocab)
    projected, m_proj = fused_kd_lm(
        s_hidden, s_weight, None, None, labels, coef_kd=0.7, coef_lm=0.3, options=options, t_sparse=sparse
    )
    grads_proj = torch.autograd.grad(projected, (s_hidden, s_weight))
    for key in ("kd", "kl", "lm"):
        torch.testing.assert_close(m_proj[key], m_dense[key], rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_proj, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_one_tokenizer_cross_run_matches_the_ordinary_run_step_for_step(make_config, tmp_path):
    """The same run twice, once through the cross-tokenizer path with the student's own tokenizer on the
    teacher's side: the same data rows, losses and eval figures at every step (fp32 rounding)."""
    base = dict(
        data={"packing": "documents"},
        train={"max_steps": 3},
        curriculum={"weights": {"kd": 0.8, "lm": 0.2}, "temperature": 2.0},
        eval={"every": 3, "max_batches": 2, "at_start": False},
    )
    ordinary = make_config(**base, output={"run_dir": str(tmp_path / "ordinary"), "log_every": 1})
    cross = make_config(**base, output={"run_dir": str(tmp_path / "cross"), "log_every": 1})
    cross["teacher"]["cross_tokenizer"] = {"top_k": 4096}
    train(validate(ordinary))
    train(validate(cross))
    a, b = _records(tmp_path / "ordinary", "train"), _records(tmp_path / "cross", "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b):
        for name in ("kd", "lm"):
            assert rb["losses"][name] == pytest.approx(ra["losses"][name], rel=1e-5, abs=1e-6), (ra["step"], name)
        assert rb["tokens"] == ra["tokens"]
    ea, eb = _records(tmp_path / "ordinary", "eval")[-1], _records(tmp_path / "cross", "eval")[-1]
    assert eb["ppl"] == pytest.approx(ea["ppl"], rel=1e-5)
    assert eb["losses"]["kd"] == pytest.approx(ea["losses"]["kd"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- two tokenizers


def test_bpe_teacher_distils_into_a_word_level_student_and_check_prints_the_plan(make_config, bpe_teacher, tmp_path):
    cfg = make_config(
        teacher={"path": str(bpe_teacher), "cross_tokenizer": {"top_k": 32}},
        train={"max_steps": 4},
        curriculum={"weights": {"kd": 0.9, "lm": 0.1}},
        eval={"every": 4, "max_batches": 2, "at_start": True},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu"),
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("cross-tokenizer (shared_topk): "))
    assert "teacher tokens per student token" in line and "of the loss-bearing positions paired" in line
    assert "sampled examples cannot align (dropped)" in line
    assert "packing documents" in proc.stdout  # text data packs whole examples for two tokenizers
    assert "warning: curriculum.temperature" not in proc.stdout
    from dsdistill.preflight import describe

    hot = {**cfg, "curriculum": {**cfg["curriculum"], "temperature": 2.0}}
    plan, data = preflight(validate(hot), world=1)
    assert "warning: curriculum.temperature reaches 2: with another tokenizer the rest bucket" in describe(plan, data)
    train(validate(cfg))
    steps, evals = _records(tmp_path / "run", "train"), _records(tmp_path / "run", "eval")
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert all(np.isfinite(r["losses"]["kd"]) and r["losses"]["kd"] > 0 for r in steps)
    assert evals[-1]["losses"]["kd"] < evals[0]["losses"]["kd"]
    assert _records(tmp_path / "run", "run_start")[0]["kd"]["cross_tokenizer"] == "shared_topk"


def test_kd_is_averaged_over_the_paired_positions(make_config, bpe_teacher):
    """The data's pairs: every pair reads the same text on both sides (checked against the two tokenizers' own
    offsets of each example), and the KD unit counts exactly the loss-bearing positions that have one."""
    from transformers import AutoTokenizer

    from dsdistill.data import collate
    from dsdistill.objective import count_units
    from dsdistill.trainer import cross_input

    cfg = make_config(teacher={"path": str(bpe_teacher), "cross_tokenizer": {}}, curriculum={"weights": {"kd": 1.0}})
    plan, data = preflight(validate(cfg), world=1)
    s_tok, t_tok = data.tokenizer, AutoTokenizer.from_pretrained(bpe_teacher)
    rows = [data.splits.train[i] for i in range(8)]
    batch = collate(rows)
    units = count_units(batch["labels"], -100, batch["x_pos"])
    cross = cross_input(batch, -100)
    assert units["pair"] == len(cross.kd) and units["token"] == len(cross.kd) + len(cross.lm_only)
    for b, row in enumerate(rows):
        s_ids, t_ids = row["input_ids"].tolist(), row["t_input_ids"].tolist()
        for p, j in enumerate(row["x_pos"].tolist()):
            if j < 0:
                continue
            # the example each side is in starts where its positions restart; both have read the same words
            s0 = p - int(row["position_ids"][p])
            t0 = j - int(row["t_position_ids"][j])
            s_text = s_tok.decode(s_ids[s0 : p + 1]).replace(" ", "")
            t_text = t_tok.decode(t_ids[t0 : j + 1]).replace(" ", "")
            assert s_text == t_text, (b, p, s_text, t_text)


def test_pairs_over_two_chat_templates_read_the_same_content():
    """A student text in one template, a teacher text in another, around the same messages: each pair's two
    positions have read the same content characters, and their next tokens start at the same one
    (checked by an independent walk over the two texts' content maps)."""
    from dsdistill.formats import CHATML, TeacherText

    messages = [{"role": "user", "content": "why  is the sky blue?"}, {"role": "assistant", "content": "light scatters, mostly."}]
    from jinja2 import Template

    s_text = Template(CHATML).render(messages=messages, add_generation_prompt=False)
    t_text = Template(TEACHER_TEMPLATE).render(messages=messages, add_generation_prompt=False)

    def offsets(text, cut):  # a tokenisation: pieces ending at the given cut characters
        ends = sorted({c for c in cut if 0 < c <= len(text)} | {len(text)})
        return list(zip([0, *ends[:-1]], ends))

    s_off = offsets(
        s_text, [i + 1 for i, ch in enumerate(s_text) if not ch.isalnum()] + [i for i, ch in enumerate(s_text) if ch == " "]
    )
    t_off = offsets(t_text, [i for i, ch in enumerate(t_text) if ch in " ,.?\n"] + [i + 3 for i in range(0, len(t_text), 7)])
    side = TeacherText(SimpleNamespace(eos_token_id=None), None, same_spacing=True)  # `segments` reads the texts only
    segments = side.segments(messages, s_text, t_text, 0, "a test")
    sp, tp, _ = pair_positions(s_off, t_off, s_text, teacher_text=t_text, segments=segments)
    assert len(sp) > 5

    def content_read(text, end, spans):  # the content characters before `end`, and where the next one is
        return "".join(text[lo : min(hi, end)] for lo, hi in spans if lo < end)

    s_spans = [(a, b) for a, b, _, _ in segments]
    t_spans = [(c, d) for _, _, c, d in segments]
    for i, j in zip(sp, tp):
        s_end, t_end = s_off[i][1], t_off[j][1]
        assert content_read(s_text, s_end, s_spans) == content_read(t_text, t_end, t_spans)
        assert any(a <= s_end < b for a, b in s_spans) and any(c <= t_end < d for c, d in t_spans)
        assert s_text[s_end] == t_text[t_end]
    # one text on both sides: the pairs are the alignment's
    same = pair_positions(s_off, s_off, s_text)
    a_sp, a_tp = align(s_off, s_off).pairs()
    assert same[0].tolist() == a_sp.tolist() and same[1].tolist() == a_tp.tolist()


def test_long_and_short_examples_pair_alike():
    """`pair_positions` walks short examples in Python and long ones with numpy: the same pairs and contexts,
    on two random tokenisations of one long text (with multi-character tokens that share an end, as the bytes
    of one character do) and of its short prefixes."""
    import random

    from dsdistill import crosstok

    rng = random.Random(0)
    text = "".join(rng.choice("ab  c\nd") for _ in range(3000))

    def offsets(n: int, shared: float) -> list[tuple[int, int]]:
        out, at = [], 0
        while at < n:
            end = min(n, at + rng.randint(1, 4))
            out.append((at, end))
            if rng.random() < shared:  # a second token over the same characters (a split multi-byte character)
                out.append((at, end))
            at = end
        return out

    s_off, t_off = offsets(len(text), 0.05), offsets(len(text), 0.1)
    assert len(s_off) + len(t_off) > crosstok.SMALL
    long_pairs = crosstok.pair_positions(s_off, t_off, text)
    small_pairs = crosstok._pairs_small(s_off, t_off, text, [(0, len(text), 0, len(text))])
    for a, b in zip(long_pairs, small_pairs):
        assert a.tolist() == b.tolist()
    assert len(long_pairs[0]) > 100


def test_chat_with_each_models_own_template_trains(chat_config, bpe_chat_teacher, tmp_path):
    cfg = chat_config(
        teacher={"path": str(bpe_chat_teacher), "cross_tokenizer": {"top_k": 16}},
        curriculum={"weights": {"kd": 0.9, "lm": 0.1}},
        train={"max_steps": 2},
    )
    plan, data = preflight(validate(cfg), world=1)
    row = data.splits.train[0]
    assert (row["x_pos"] >= 0).any() and row["t_input_ids"].numel() > 0
    ex_lines = data.teacher.plan_lines()[0]
    assert "0 of" in ex_lines.split(";")[-1]  # every sampled conversation aligns
    train(validate(cfg))
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [0, 1]


# ---------------------------------------------------------------------------------------------- refusals


def _refused(cfg: dict) -> str:
    with pytest.raises(DistillError) as e:
        preflight(validate(cfg), world=1)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_runs_a_cross_tokenizer_teacher_cannot_serve_are_refused_in_one_line(
    make_config, chat_config, bpe_teacher, bpe_chat_teacher
):
    cross = {"path": str(bpe_teacher), "cross_tokenizer": {}}
    msg = _refused(make_config(teacher=cross))  # the default curriculum ramps in hidden-state terms
    assert msg.startswith("teacher.cross_tokenizer: feature, attention, layerwise, contrastive")
    assert "its positions are not the student's" in msg and "or use teacher.path" not in msg
    kd_lm = {"weights": {"kd": 0.9, "lm": 0.1}}
    msg = _refused(make_config(teacher=cross, curriculum=kd_lm, data={"packing": "concat"}))
    assert msg.startswith("data.packing: concat cuts examples mid-text")
    msg = _refused(make_config(teacher=cross, curriculum=kd_lm, loss={"fused_logits": False}))
    assert msg.startswith("teacher.cross_tokenizer: KD from a teacher with another tokenizer")
    assert msg.endswith("runs on the fused path only; set loss.fused_logits: true")
    msg = _refused(make_config(teacher={"path": str(bpe_teacher)}, curriculum=kd_lm))
    assert "set teacher.cross_tokenizer: {} to pair them by text" in msg
    rewriting = TEACHER_TEMPLATE.replace("(m['content'] or '')", "(m['content'] or '') | upper")
    msg = _refused(
        chat_config(teacher={"path": str(bpe_chat_teacher), "cross_tokenizer": {"chat_template": rewriting}}, curriculum=kd_lm)
    )
    assert msg.startswith("teacher.cross_tokenizer.chat_template: example ")
    assert "template does not render message 0's content as given" in msg
    with pytest.raises(DistillError, match="^teacher.tokenizer: a cached teacher with another tokenizer needs a local copy"):
        validate(make_config(teacher={"path": None, "cache": "/nowhere", "cross_tokenizer": {}}))
    # on-policy samples are text in the student's template: a teacher rendering chats in its own is refused
    sampled = chat_config(
        teacher={"path": str(bpe_chat_teacher), "cross_tokenizer": {}},
        curriculum={**kd_lm, "on_policy": 0.5},
        data={"packing": "none"},
    )
    msg = _refused(sampled)
    assert msg.startswith("teacher.cross_tokenizer.chat_template: sampled completions are text in the student's chat")


# ---------------------------------------------------------------------------------------------- a served teacher


def test_a_served_teacher_with_another_tokenizer_equals_the_live_one(make_config, bpe_teacher, tmp_path):
    """`teacher-serve` of the BPE teacher, asked for its top-399 of 400 at the paired positions (each packed
    example as its own sequence) and projected here: the same eval KD and teacher perplexity as the live
    cross-tokenizer teacher (whose top-16 shared tokens always lie in the server's 399)."""
    import contextlib
    import io

    from dsdistill.dist import free_port
    from dsdistill.train import open_session
    from tests.test_teacher_server import Server

    def evaluate(cfg, name):
        cfg = {**cfg, "output": {**cfg["output"], "run_dir": str(tmp_path / name)}}
        with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
            return s.evaluate(step=0), s.evaluator.teacher_perplexity(s.eval_batches()), s.teacher.capabilities()

    base = make_config(curriculum={"weights": {"kd": 1.0, "lm": 0.5}, "temperature": 2.0}, data={"max_documents": 200})
    live_cfg = {**base, "teacher": {"path": str(bpe_teacher), "cross_tokenizer": {"top_k": 16}}}
    live, live_ppl, _ = evaluate(live_cfg, "live")
    server = Server(None, free_port(), model=bpe_teacher).start()
    try:
        url = {"url": server.url, "tokenizer": str(bpe_teacher), "options": {"top_k": 399}, "cross_tokenizer": {"top_k": 16}}
        remote, remote_ppl, caps = evaluate({**base, "teacher": url}, "remote")
        with pytest.raises(DistillError, match=r"^teacher.options.top_k: a teacher server sends 8 tokens per position"):
            preflight(validate({**base, "teacher": {**url, "options": {"top_k": 8}}}), world=1)
    finally:
        server.kill()
    assert caps.remote and not caps.model_in_job
    assert remote.losses["lm"] == live.losses["lm"]
    assert remote.losses["kd"] == pytest.approx(live.losses["kd"], rel=1e-5)
    assert remote_ppl == pytest.approx(live_ppl, rel=1e-5)
    with pytest.raises(DistillError, match=r"^teacher.tokenizer: a served teacher with another tokenizer needs a local copy"):
        validate({**base, "teacher": {"url": "http://127.0.0.1:1", "cross_tokenizer": {}}})


def test_project_sparse_keeps_the_shared_tokens_of_a_top_k_and_puts_the_rest_in_the_bucket():
    """A server's top-k over the teacher's vocabulary, projected: with the whole vocabulary it is the dense
    projection; with a few tokens of which fewer than k are shared, the missing slots hold nothing and KD
    equals a float64 computation of the same buckets by hand, values and gradients."""
    from transformers import AutoTokenizer  # noqa: F401

    from dsdistill.crosstok import SharedMaps, project_sparse
    from dsdistill.losses.fused import SparseTeacher

    g = torch.Generator().manual_seed(3)
    vt, vs, n = 12, 10, 5
    # teacher ids 0..7 have student counterparts 9..2; 8..11 have none
    maps = SharedMaps(True, {"any": (np.arange(9, 1, -1), np.arange(8))})
    logits = torch.randn(n, vt, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(logits, -1)
    contexts = np.zeros(n, dtype=np.int64)
    dense = project_rows(logits, contexts, maps, top_k=4, temperatures=(2.0,))
    full = SparseTeacher(
        torch.arange(vt).repeat(n, 1),
        logp,
        torch.full((n,), float("-inf"), dtype=torch.float64),
        torch.full((n, 1), float("-inf"), dtype=torch.float64),
        (2.0,),
    )
    sparse = project_sparse(full, contexts, maps, top_k=4)
    assert torch.equal(sparse.ids, dense.ids) and sparse.absent is None
    torch.testing.assert_close(sparse.logp, dense.logp.double())
    torch.testing.assert_close(sparse.log_rest, dense.log_rest.double())
    torch.testing.assert_close(sparse.tails, dense.tails.double())
    # top-3 of the teacher with only the unshared 8..11 boosted: rows keep 0, 1 or 2 shared tokens
    boosted = logits.clone()
    boosted[:, 8:] += 6.0
    boosted[1, 0] += 20.0
    boosted[2, :2] += 20.0
    lp = torch.log_softmax(boosted, -1)
    top, ids = lp.topk(3, -1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12))
    served = SparseTeacher(ids, top, rest)
    proj = project_sparse(served, contexts, maps, top_k=2)
    assert proj.absent is not None and proj.absent[0].all() and proj.absent[1].tolist() == [False, True]
    assert not proj.absent[2].any()
    s_hidden = torch.randn(n + 1, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s_weight = torch.randn(vs, 6, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(1, n + 1, dtype=torch.long)
    options = KDOptions(temperature=1.0, chunk=2, want_lm=False)
    total, m = fused_kd_lm(s_hidden[None], s_weight, None, None, labels, coef_kd=1.0, coef_lm=0.0, options=options, t_sparse=proj)
    got = torch.autograd.grad(total, (s_hidden, s_weight))
    # by hand: each row's buckets are its shared kept tokens and everything else
    q = torch.softmax(s_hidden[:n] @ s_weight.T, -1)
    expected = 0.0
    for i in range(n):
        kept = [(int(s), float(p)) for s, p, a in zip(proj.ids[i], proj.logp[i].exp(), proj.absent[i]) if not a]
        p = torch.tensor([pk for _, pk in kept] + [1 - sum(pk for _, pk in kept)], dtype=torch.float64)
        qq = torch.stack([q[i, s] for s, _ in kept] + [1 - sum((q[i, s] for s, _ in kept), torch.zeros((), dtype=torch.float64))])
        expected = expected + (p * (p.log() - qq.log())).sum()
    want = torch.autograd.grad(expected, (s_hidden, s_weight))
    torch.testing.assert_close(m["kd"], expected.detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- on-policy


def _on_policy(chat_config, chat_assets, **over) -> dict:
    cfg = chat_config(
        data={"path": str(chat_assets["pairs"]), "format": "prompt_completion", "packing": "none"},
        train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "seq_len": 48},
        curriculum={"weights": {"kd": 1.0, "lm": 0.5}, "on_policy": 1.0},
        generation={"max_new_tokens": 8, "temperature": 1.0},
        eval={"every": 0, "at_start": False, "max_batches": 1},
    )
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _first_step(cfg: dict, run_dir):
    import contextlib
    import io

    from dsdistill.train import open_session

    run = validate({**cfg, "output": {**cfg["output"], "run_dir": str(run_dir)}})
    with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
        result = s.trainer.step([next(iter(s.data.stream))], stop_requested=False)
        return result, s.teacher


def test_on_policy_samples_are_re_read_in_the_teachers_tokens(chat_config, chat_assets, bpe_chat_teacher, tmp_path):
    """The student's sampled completions, decoded and tokenised again for the teacher: with one tokenizer on
    both sides the first on-policy step's KD equals the ordinary run's on the same samples; with the BPE
    teacher every sample re-reads, and KD trains on its paired positions (or its chunks)."""
    cfg = _on_policy(chat_config, chat_assets)
    ordinary, _ = _first_step(cfg, tmp_path / "ordinary")
    same = {**cfg, "teacher": {**cfg["teacher"], "cross_tokenizer": {"top_k": 4096}}}
    crossed, teacher = _first_step(same, tmp_path / "same")
    assert crossed.rollout["sequences"] == 2 and crossed.rollout["tokens"] == ordinary.rollout["tokens"] > 0
    assert teacher.unmatched == 0
    assert crossed.losses["kd"] == pytest.approx(ordinary.losses["kd"], rel=1e-5)
    assert crossed.losses["lm"] == pytest.approx(ordinary.losses["lm"], rel=1e-6)
    other = {**cfg, "teacher": {"path": str(bpe_chat_teacher), "cross_tokenizer": {"top_k": 16}}}
    result, teacher = _first_step(other, tmp_path / "bpe")
    assert result.rollout["sequences"] == 2 and teacher.unmatched == 0
    assert np.isfinite(result.losses["kd"]) and result.losses["kd"] > 0
    # chunk_likelihood reads the same re-read rows: the chunks between their pairs
    chunked = {**cfg, "teacher": {"path": str(bpe_chat_teacher), "cross_tokenizer": {"method": "chunk_likelihood"}}}
    result, teacher = _first_step(chunked, tmp_path / "chunks")
    assert result.rollout["sequences"] == 2 and teacher.unmatched == 0
    assert np.isfinite(result.losses["kd"]) and result.losses["kd"] > 0


# ---------------------------------------------------------------------------------------------- an offline cache


def test_a_cache_of_a_teacher_with_another_tokenizer_feeds_the_same_kd(make_config, bpe_teacher, assets, tmp_path):
    """`teacher-cache` with a cross-tokenizer config stores the teacher's rows at the paired positions, over
    the student's vocabulary; a run reading it gets the live cross-tokenizer KD within the codec's 8-bit
    quantisation. A plain config is refused on such a cache, and a cross config on a cache of another
    teacher tokenizer."""
    import contextlib
    import io

    from dsdistill.teachers.cache_writer import write_teacher_cache
    from dsdistill.train import open_session

    base = make_config(curriculum={"weights": {"kd": 1.0, "lm": 0.5}, "temperature": 2.0}, data={"max_documents": 200})
    live_cfg = {**base, "teacher": {"path": str(bpe_teacher), "cross_tokenizer": {"top_k": 12}}}
    with contextlib.redirect_stdout(io.StringIO()) as said:
        manifest = write_teacher_cache(validate(live_cfg), tmp_path / "cache", top_k=16, level_bits=None, shard_rows=16)
    assert manifest["k"] == 12 and manifest["cross_tokenizer"]["method"] == "shared_topk"  # the smallest context's share
    assert "over the student's vocabulary" in said.getvalue()

    def evaluate(cfg, name):
        cfg = {**cfg, "output": {**cfg["output"], "run_dir": str(tmp_path / name)}}
        with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
            return s.evaluate(step=0), s.evaluator.teacher_perplexity(s.eval_batches()), s.teacher.capabilities()

    live, _, _ = evaluate(live_cfg, "live")
    cached_teacher = {"cache": str(tmp_path / "cache"), "tokenizer": str(bpe_teacher), "cross_tokenizer": {"top_k": 12}}
    cached, cached_ppl, caps = evaluate({**base, "teacher": cached_teacher}, "cached")
    assert not caps.model_in_job and caps.top_k == 12
    assert cached.losses["lm"] == live.losses["lm"]
    assert cached.losses["kd"] == pytest.approx(live.losses["kd"], rel=5e-3)
    assert np.isfinite(cached_ppl) and cached_ppl > 1
    msg = _refused({**base, "teacher": {"cache": str(tmp_path / "cache")}})
    assert msg.startswith(f"teacher.cache: '{tmp_path / 'cache'}' holds the rows of a teacher with another tokenizer")
    msg = _refused({**base, "teacher": {**cached_teacher, "tokenizer": str(assets["student"])}})
    assert msg.startswith(f"teacher.tokenizer: the cache '{tmp_path / 'cache'}' was written for a teacher tokenizer")


# ---------------------------------------------------------------------------------------------- chunk_likelihood


def test_chunks_cover_the_same_text_on_both_sides(make_config, bpe_teacher):
    """`crosstok.chunks_of` on real batches of a byte-level BPE teacher and a word-level student: each chunk's
    student tokens and teacher tokens decode to the same text (an independent reading by each tokenizer's own
    decoding), every pair starts one, and only loss-bearing positions lie in one."""
    from transformers import AutoTokenizer

    from dsdistill.crosstok import chunks_of
    from dsdistill.data import collate

    cfg = make_config(
        teacher={"path": str(bpe_teacher), "cross_tokenizer": {"method": "chunk_likelihood"}}, curriculum={"weights": {"kd": 1.0}}
    )
    plan, data = preflight(validate(cfg), world=1)
    s_tok, t_tok = data.tokenizer, AutoTokenizer.from_pretrained(bpe_teacher)
    batch = collate([data.splits.train[i] for i in range(8)])
    ch = chunks_of(batch["labels"].numpy(), batch["x_pos"].numpy(), batch["t_labels"].numpy(), -100)
    lab = batch["labels"].numpy()
    b_s, p_s = np.nonzero(lab[:, 1:] != -100)  # the loss-bearing positions, in ordinal order
    s_next = lab[b_s, p_s + 1]
    t_ids = batch["t_input_ids"].numpy().reshape(-1)
    assert ch.count == int(((lab[:, 1:] != -100) & (batch["x_pos"].numpy()[:, :-1] >= 0)).sum()) > 20
    assert np.array_equal(np.unique(ch.s_chunk), np.arange(ch.count))
    assert np.array_equal(np.unique(ch.t_chunk), np.arange(ch.count))
    several = 0
    for k in range(ch.count):
        s_tokens = s_next[ch.s_members[ch.s_chunk == k]].tolist()
        t_tokens = t_ids[ch.t_rows[ch.t_chunk == k] + 1].tolist()
        several += len(t_tokens) > 1 or len(s_tokens) > 1
        s_text = s_tok.decode(s_tokens).replace(" ", "")
        t_text = t_tok.decode(t_tokens).replace(" ", "")
        assert s_text == t_text, (k, s_text, t_text)
    assert several  # some chunks are not one token on each side
    assert len(ch.to_merge[0])  # and some are one student token that the teacher spells in several


def test_chunk_likelihood_head_matches_full_logits_autograd_in_float64():
    """The fused head's chunk-likelihood term with LM (two chunked passes, gradients taken by hand) against the
    same binary KL and cross-entropy written plainly on full logits with autograd, in float64: values and
    gradients of the student's hidden states and head; rows outside every chunk get LM alone."""
    from dsdistill.losses.chunk_likelihood import fused_chunk_likelihood

    torch.manual_seed(0)
    n, d, v, c = 23, 8, 17, 9
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    chunk_of = torch.sort(torch.cat([torch.arange(c), torch.randint(0, c, (n - c - 3,))])).values
    chunk_of = torch.cat([torch.full((2,), -1), chunk_of, torch.full((1,), -1)])  # unchunked rows at both ends
    teacher = -torch.rand(c, dtype=torch.float64) * 4
    for temperature, coef_lm in ((1.0, 0.3), (2.0, 0.0)):
        objective, m = fused_chunk_likelihood(
            hidden, weight, targets, chunk_of, teacher, coef=0.7, coef_lm=coef_lm, temperature=temperature, chunk=5
        )
        g_h, g_w = torch.autograd.grad(objective, (hidden, weight))
        logq = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
        inside = chunk_of >= 0
        ls = torch.zeros(c, dtype=torch.float64).index_add(0, chunk_of[inside], logq[inside]) / temperature
        lt = teacher / temperature
        p, q = lt.exp(), ls.exp()
        plain = (p * (lt - ls) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))).sum()
        r_h, r_w = torch.autograd.grad(0.7 * plain - coef_lm * logq.sum(), (hidden, weight))
        plain, lm = float(plain.detach()), float(-logq.sum().detach())
        assert m["count"] == c
        assert float(m["kd"]) == pytest.approx(plain, rel=1e-12) and float(m["lm"]) == pytest.approx(lm, rel=1e-12)
        assert float(objective.detach()) == pytest.approx(0.7 * plain + coef_lm * lm, rel=1e-12)
        assert torch.allclose(g_h, r_h, rtol=1e-10, atol=1e-12) and torch.allclose(g_w, r_w, rtol=1e-10, atol=1e-12)
    # the one-sequence reference (losses/cross.py) is the same term
    from dsdistill.losses.cross import chunk_likelihood

    # one sequence: row r predicts token r + 1; the teacher's chunk k is its token k + 1, of probability
    # exp(teacher[k]) (a two-token row); a last row predicts nothing on each side
    s_logits = torch.cat([(hidden @ weight.T).detach(), torch.zeros(1, v, dtype=torch.float64)])
    ids = torch.cat([torch.zeros(1, dtype=torch.long), targets])
    starts = [r for r in range(2, n - 1) if r == 2 or chunk_of[r] != chunk_of[r - 1]]
    s_start, s_end = torch.tensor(starts) + 1, torch.tensor(starts[1:] + [n - 1]) + 1
    t_logits = torch.cat([torch.stack([torch.log(-torch.expm1(teacher)), teacher], 1), torch.zeros(1, 2, dtype=torch.float64)])
    t_ids = torch.ones(c + 1, dtype=torch.long)
    t_start = torch.arange(1, c + 1)
    ref, info = chunk_likelihood(s_logits, t_logits, ids, t_ids, s_start, s_end, t_start, t_start + 1, temperature=2.0)
    _, m = fused_chunk_likelihood(hidden, weight, targets, chunk_of, teacher, coef=0.0, temperature=2.0, chunk=5)
    assert info["count"] == c and float(ref) == pytest.approx(float(m["kd"]), rel=1e-9)


def test_chunk_likelihood_trains_from_live_served_and_cached_teachers(make_config, bpe_teacher, tmp_path):
    """The BPE teacher into the word-level student by `chunk_likelihood`: a run trains (finite KD that eval sees
    fall); `teacher-serve` asked for the label log-probs of the teacher's own tokens gives the live teacher's
    eval KD, and so does a cache of the chunks' likelihoods (within its fixed point); a cache of the other
    method and a divergence other than forward KL are refused in one line."""
    import contextlib
    import io

    from dsdistill.dist import free_port
    from dsdistill.teachers.cache_writer import write_teacher_cache
    from dsdistill.train import open_session
    from tests.test_teacher_server import Server

    chunked = {"method": "chunk_likelihood"}
    cfg = make_config(
        teacher={"path": str(bpe_teacher), "cross_tokenizer": chunked},
        train={"max_steps": 4},
        curriculum={"weights": {"kd": 0.9, "lm": 0.1}},
        eval={"every": 4, "max_batches": 2, "at_start": True},
        output={"run_dir": str(tmp_path / "run"), "log_every": 1},
    )
    train(validate(cfg))
    steps, evals = _records(tmp_path / "run", "train"), _records(tmp_path / "run", "eval")
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert all(np.isfinite(r["losses"]["kd"]) and r["losses"]["kd"] > 0 for r in steps)
    assert evals[-1]["losses"]["kd"] < evals[0]["losses"]["kd"]
    assert _records(tmp_path / "run", "run_start")[0]["kd"]["cross_tokenizer"] == "chunk_likelihood"

    base = make_config(curriculum={"weights": {"kd": 1.0, "lm": 0.5}}, data={"max_documents": 200})

    def evaluate(teacher, name):
        c = {**base, "teacher": teacher, "output": {**base["output"], "run_dir": str(tmp_path / name)}}
        with contextlib.redirect_stdout(io.StringIO()), open_session(validate(c)) as s:
            return s.evaluate(step=0)

    live = evaluate({"path": str(bpe_teacher), "cross_tokenizer": chunked}, "live")
    server = Server(None, free_port(), model=bpe_teacher).start()
    try:
        remote = evaluate({"url": server.url, "tokenizer": str(bpe_teacher), "cross_tokenizer": chunked}, "remote")
    finally:
        server.kill()
    assert remote.losses["lm"] == live.losses["lm"]
    assert remote.losses["kd"] == pytest.approx(live.losses["kd"], rel=1e-5)
    live_cfg = {**base, "teacher": {"path": str(bpe_teacher), "cross_tokenizer": chunked}}
    with contextlib.redirect_stdout(io.StringIO()):
        manifest = write_teacher_cache(validate(live_cfg), tmp_path / "cache", top_k=16, level_bits=None, shard_rows=16)
    assert manifest["k"] == 1 and manifest["cross_tokenizer"]["method"] == "chunk_likelihood"
    cached_teacher = {"cache": str(tmp_path / "cache"), "tokenizer": str(bpe_teacher), "cross_tokenizer": chunked}
    cached = evaluate(cached_teacher, "cached")
    assert cached.losses["lm"] == live.losses["lm"]
    assert cached.losses["kd"] == pytest.approx(live.losses["kd"], rel=1e-3)
    msg = _refused({**base, "teacher": {**cached_teacher, "cross_tokenizer": {}}})
    assert msg.startswith("teacher.cross_tokenizer.method: the cache ") and "holds chunk_likelihood rows" in msg
    msg = _refused({**live_cfg, "loss": {"kd": {"divergence": "jsd"}}})
    assert msg.startswith("loss.kd.divergence: jsd compares distributions over a vocabulary")
    msg = _refused({**live_cfg, "loss": {"kd": {"top_k": 8}}})
    assert msg.startswith("loss.kd.top_k: teacher.cross_tokenizer.method: chunk_likelihood compares each chunk")
    msg = _refused({**live_cfg, "teacher": {**live_cfg["teacher"], "cross_tokenizer": {**chunked, "top_k": 8}}})
    assert msg.startswith("teacher.cross_tokenizer.top_k: it sizes shared_topk's rows")
