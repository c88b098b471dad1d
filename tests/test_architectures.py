"""Every architecture works or is refused at check time: tiny real models of several families, saved to disk.

The attention capture goes through transformers' attention registry, so it is checked against each
family's own eager attention probabilities; then a teacher and a student of each family train with the
default curriculum (every component, attention included). A model whose attention bypasses the registry
gets the component left out with a warning, said by `dsdistill check` before any weight loads.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import torch
import yaml

from dsdistill.capture import QKCapture
from dsdistill.config import validate
from dsdistill.losses.attention import head_avg_log_probs
from dsdistill.schema import METRICS_FILE, AlertRecord, RunEnd, RunStart, TrainRecord, parse_line
from dsdistill.train import train

V = 96


def family_config(kind: str, *, width: int, layers: int, heads: int):
    """A tiny config of each family (vocab V, eos 1, pad 2 like the test tokenizer)."""
    import transformers as tf

    ids = dict(vocab_size=V, eos_token_id=1, pad_token_id=2, bos_token_id=None)
    llama_like = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **ids,
    )
    if kind == "llama":
        return tf.LlamaConfig(**llama_like)
    if kind == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if kind == "qwen3":
        return tf.Qwen3Config(head_dim=width // heads, **llama_like)
    if kind == "mistral":
        return tf.MistralConfig(**llama_like)
    if kind == "gemma":
        return tf.GemmaConfig(head_dim=width // heads, **llama_like)
    if kind == "phi":
        return tf.PhiConfig(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **ids,
        )
    if kind == "gpt2":
        return tf.GPT2Config(
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            n_positions=128,
            tie_word_embeddings=False,
            vocab_size=V,
            eos_token_id=1,
            bos_token_id=1,
            pad_token_id=2,
        )
    if kind == "opt":
        return tf.OPTConfig(
            hidden_size=width,
            word_embed_proj_dim=width,
            ffn_dim=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            enable_bias=True,
            vocab_size=V,
            eos_token_id=1,
            bos_token_id=1,
            pad_token_id=2,
        )
    if kind == "falcon":
        return tf.FalconConfig(
            hidden_size=width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            vocab_size=V,
            eos_token_id=1,
            bos_token_id=1,
            pad_token_id=2,
            tie_word_embeddings=False,
        )
    raise ValueError(kind)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi", "gpt2", "opt"]


def _model(kind: str, attn: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(kind, width=32, layers=2, heads=4)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).double().eval()


@pytest.mark.parametrize("kind", FAMILIES)
def test_captured_attention_equals_each_familys_eager_attention(kind):
    sdpa = _model(kind, "sdpa")
    eager = _model(kind, "eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    cap = QKCapture(sdpa, [1, 2])
    try:
        with torch.no_grad():
            out_sdpa = sdpa(input_ids=ids)
            out_eager = eager(input_ids=ids, output_attentions=True)
    finally:
        cap.remove()
    assert torch.allclose(out_sdpa.logits, out_eager.logits, atol=1e-6)
    captured = cap.collect()
    assert sorted(captured) == [1, 2]
    for layer in (1, 2):
        q, k = captured[layer]
        ours = head_avg_log_probs(q, k, 0, 12).exp()
        reference = out_eager.attentions[layer - 1].mean(1)
        assert torch.allclose(ours, reference, atol=1e-10), (kind, layer, (ours - reference).abs().max())


def _save_pair(kind: str, root, tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = {}
    for role, (width, layers, heads, seed) in {"teacher": (48, 3, 4, 1), "student": (32, 2, 2, 2)}.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(family_config(kind, width=width, layers=layers, heads=heads))
        model.save_pretrained(root / role)
        tok.save_pretrained(root / role)
        out[role] = root / role
    return out


def _records(run_dir):
    return [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.mark.parametrize("kind", FAMILIES)
def test_each_family_trains_with_the_default_curriculum(kind, assets, tmp_path):
    pair = _save_pair(kind, tmp_path, assets["tokenizer"])
    run_dir = tmp_path / "run"
    cfg = validate(
        {
            "teacher": {"path": str(pair["teacher"])},
            "student": {"path": str(pair["student"])},
            "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1, "max_documents": 200},
            "train": {"max_steps": 2, "micro_batch_size": 2, "seq_len": 32, "precision": "fp32"},
            "eval": {"every": 0, "max_batches": 1, "at_start": False},
            "output": {"run_dir": str(run_dir), "log_every": 1},
            "checkpoint": {"save_final": False},
        }
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    assert summary.reason == "completed" and summary.steps == 2
    recs = _records(run_dir)
    start = next(r for r in recs if isinstance(r, RunStart))
    assert start.schedule["inactive"] == []
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert {"kd", "lm", "attention", "feature"} <= set(trains[-1].losses)
    assert all(v == v and abs(v) < 1e6 for t in trains for v in t.losses.values())
    assert isinstance(recs[-1], RunEnd) and recs[-1].reason == "completed"


def test_a_model_whose_attention_bypasses_the_registry_is_left_out_at_check_time(assets, tmp_path):
    """Falcon computes attention in its own code: check says so before any weight loads, training warns,
    leaves attention out, records why, and completes."""
    pair = _save_pair("falcon", tmp_path, assets["tokenizer"])
    run_dir = tmp_path / "run"
    conf = {
        "teacher": {"path": str(pair["teacher"])},
        "student": {"path": str(pair["student"])},
        "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1, "max_documents": 200},
        "train": {"max_steps": 2, "micro_batch_size": 2, "seq_len": 32, "precision": "fp32"},
        "eval": {"every": 0, "max_batches": 1, "at_start": False},
        "output": {"run_dir": str(run_dir), "log_every": 1},
        "checkpoint": {"save_final": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(conf))
    proc = subprocess.run([sys.executable, "-m", "dsdistill", "check", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (
        "warning: attention is left out: the teacher's attention cannot be captured (FalconForCausalLM computes attention in its own code"
        in proc.stdout
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(validate(conf))
    assert summary.reason == "completed"
    recs = _records(run_dir)
    start = next(r for r in recs if isinstance(r, RunStart))
    assert "attention" in start.schedule["inactive"] and "attention" not in start.schedule["active"]
    alert = next(r for r in recs if isinstance(r, AlertRecord) and r.code == "inactive_components")
    assert "attention" in alert.message and "Falcon" in alert.message


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("bert", "is a bert model (a bidirectional encoder); expected a decoder-only causal LM"),
        ("t5", "is a t5 encoder-decoder model; expected a decoder-only causal LM"),
    ],
)
def test_a_non_causal_lm_is_refused_at_check_time(kind, expected, assets, make_config, tmp_path):
    import transformers as tf

    cfg_cls = {
        "bert": lambda: tf.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        ),
        "t5": lambda: tf.T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=2, num_heads=2),
    }[kind]
    folder = tmp_path / kind
    cfg_cls().save_pretrained(folder)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(make_config(teacher={"path": str(folder), "tokenizer": str(assets["tokenizer"])})))
    proc = subprocess.run([sys.executable, "-m", "dsdistill", "check", "--config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dsdistill: error: teacher.path: '{folder}' {expected}"


@pytest.mark.parametrize("kind", [*FAMILIES, "falcon"])
def test_packed_documents_do_not_attend_to_each_other(kind):
    """Through the forward both engines run (positions restarting per example, no KV cache): a packed row's
    logits equal each example's logits run alone, to 1e-5, for every family that `documents` packing
    accepts; the others are refused by the same check a run makes at startup."""
    from dsdistill.errors import DataError
    from dsdistill.packing import Example, Packer, check_separation
    from dsdistill.teachers.live import TeacherModel

    model = TeacherModel(_model(kind, "sdpa"))
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, V, (n,), generator=g).tolist() for n in (7, 5, 9)]
    row = Packer(kind="documents", seq_len=24, pad_id=2, ignore_index=-100)([Example(d, [True] * len(d)) for d in docs])[0]
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])

    def logits_of(i, p):
        return model(i, hidden_states=False, head=True, position_ids=p)[0]

    if kind in ("opt", "falcon"):
        with pytest.raises(DataError, match=rf"^data.packing: documents: the student \({kind}\) lets packed examples attend"):
            check_separation("student", kind, logits_of, vocab=V, device="cpu", half=False)
        return
    check_separation("student", kind, logits_of, vocab=V, device="cpu", half=False)
    with torch.no_grad():
        packed = logits_of(ids, pos)[0]
        start = 0
        for d in docs:
            alone = model(torch.tensor([d]), hidden_states=False, head=True)[0][0]
            assert torch.allclose(packed[start : start + len(d)], alone, atol=1e-5, rtol=0), kind
            start += len(d)
