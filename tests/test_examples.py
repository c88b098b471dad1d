"""The recipes in examples/ are real: `dsdistill check --world-size N` accepts each one as written, with only
its models swapped for tiny ones of the same architecture (built from configs, saved to disk) and its data
paths for generated local files of the same format. The SLURM recipe goes through its own script and
launch.sh in a fake 4-node allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsdistill.demo import _sentence, write_chat, write_corpus, write_prompt_completion

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _tiny(kind: str, vocab: int, out: Path, *, width: int, layers: int, max_pos: int) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    make = {"qwen2": tf.Qwen2Config, "llama": tf.LlamaConfig}[kind]
    cfg = make(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=kind == "qwen2",
        eos_token_id=1,
        pad_token_id=2,
        bos_token_id=None,
    )
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def recipe_assets(chat_assets, tmp_path_factory):
    """Tiny same-architecture models with the chat tokenizer, and data in each recipe's format, enough for one
    optimizer step of its global batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("recipes")
    tok = AutoTokenizer.from_pretrained(chat_assets["tokenizer"])
    out = {}
    for name, kind, width, layers in (
        ("qwen_teacher", "qwen2", 64, 3),
        ("qwen_student", "qwen2", 32, 2),
        ("llama_teacher", "llama", 64, 3),
        ("llama_student", "llama", 32, 2),
    ):
        out[name] = _tiny(kind, len(tok), root / name, width=width, layers=layers, max_pos=8192)
        tok.save_pretrained(out[name])
    out["tokenizer"] = chat_assets["tokenizer"]
    out["chat"] = write_chat(root / "chat.jsonl", conversations=14000, seed=1)
    out["pairs"] = write_prompt_completion(root / "pairs.jsonl", examples=6000, seed=2)
    out["web"] = root / "web-text"
    write_corpus(out["web"] / "part-0.jsonl", documents=1500, seed=3)
    write_corpus(out["web"] / "part-1.jsonl", documents=1500, seed=4)
    shards = root / "corpus-tokens"
    shards.mkdir()
    import random

    rng = random.Random(5)
    for i in range(4):  # pretokenized Parquet shards, as a user's own pipeline writes them
        ids = [
            tok(" ".join(_sentence(rng) for _ in range(4)), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for _ in range(1000)
        ]
        pq.write_table(pa.table({"input_ids": ids}), shards / f"part-{i:05d}.parquet")
    out["corpus-tokens"] = shards
    return out


def _check(cfg: dict, tmp_path: Path, world: int) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path), "--world-size", str(world), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,  # recipes name ds_configs/ relative to the checkout
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _load(name: str, assets: dict, teacher: str, student: str, tmp_path: Path) -> dict:
    cfg = yaml.safe_load((EXAMPLES / name).read_text())
    cfg["teacher"]["path"], cfg["student"]["path"] = str(assets[teacher]), str(assets[student])
    cfg["output"]["run_dir"] = str(tmp_path / "run")
    return cfg


def test_the_chat_recipe_on_one_8_gpu_node(recipe_assets, tmp_path):
    cfg = _load("chat-8gpu.yaml", recipe_assets, "qwen_teacher", "qwen_student", tmp_path)
    cfg["data"]["path"] = str(recipe_assets["chat"])
    plan = _check(cfg, tmp_path, 8)
    assert plan["world_size"] == 8 and plan["global_batch"] == 64 and plan["tokens_per_step"] == 64 * 4096
    assert plan["data"]["packing"] == "documents" and 0 < plan["data"]["loss_share"] < 1
    assert plan["teacher"]["zero_stage"] == 3 and plan["student"]["zero_stage"] == 2


def test_the_70b_recipe_through_its_slurm_script_on_4_nodes(recipe_assets, tmp_path):
    cfg = _load("70b-to-8b-4nodes.yaml", recipe_assets, "llama_teacher", "llama_student", tmp_path)
    cfg["data"]["path"] = str(recipe_assets["corpus-tokens"])
    plan = _check(cfg, tmp_path, 32)
    assert plan["world_size"] == 32 and plan["global_batch"] == 256 and plan["total_steps"] == 20000
    assert plan["data"]["streamed"] and plan["data"]["sources"][0]["format"] == "pretokenized"
    assert plan["student"]["zero_stage"] == 3
    # the SLURM script as sbatch runs it, in a fake 4-node allocation (scontrol expands the node list)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu1\\ngpu2\\ngpu3\\ngpu4\\n"\n')
    (fake / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NODELIST": "gpu[1-4]",
        "PYTHON": sys.executable,
    }
    overrides = [
        f"teacher.path={cfg['teacher']['path']}",
        f"student.path={cfg['student']['path']}",
        f"data.path={cfg['data']['path']}",
        f"output.run_dir={cfg['output']['run_dir']}",
    ]
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "70b-to-8b.slurm"), "--dry-run", "--", *sum((["--set", o] for o in overrides), [])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "launch.sh: slurm, 4 node(s) x 8 GPU(s) = world 32, master gpu1:29500" in proc.stdout
    assert "world size 32; global batch 256 sequences" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line.startswith("node ")]) == 4


def test_the_notebook_recipe_on_two_gpus_with_fp16(recipe_assets, tmp_path):
    cfg = _load("notebook-2gpu-fp16.yaml", recipe_assets, "qwen_teacher", "qwen_student", tmp_path)
    cfg["data"]["path"] = str(recipe_assets["pairs"])
    plan = _check(cfg, tmp_path, 2)
    assert plan["world_size"] == 2 and plan["precision"] == "fp16" and plan["total_steps"] == 3000
    assert plan["data"]["sources"][0]["format"] == "prompt_completion"


def test_the_mixture_recipe(recipe_assets, tmp_path):
    cfg = _load("mixture.yaml", recipe_assets, "qwen_teacher", "qwen_student", tmp_path)
    cfg["data"]["sources"][0]["path"] = str(recipe_assets["chat"])
    cfg["data"]["sources"][1]["path"] = str(recipe_assets["web"])
    plan = _check(cfg, tmp_path, 8)
    sources = {s["name"]: s for s in plan["data"]["sources"]}
    assert set(sources) == {"chat", "web"} and sources["web"]["streaming"] and not sources["chat"]["streaming"]
    assert sources["chat"]["weight"] == 0.7 and sources["chat"]["train"]["loss_share"] < sources["web"]["train"]["loss_share"]


def test_the_served_teacher_recipe_against_a_real_server(recipe_assets, tmp_path):
    """The teacher node's command as the recipe gives it (`teacher-serve --model DIR`), then the students'
    check for their 16-rank world, asking that server."""
    from dsdistill.dist import free_port
    from tests.test_teacher_server import Server

    server = Server(None, free_port(), model=recipe_assets["qwen_teacher"]).start()
    try:
        cfg = yaml.safe_load((EXAMPLES / "served-teacher.yaml").read_text())
        cfg["teacher"]["url"] = server.url
        cfg["student"]["path"] = str(recipe_assets["qwen_student"])
        cfg["data"]["path"] = str(recipe_assets["chat"])
        cfg["output"]["run_dir"] = str(tmp_path / "run")
        plan = _check(cfg, tmp_path, 16)
    finally:
        server.kill()
    assert plan["world_size"] == 16 and plan["global_batch"] == 64
    assert plan["teacher"]["url"] == server.url and plan["teacher"]["k"] == 64
    assert plan["memory_gib"]["teacher_shard"] == 0.0


def test_the_cross_tokenizer_recipe(recipe_assets, tmp_path):
    """A Llama teacher with a byte-level BPE tokenizer and a template of its own, the Qwen student with the
    chat tokenizer and ChatML: `check` for the recipe's 8 ranks prints the alignment plan."""
    from dsdistill.demo import build_bpe_tokenizer
    from tests.test_cross_training import TEACHER_TEMPLATE

    texts = [json.loads(line)["text"] for line in write_corpus(tmp_path / "bpe.jsonl", documents=400).read_text().splitlines()]
    tok = build_bpe_tokenizer(tmp_path / "bpe", texts, vocab_size=400)
    tok.chat_template = TEACHER_TEMPLATE
    teacher = _tiny("llama", len(tok), tmp_path / "llama_bpe", width=64, layers=3, max_pos=8192)
    tok.save_pretrained(teacher)
    cfg = yaml.safe_load((EXAMPLES / "cross-tokenizer.yaml").read_text())
    cfg["teacher"]["path"], cfg["student"]["path"] = str(teacher), str(recipe_assets["qwen_student"])
    # the chat tokenizer itself: loaded from the tiny Qwen's directory, transformers makes it a Qwen2Tokenizer
    # (from config.json's model_type), which drops the word-level vocabulary's words
    cfg["student"]["tokenizer"] = str(recipe_assets["tokenizer"])
    cfg["data"]["path"] = str(recipe_assets["chat"])
    cfg["data"]["max_documents"] = 2000  # both tokenizers render every conversation: a part of the file is enough
    cfg["output"]["run_dir"] = str(tmp_path / "run")
    plan = _check(cfg, tmp_path, 8)
    cross = plan["teacher"]["cross_tokenizer"]
    assert (
        plan["world_size"] == 8 and cross["method"] == "shared_topk" and 0 < cross["top_k"] <= 64
    )  # the tiny vocabularies share fewer
    # the student's end-of-turn markup carries loss but is no content: the assistant tokens that pair are the rest
    assert cross["unaligned"] == 0 and cross["paired_share"] > 0.6 and cross["teacher_per_student"] > 0.5
    assert plan["teacher"]["zero_stage"] == 3 and plan["student"]["zero_stage"] == 2
