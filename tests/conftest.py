"""Shared fixtures: tiny real models saved with save_pretrained, a local tokenizer and corpus, and a
single-process gloo world for in-process DeepSpeed engines."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
from pathlib import Path

import pytest
import torch

from dsdistill.demo import build_tokenizer, pretrain, tiny_llama, write_chat, write_corpus, write_prompt_completion

# the suite runs on two pytest-xdist workers (`make test`): one thread each keeps the two cores busy without
# oversubscribing them; a single process (`pytest` alone) uses both
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_collection_modifyitems(config, items):
    """The multi-process tests first (in their own order), the in-process ones after: the two xdist workers
    start on the long runs and end on short ones, instead of one worker finishing a long launch alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Corpus, tokenizer, a briefly trained teacher and a different-shaped student, on disk."""
    root = tmp_path_factory.mktemp("assets")
    corpus = write_corpus(root / "corpus.jsonl", documents=600, seed=3)
    tok = build_tokenizer(root / "tokenizer")
    teacher = tiny_llama(len(tok), hidden=64, layers=3, heads=4, kv_heads=2, max_pos=128, seed=1)
    pretrain(teacher, tok, corpus, steps=60, seq_len=32, batch=8)
    student = tiny_llama(len(tok), hidden=32, layers=2, heads=2, kv_heads=1, max_pos=128, seed=2)
    out = {"corpus": corpus, "tokenizer": root / "tokenizer"}
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _merged(cfg: dict, sections: dict) -> dict:
    """`cfg` with each given section's keys replaced (a non-mapping value replaces the section)."""
    for key, value in sections.items():
        merged = copy.deepcopy(cfg.get(key, {}))
        if isinstance(value, dict) and isinstance(merged, dict):
            merged.update(value)
            cfg[key] = merged
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def chat_assets(tmp_path_factory) -> dict[str, Path]:
    """Chat and prompt/completion data, a ChatML word-level tokenizer, and a tiny teacher and student for it."""
    root = tmp_path_factory.mktemp("chat_assets")
    tok = build_tokenizer(root / "tokenizer", chat=True)
    out = {
        "chat": write_chat(root / "chat.jsonl", conversations=240, seed=4),
        "pairs": write_prompt_completion(root / "pairs.jsonl", examples=300, seed=5),
        "corpus": write_corpus(root / "corpus.jsonl", documents=300, seed=6),
        "tokenizer": root / "tokenizer",
    }
    teacher = tiny_llama(len(tok), hidden=64, layers=3, heads=4, kv_heads=2, max_pos=256, seed=1)
    student = tiny_llama(len(tok), hidden=32, layers=2, heads=2, kv_heads=1, max_pos=256, seed=2)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def chat_config(chat_assets, tmp_path):
    """A plain-dict run config on chat data for the chat assets."""

    def make(**sections) -> dict:
        cfg = {
            "teacher": {"path": str(chat_assets["teacher"])},
            "student": {"path": str(chat_assets["student"])},
            "data": {"path": str(chat_assets["chat"]), "format": "chat", "eval_fraction": 0.1},
            "train": {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 1, "seq_len": 96, "precision": "fp32"},
            "optimizer": {"lr": 2e-3},
            "eval": {"every": 2, "max_batches": 2, "at_start": False},
            "output": {"run_dir": str(tmp_path / "run"), "log_every": 1},
            "checkpoint": {"save_final": False},
        }
        return _merged(cfg, sections)

    return make


@pytest.fixture
def make_config(assets, tmp_path):
    """A plain-dict run config for the tiny assets; tests tweak it, then validate it."""

    def make(**sections) -> dict:
        cfg = {
            "teacher": {"path": str(assets["teacher"])},
            "student": {"path": str(assets["student"])},
            "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1},
            "train": {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 1, "seq_len": 32, "precision": "fp32"},
            "optimizer": {"lr": 2e-3},
            "scheduler": {"kind": "cosine", "warmup_steps": 2},
            "eval": {"every": 3, "max_batches": 2, "at_start": False},
            "output": {"run_dir": str(tmp_path / "run"), "log_every": 1},
            "checkpoint": {"save_final": False},
        }
        return _merged(cfg, sections)

    return make
