"""`dsdistill init-student` on three model families built tiny from configs: keeping every block gives the
teacher's logits exactly; keeping some gives exactly those blocks' weights in order, and per-block settings
(Gemma-2's sliding/full pattern) follow them; bad layer specs are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, LlamaConfig, Qwen2Config

from dsdistill.errors import DistillError
from dsdistill.init_student import init_student, parse_layers

SMALL = {
    "vocab_size": 0,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
FAMILIES = {
    "llama": lambda v: LlamaConfig(**{**SMALL, "vocab_size": v}),
    "qwen2": lambda v: Qwen2Config(**{**SMALL, "vocab_size": v}),
    "gemma2": lambda v: Gemma2Config(**{**SMALL, "vocab_size": v, "head_dim": 8, "sliding_window": 16}),
}


@pytest.fixture(params=sorted(FAMILIES))
def teacher(request, assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param](len(tok)))
    path = tmp_path / f"teacher-{request.param}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _logits(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_keeping_every_block_reproduces_the_teachers_logits(teacher, tmp_path):
    out = init_student(teacher, "first-6", tmp_path / "student")
    ids = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(out, ids), _logits(teacher, ids))
    assert (out / "tokenizer.json").is_file()


def test_every_other_block_keeps_those_blocks_in_order_and_their_settings(teacher, tmp_path):
    out = init_student(teacher, "every-2", tmp_path / "student")
    t = AutoModelForCausalLM.from_pretrained(teacher)
    s = AutoModelForCausalLM.from_pretrained(out)
    assert s.config.num_hidden_layers == 4  # blocks 1, 3, 5 and the last (6)
    for i, j in enumerate([1, 3, 5, 6]):
        for (name, a), (_, b) in zip(s.model.layers[i].named_parameters(), t.model.layers[j - 1].named_parameters()):
            assert torch.equal(a, b), (i, j, name)
    assert torch.equal(s.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)
    if getattr(t.config, "layer_types", None):  # a sliding-window block stays one
        assert s.config.layer_types == [t.config.layer_types[j - 1] for j in (1, 3, 5, 6)]


def test_layer_specs_and_bad_ones():
    assert parse_layers("every-2", 6) == [1, 3, 5, 6] and parse_layers("every-3", 7) == [1, 4, 7]
    assert parse_layers("first-2", 6) == [1, 2] and parse_layers("last-2", 6) == [5, 6] and parse_layers("2, 4", 6) == [2, 4]
    for bad, says in (
        ("0,1", "1..6"),
        ("1,1", "distinct"),
        ("x", "every-K, first-N"),
        ("first-9", "1..6"),
        ("7", "7 is not one"),
    ):
        with pytest.raises(DistillError, match=says):
            parse_layers(bad, 6)


def test_the_command_line_writes_a_student_that_trains(assets, make_config, tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsdistill",
            "init-student",
            "--teacher",
            str(assets["teacher"]),
            "--layers",
            "every-2",
            "--out",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import contextlib
    import io

    from dsdistill.config import validate
    from dsdistill.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(validate(make_config(student={"path": str(tmp_path / "s")}, train={"max_steps": 2})))
    assert summary.reason == "completed"
