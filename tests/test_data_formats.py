"""The data users distil on: chat, prompt/completion and pretokenized sets with loss masks, packing that
keeps examples apart, streamed corpora that resume exactly, mixtures, and the plan `dsdistill check` prints.

Masks are checked token by token against an independent reading of the rendered ChatML; the packed rows
against the examples they came from; KD and LM on a masked batch against a float64 reference of the raw
models that counts assistant tokens only."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dsdistill.config import FormatFields, validate
from dsdistill.data import MixedStream, build_splits, eval_batches, make_stream
from dsdistill.errors import DataError, DistillError
from dsdistill.formats import Example, renderer
from dsdistill.packing import Packer
from dsdistill.preflight import preflight
from dsdistill.rundir import record_checksums
from dsdistill.schema import METRICS_FILE, EvalRecord, RunStart, TrainRecord, parse_line
from dsdistill.train import open_session, train


def _tok(chat_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_assets["tokenizer"])


def _conversations(chat_assets) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in Path(chat_assets["chat"]).read_text().splitlines()]


def _expected_mask(tokens: list[str], loss_on: str) -> list[bool]:
    """Independent of the renderer: walk the ChatML tokens; an assistant turn's content and its <|im_end|>
    carry loss (its header does not)."""
    turns: list[tuple[str, list[int]]] = []  # (role, token positions of content + end marker)
    i = 0
    while i < len(tokens):
        assert tokens[i] == "<|im_start|>", tokens[i:]
        role, j = tokens[i + 1], i + 2
        body = []
        while tokens[j] != "<|im_end|>":
            body.append(j)
            j += 1
        turns.append((role, body + [j]))
        i = j + 1
    mask = [False] * len(tokens)
    assistant = [positions for role, positions in turns if role == "assistant"]
    if loss_on == "all":
        return [True] * len(tokens)
    for positions in assistant[-1:] if loss_on == "last_assistant" else assistant:
        for p in positions:
            mask[p] = True
    return mask


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
def test_chat_masks_follow_the_rendered_template_token_by_token(chat_assets, loss_on):
    tok = _tok(chat_assets)
    conversations = _conversations(chat_assets)
    render = renderer(FormatFields(format="chat", loss_on=loss_on), tok, field="data", where="chat", ignore_index=-100)
    examples = render({"messages": conversations}, range(len(conversations)))
    roles = {m["role"] for c in conversations for m in c}
    assert roles == {"system", "user", "assistant", "tool"}  # every role, multi-turn and tool turns included
    assert any(len([m for m in c if m["role"] == "assistant"]) > 2 for c in conversations)
    for conv, ex in zip(conversations, examples):
        assert ex is not None
        tokens = tok.convert_ids_to_tokens(ex.ids)
        assert tok.decode(ex.ids) == tok.decode(
            tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
        )
        assert ex.loss == _expected_mask(tokens, loss_on)
        if loss_on == "assistant":  # the loss-bearing words are exactly the assistant contents
            said = [w for m in conv if m["role"] == "assistant" for w in m["content"].split() + ["<|im_end|>"]]
            assert [t for t, keep in zip(tokens, ex.loss) if keep] == said


def test_prompt_completion_carries_loss_on_the_completion_and_its_end(chat_assets):
    tok = _tok(chat_assets)
    rows = [json.loads(line) for line in Path(chat_assets["pairs"]).read_text().splitlines()][:50]
    render = renderer(FormatFields(format="prompt_completion"), tok, field="data", where="pairs", ignore_index=-100)
    for row, ex in zip(
        rows, render({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]}, range(50))
    ):
        tokens = tok.convert_ids_to_tokens(ex.ids)
        assert [t for t, keep in zip(tokens, ex.loss) if not keep] == row["prompt"].split()
        assert [t for t, keep in zip(tokens, ex.loss) if keep] == row["completion"].split() + ["<eos>"]
    # conversational pairs: the prompt is a message list, the completion the assistant's answer
    conv = _conversations(chat_assets)[0]
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    ex = render({"prompt": [conv[:last]], "completion": [conv[last:]]}, [0])[0]
    tokens = tok.convert_ids_to_tokens(ex.ids)
    assert [t for t, keep in zip(tokens, ex.loss) if keep] == conv[last]["content"].split() + ["<|im_end|>"]


def test_pretokenized_labels_and_loss_masks(chat_assets):
    tok = _tok(chat_assets)
    make = lambda **kw: renderer(  # noqa: E731
        FormatFields(format="pretokenized", **kw),
        tok,
        field="data",
        where="tokens.parquet",
        ignore_index=-100,
        columns=["input_ids", "labels", "loss_mask"],
    )
    ids = [[5, 6, 7, 8], [9, 10]]
    out = make()({"input_ids": ids, "labels": [[-100, 6, 7, -100], [-100, -100]], "loss_mask": [[1, 1, 1, 1], [1, 1]]}, [0, 1])
    assert out[0] == Example([5, 6, 7, 8], [False, True, True, False]) and out[1] is None  # no loss: skipped
    out = make(loss_mask_field="loss_mask")({"input_ids": ids, "loss_mask": [[0, 1, 1, 0], [1, 1]]}, [0, 1])
    assert out[0].loss == [False, True, True, False] and out[1].loss == [True, True]
    with pytest.raises(DataError, match=r"^data.labels_field: example 0 of tokens.parquet: labels must equal input_ids"):
        make()({"input_ids": [[5, 6]], "labels": [[6, 7]]}, [0])
    with pytest.raises(DataError, match=rf"^data.input_ids_field: example 3 of tokens.parquet holds token id {len(tok)}; "):
        make()({"input_ids": [[5, len(tok)]], "labels": [[5, 5]]}, [3])


def test_documents_packing_keeps_examples_apart_and_counts_overlong(chat_assets):
    exs = [Example([10 + i] * n, [True] * n) for i, n in enumerate([5, 3, 9, 4, 2])]
    pack = Packer(kind="documents", seq_len=8, pad_id=2, ignore_index=-100)
    rows = pack(exs)
    # 5+3 fill a row; 9 is cut to 8 and fills one; 4+2 share the last, padded
    assert [r["input_ids"] for r in rows] == [[10] * 5 + [11] * 3, [12] * 8, [13] * 4 + [14] * 2 + [2, 2]]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2]
    assert rows[2]["position_ids"] == [0, 1, 2, 3, 0, 1, 0, 1]  # padding restarts too: it sees only itself
    # an example's first token is never a target (its predictor is another example's last position)
    assert rows[0]["labels"] == [-100, 10, 10, 10, 10, -100, 11, 11]
    assert rows[2]["labels"] == [-100, 13, 13, 13, -100, 14, -100, -100]
    st = pack.stats
    assert (st.examples, st.truncated, st.dropped, st.sequences, st.tokens) == (5, 1, 0, 3, 5 + 3 + 8 + 4 + 2)
    assert st.loss_tokens == sum(sum(lab != -100 for lab in r["labels"][1:]) for r in rows) == 4 + 2 + 7 + 3 + 1
    drop = Packer(kind="documents", seq_len=8, pad_id=2, ignore_index=-100, overlong="drop")
    assert all(12 not in r["input_ids"] for r in drop(exs)) and drop.stats.dropped == 1
    one = Packer(kind="none", seq_len=8, pad_id=2, ignore_index=-100)
    assert len(one(exs)) == 5 and one.stats.truncated == 1


def test_check_prints_the_data_plan_and_its_json(chat_config, tmp_path):
    cfg = chat_config(data={"overlong": "drop"}, train={"seq_len": 48})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path), "--json", "--world-size", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["world_size"] == 2 and plan["global_batch"] == 4 and plan["total_steps"] == 4
    d = plan["data"]
    assert d["packing"] == "documents" and not d["estimated"]
    held_out = round(240 * 0.1)
    assert d["examples"] == 240 - held_out  # every training conversation is counted once, dropped ones too
    assert 0 < d["dropped"] < d["examples"] and d["truncated"] == 0
    assert 0 < d["loss_tokens"] < d["tokens"] and d["loss_share"] == pytest.approx(d["loss_tokens"] / d["tokens"])
    # against the packed rows themselves: the plan counts what the normalisers will count
    plan_obj, data = preflight(validate(cfg), world=2)
    rows = data.splits.train
    carried = sum(int((rows[i]["labels"][1:] != -100).sum()) for i in range(len(rows)))
    assert d["loss_tokens"] == carried and d["sequences"] == len(rows)
    text = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path)], capture_output=True, text=True, timeout=300
    ).stdout
    assert "data: packing documents" in text and f"{d['dropped']:,} overlong dropped" in text and "carry loss" in text


def _reference(model_dir, batch):
    """float64 logits of the raw model, each packed example run on its own (nothing packed about it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(torch.float64).eval()
    out = torch.zeros(*batch["input_ids"].shape, model.config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        for b, (ids, pos) in enumerate(zip(batch["input_ids"], batch["position_ids"])):
            starts = torch.nonzero(pos == 0).flatten().tolist() + [len(pos)]
            for a, z in zip(starts, starts[1:]):
                out[b, a:z] = model(input_ids=ids[None, a:z]).logits[0]
    return out


def test_kd_and_lm_on_masked_batches_count_assistant_tokens_only(chat_config, chat_assets):
    cfg = validate(chat_config(curriculum={"weights": {"kd": 1.0, "lm": 1.0}, "temperature": 2.0}))
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as s:
        r = s.evaluate(step=0)
        batches = list(eval_batches(s.data.splits.eval, micro_batch=2, rank=0, world=1, ignore_index=-100, max_batches=2))
    kd = lm = lm_all = 0.0
    count = count_all = 0
    T = r.temperature
    for b in batches:
        t_logits, s_logits = _reference(chat_assets["teacher"], b), _reference(chat_assets["student"], b)
        labels = b["labels"][:, 1:]
        keep = labels != -100
        sl, tl = s_logits[:, :-1], t_logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(sl.transpose(1, 2), labels.clamp_min(0), reduction="none")
        p_t = torch.log_softmax(tl / T, -1)
        kl = (p_t.exp() * (p_t - torch.log_softmax(sl / T, -1))).sum(-1) * T * T
        kd += float(kl[keep].sum())
        lm += float(ce[keep].sum())
        count += int(keep.sum())
        everything = b["input_ids"][:, 1:] != 2  # every real token, prompts included
        lm_all += float(
            torch.nn.functional.cross_entropy(sl.transpose(1, 2), b["input_ids"][:, 1:], reduction="none")[everything].sum()
        )
        count_all += int(everything.sum())
    assert r.tokens == count and count < 0.8 * count_all
    assert r.losses["kd"] == pytest.approx(kd / count, rel=1e-5)
    assert r.losses["lm"] == pytest.approx(lm / count, rel=1e-5) and r.ppl == pytest.approx(math.exp(lm / count), rel=1e-5)
    assert abs(lm_all / count_all - lm / count) > 1e-3  # a prompt-counting reference would differ


def _stream_cfg(chat_config, chat_assets, **data):
    return validate(
        chat_config(
            data={
                "path": str(chat_assets["chat"]),
                "format": "chat",
                "streaming": True,
                "eval_examples": 20,
                "shuffle_buffer": 64,
                **data,
            },
            train={"max_steps": 4, "micro_batch_size": 2, "seq_len": 96},
        )
    )


def _same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_a_streamed_position_resumes_exactly_on_every_rank(chat_config, chat_assets):
    cfg = _stream_cfg(chat_config, chat_assets)
    tok = _tok(chat_assets)
    splits = build_splits(cfg, tok)
    assert splits.streamed and splits.sources[0].estimated and len(splits.eval) > 0
    seen = []
    for rank in (0, 1):
        # through two blocks of 1,024 examples (each several epochs of this rank's ~110 conversations)
        whole_stream = make_stream(cfg, splits, tok, rank=rank, world=2)
        assert isinstance(whole_stream, MixedStream)
        it = iter(whole_stream)
        batches, states = [], []
        while whole_stream.block < 2:
            batches.append(next(it))
            states.append(whole_stream.state())  # what a checkpoint after this micro-batch stores
        crossing = next(i for i, st in enumerate(states) if st["block"] == 1)
        for at in (29, crossing - 1, crossing, crossing + 3):
            again = make_stream(cfg, splits, tok, rank=rank, world=2)
            again.restore(json.loads(json.dumps(states[at])))
            it2 = iter(again)
            assert _same([next(it2) for _ in range(12)], batches[at + 1 : at + 13]), (rank, at)
        assert whole_stream.readers[0].epoch >= 2
        # the next block was read, rendered and packed on a thread while this one's micro-batches were taken
        assert whole_stream._ahead is not None and whole_stream._ahead[1].name == "dsdistill-stream-read-ahead"
        whole_stream.close()
        assert whole_stream._ahead is None and [r.position for r in whole_stream.readers] != whole_stream.starts
        seen.append({tuple(r.tolist()) for b in batches[:30] for r in b["input_ids"]})
    assert not seen[0] & seen[1]  # each rank reads its own part


def test_streamed_training_resumed_equals_uninterrupted(chat_config, chat_assets, tmp_path):
    def run(name, **train_opts):
        cfg = _stream_cfg(chat_config, chat_assets)
        data = cfg.model_dump()
        data["output"]["run_dir"] = str(tmp_path / name)
        data["train"].update(train_opts)
        data["checkpoint"]["save_final"] = True
        with contextlib.redirect_stdout(io.StringIO()):
            train(validate(data))
        return [
            r for r in map(parse_line, (tmp_path / name / METRICS_FILE).read_text().splitlines()) if isinstance(r, TrainRecord)
        ]

    whole = run("whole")
    run("parts", stop_at_step=2)
    # the same position on another number of ranks would mean other rows (each rank streams its own part):
    # refused in one line that keeps the checkpoint (the layout claims two ranks, as a copy from a cluster would)
    step2 = tmp_path / "parts" / "checkpoints" / "step2"
    saved = (step2 / "dsdistill.json").read_text()
    (step2 / "dsdistill.json").write_text(saved.replace('"world_size": 1', '"world_size": 2'))
    record_checksums(step2)
    with pytest.raises(DistillError) as e:
        run("parts")
    assert str(e.value).startswith(f"checkpoint: '{step2}' was written by 2 ranks, this run has 1; streamed sources")
    assert "keep it" in str(e.value) and "delete" not in str(e.value)
    (step2 / "dsdistill.json").write_text(saved)
    record_checksums(step2)
    parts = run("parts")
    assert [r.step for r in whole] == [0, 1, 2, 3]
    resumed = {r.step: r for r in parts}
    for r in whole[2:]:
        assert resumed[r.step].losses == r.losses and resumed[r.step].objective == r.objective


def test_a_mixture_samples_by_weight_and_evaluates_each_source(chat_config, chat_assets, tmp_path):
    cfg = validate(
        chat_config(
            data={
                "path": None,
                "format": "text",
                "sources": [
                    {"path": str(chat_assets["corpus"]), "name": "corpus", "weight": 3.0},
                    {"path": str(chat_assets["chat"]), "name": "chat", "format": "chat", "weight": 1.0, "streaming": True},
                ],
                "eval_examples": 20,
            },
            eval={"every": 2, "max_batches": 2, "at_start": False},
        )
    )
    tok = _tok(chat_assets)
    splits = build_splits(cfg, tok)
    assert splits.packing == "documents" and [s.name for s in splits.sources] == ["corpus", "chat"]
    assert not splits.sources[0].estimated and splits.sources[1].estimated
    stream = iter(make_stream(cfg, splits, tok, rank=0, world=1))
    starts = {"chat": 0, "corpus": 0}
    start_id = tok.convert_tokens_to_ids("<|im_start|>")
    for _ in range(600):
        b = next(stream)
        for ids, pos in zip(b["input_ids"], b["position_ids"]):
            for i in torch.nonzero(pos == 0).flatten().tolist():
                if ids[i] != tok.pad_token_id:
                    starts["chat" if ids[i] == start_id else "corpus"] += 1
    share = starts["corpus"] / (starts["corpus"] + starts["chat"])
    assert share == pytest.approx(0.75, abs=0.03), starts
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    recs = [parse_line(line) for line in (Path(cfg.output.run_dir) / METRICS_FILE).read_text().splitlines()]
    start = next(r for r in recs if isinstance(r, RunStart))
    assert [s["name"] for s in start.data["sources"]] == ["corpus", "chat"] and start.data["sources"][0]["train"][
        "loss_tokens"
    ] > 0
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert evals and all(set(e.sources) == {"corpus", "chat"} for e in evals)
    for e in evals:
        assert all(math.isfinite(v["ppl"]) and v["tokens"] > 0 for v in e.sources.values())
        assert e.sources["chat"]["ppl"] != e.sources["corpus"]["ppl"]


def test_streaming_needs_max_steps_and_bad_rows_are_named(chat_config, chat_assets, tmp_path):
    cfg = chat_config(data={"streaming": True, "eval_examples": 20}, train={"max_steps": None, "epochs": 1})
    with pytest.raises(Exception, match=r"^train.max_steps: required with data.streaming"):
        preflight(validate(cfg), world=1)
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in Path(chat_assets["chat"]).read_text().splitlines()][:40]
    rows[7]["messages"][0]["role"] = "robot"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"^data.messages_field: example 7 of '.*bad.jsonl', message 0 has role 'robot'; expected one of system"
    ):
        preflight(validate(chat_config(data={"path": str(bad)})), world=1)
    with pytest.raises(
        DataError, match=r"^data.messages_field: 'conversation' is not a column of .* \(format chat\); columns are: messages"
    ):
        preflight(validate(chat_config(data={"messages_field": "conversation"})), world=1)


@pytest.mark.slow
def test_two_ranks_stream_a_packed_chat_mixture_under_zero3(chat_config, chat_assets, tmp_path):
    """The real launcher, two ranks, both engines ZeRO-3: a streamed chat set and a whole text corpus packed
    as documents, with the attention term (its rows rebuilt per packed example)."""
    from dsdistill.demo import launcher_command, launcher_env
    from dsdistill.dist import free_port
    from dsdistill.schema import RunEnd

    zero3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": "auto"}
    cfg = chat_config(
        data={
            "path": None,
            "sources": [
                {"path": str(chat_assets["chat"]), "name": "chat", "format": "chat", "streaming": True},
                {"path": str(chat_assets["corpus"]), "name": "corpus", "weight": 0.5},
            ],
            "eval_examples": 20,
        },
        curriculum={"weights": {"kd": 1.0, "lm": 0.5, "attention": 0.5}},
        loss={"attention": {"chunk": 32}},
        train={"max_steps": 3, "grad_accum": 2},
        eval={"every": 3, "max_batches": 1, "at_start": True},
        deepspeed={"student": {**zero3, "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}, "teacher": zero3},
        checkpoint={"save_final": True},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    script = Path(__file__).resolve().parent.parent / "dsdistill" / "train.py"
    proc = subprocess.run(
        launcher_command(script, path, nprocs=2, master_port=free_port()),
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [parse_line(line) for line in (Path(cfg["output"]["run_dir"]) / METRICS_FILE).read_text().splitlines()]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert [t.step for t in trains] == [0, 1, 2] and all(math.isfinite(t.objective) and t.losses["attention"] > 0 for t in trains)
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert [e.step for e in evals] == [0, 3] and all(set(e.sources) == {"chat", "corpus"} for e in evals)
    assert isinstance(recs[-1], RunEnd) and recs[-1].reason == "completed"
    # each rank streams its own rows, so the checkpoint keeps each rank's position (ZeRO-1/2 write the loop
    # state from rank 0 alone: past the first block a resumed rank 1 took rank 0's position before)
    from dsdistill import checkpoint

    with checkpoint.safe_unpickling():
        client = torch.load(
            Path(cfg["output"]["run_dir"]) / "checkpoints" / "step3" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        )
    streams = client["streams"]
    assert len(streams) == 2 and streams[0] == client["stream"] and streams[0]["row"] == streams[1]["row"] > 0


def test_data_config_errors_name_the_field(chat_config):
    from dsdistill.errors import ConfigError

    base = chat_config()
    for data, expected in (
        ({"format": "chatt"}, "data.format: got \"chatt\"; expected 'text', 'chat', 'prompt_completion' or 'pretokenized'"),
        ({"sources": [{"path": "x"}]}, "data: got {...}; set path (one source) or sources (a mixture), exactly one"),
        (
            {"path": None, "sources": [{"path": "x", "formt": "chat"}]},
            "data.sources.0.formt: unknown key; expected one of: chat_template,",
        ),
        ({"path": None, "sources": [{"path": "x", "weight": 0}]}, "data.sources.0.weight: got 0; expected greater than 0"),
        ({"loss_on": "assistants"}, "data.loss_on: got \"assistants\"; expected 'assistant', 'last_assistant' or 'all'"),
    ):
        with pytest.raises(ConfigError) as err:
            validate({**base, "data": {**base["data"], **data}})
        assert str(err.value).startswith(expected), str(err.value)


def test_chat_data_needs_one_tokenizer_for_both_models(chat_config, assets):
    from dsdistill.errors import ModelError

    cfg = validate(chat_config(teacher={"path": str(assets["teacher"])}, curriculum={"weights": {"lm": 1.0, "feature": 0.1}}))
    with pytest.raises(
        ModelError,
        match=r"^teacher.tokenizer: teacher and student vocabularies differ \(\d+ vs \d+ tokens\); chat data is rendered once",
    ):
        preflight(cfg, world=1)


def test_truncation_that_cuts_away_every_loss_token_leaves_the_example_out_and_counts_it(chat_config):
    """`loss_on: last_assistant` with the last answer past seq_len rendered rows that carried no loss, and
    packing did not count them; they are now left out and counted as emptied, alike in the Packer and in
    the whole-dataset counts."""
    ex = [Example([5] * 10, [False] * 8 + [True] * 2), Example([6] * 10, [True] * 3 + [False] * 7), Example([7] * 3, [False] * 3)]
    pack = Packer(kind="none", seq_len=6, pad_id=2, ignore_index=-100)
    rows = pack(ex)
    assert [r["input_ids"][0] for r in rows] == [6, 7]  # the prompt-only example (no loss of its own) stays
    assert (pack.stats.emptied, pack.stats.truncated) == (1, 1)
    cfg = validate(chat_config(data={"loss_on": "last_assistant", "packing": "none"}, train={"seq_len": 40}))
    _, data = preflight(cfg, world=1)
    st = data.splits.sources[0].train
    rows = data.splits.train
    assert st.emptied > 0 and st.sequences == len(rows)
    no_loss = [i for i in range(len(rows)) if not (rows[i]["labels"][1:] != -100).any()]
    prompt_only = [i for i in no_loss if rows[i]["labels"].eq(-100).all()]
    assert no_loss == prompt_only  # no row that should carry loss is empty
    # the Packer over the whole file (train and held out) counts what the whole-dataset path counted
    from transformers import AutoTokenizer

    src = cfg.data.resolved_sources()[0]
    tok = AutoTokenizer.from_pretrained(cfg.student.path)
    convs = [json.loads(x)["messages"] for x in Path(cfg.data.path).read_text().splitlines()]
    render = renderer(src, tok, field="data", where="chat", ignore_index=-100, columns=["messages"])
    whole = Packer(kind="none", seq_len=40, pad_id=0, ignore_index=-100)
    whole(render({"messages": convs}, list(range(len(convs)))))
    held = data.splits.sources[0].eval
    assert whole.stats.emptied == st.emptied + held.emptied
    assert whole.stats.tokens == st.tokens + held.tokens and whole.stats.truncated == st.truncated + held.truncated


LLAMA3_LIKE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% if loop.last and add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    "{% endfor %}"
)


@pytest.mark.parametrize("template", ["chatml", LLAMA3_LIKE], ids=["chatml", "llama3-like"])
def test_long_conversations_mask_exactly_the_assistant_turns_found_by_prefix_renders(chat_assets, template):
    """32-exchange conversations (multi-byte text, whitespace runs, a template with a default system prompt,
    `loop.last` and `trim`): the loss mask equals one computed independently, from
    `tokenizer.apply_chat_template` on every prefix, token by token."""
    import random

    tok = _tok(chat_assets)
    words = [w for w in tok.get_vocab() if w.isalpha()][:300] + ["naïve", "東京", "emoji🙂", "  spaced  out  "]
    rng = random.Random(3)
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))  # noqa: E731
    convs = []
    for c in range(6):
        msgs = [{"role": "system", "content": say()}] if c % 2 else []
        for _ in range(32):
            msgs += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        convs.append(msgs)
    source = FormatFields(format="chat", chat_template=template)
    render = renderer(source, tok, field="data", where="long", ignore_index=-100)
    examples = render({"messages": convs}, range(len(convs)))
    tmpl = render.template
    for conv, ex in zip(convs, examples):
        full = tok.apply_chat_template(conv, chat_template=tmpl, tokenize=False)
        spans = []
        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                before = tok.apply_chat_template(conv[:i], chat_template=tmpl, tokenize=False, add_generation_prompt=True)
                upto = tok.apply_chat_template(conv[: i + 1], chat_template=tmpl, tokenize=False)
                spans.append((len(before), len(upto)))
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        want = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        assert ex is not None and ex.ids == enc["input_ids"] and ex.loss == want


def test_token_starts_are_placed_in_any_set_of_spans_like_a_plain_scan():
    import random

    from dsdistill.formats import _in_spans

    rng = random.Random(0)
    for _ in range(300):
        spans = [(a, a + rng.randint(0, 9)) for a in (rng.randint(0, 60) for _ in range(rng.randint(0, 6)))]
        starts = sorted(rng.randint(0, 80) for _ in range(rng.randint(0, 40)))
        assert _in_spans(starts, spans) == [any(a <= s < b for a, b in spans) for s in starts], (spans, starts)
