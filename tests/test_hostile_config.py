"""Values that passed `check` and then damaged a run, and config files that parse into something other
than what they say: each is refused by `check` in one line naming the field (or the file and its lines),
before anything is loaded or written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsdistill.config import load_config
from dsdistill.dist import without_world_env
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight


def _check(cfg_path: Path, overrides=()):
    preflight(load_config(cfg_path, list(overrides)), world=1)


def _refused(path: Path, expected: str, overrides=()) -> str:
    with pytest.raises(DistillError) as e:
        _check(path, overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(expected), msg
    return msg


def _yaml(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("curriculum.weights.kd=.inf", "curriculum.weights.kd"),
        ("curriculum.temperature=.inf", "curriculum.temperature"),
        ("curriculum.temperature=.nan", "curriculum.temperature"),
        ("optimizer.betas=[1.5, 0.9]", "optimizer.betas.0"),
        ("train.seed=-1", "train.seed"),
        (f"train.seed={2**63}", "train.seed"),
        ("loss.contrastive.dim=1000000000", "loss.contrastive.dim"),
        ("loss.attention.chunk=1000000000000", "loss.attention.chunk"),
        ("train.epochs=1000000000", "train.epochs"),
        ("train.grad_clip=.inf", "train.grad_clip"),
        ('output.run_dir=""', "output.run_dir"),
        ("output.run_dir='  '", "output.run_dir"),
        ("loss.ignore_index=5", "loss.ignore_index: 5 is a token id of this vocabulary"),
        (
            "deepspeed.student={optimizer: {type: Bogus}}",
            "deepspeed.student: optimizer.type 'Bogus' is not a DeepSpeed optimizer",
        ),
        (
            "deepspeed.student={zero_optimization: {stage: two}}",
            "deepspeed.student: zero_optimization.stage must be an integer (1, 2 or 3), got 'two'",
        ),
        (
            "deepspeed.student={zero_optimization: {stage: [2]}}",
            "deepspeed.student: zero_optimization.stage must be an integer (1, 2 or 3), got [2]",
        ),
        ("deepspeed.student={bf16: true}", "deepspeed.student: bf16 must be a mapping"),
        ("deepspeed.student={zero_optimization: 2}", "deepspeed.student: zero_optimization must be a mapping"),
        (
            "deepspeed.teacher={zero_optimization: {stage: three}}",
            "deepspeed.teacher: zero_optimization.stage must be an integer",
        ),
    ],
)
def test_values_that_would_damage_training_are_refused_by_check(make_config, tmp_path, override, expected):
    _refused(_yaml(tmp_path, make_config()), expected, [override])


def test_two_lr_schedules_are_refused_and_the_one_that_runs_is_named(make_config, tmp_path):
    hf_style = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_max_lr": "auto", "warmup_min_lr": "auto"},
        },
    }
    cfg = make_config(deepspeed={"student": hf_style}, scheduler={"kind": "cosine", "warmup_steps": 2})
    _refused(_yaml(tmp_path, cfg), "deepspeed.student: has a scheduler block (WarmupDecayLR) and run.yaml's scheduler sets kind")
    cfg["scheduler"] = {"warmup_steps": 2}  # only what fills the block's "auto" values: one schedule
    from dsdistill.preflight import plan_dict

    plan, data = preflight(load_config(_yaml(tmp_path, cfg)), world=1)
    assert plan_dict(plan, data)["lr_schedule"].startswith("DeepSpeed WarmupDecayLR from deepspeed.student")


def test_chat_data_without_assistant_turns_is_refused(chat_config, tmp_path):
    data = tmp_path / "users_only.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "count one two"}]}) + "\n" for _ in range(60)))
    cfg = chat_config(data={"path": str(data), "format": "chat", "eval_fraction": 0.1})
    _refused(_yaml(tmp_path, cfg), "data: no training token carries loss (54 examples)")


def test_duplicate_keys_are_refused_naming_both_lines(make_config, tmp_path):
    text = yaml.safe_dump(make_config(), sort_keys=False)
    dup = tmp_path / "dup.yaml"
    dup.write_text(text + "optimizer:\n  lr: 1.0\n")
    first = text.splitlines().index("optimizer:") + 1
    last = len(text.splitlines()) + 1
    msg = _refused(dup, f"config file '{dup}': invalid YAML at line {last} column 1: duplicate key 'optimizer'")
    assert f"lines {first} and {last}" in msg
    js = tmp_path / "dup.json"
    js.write_text('{\n "train": {"max_steps": 4},\n "train": {"max_steps": 9}\n}\n')
    _refused(js, f"config file '{js}': duplicate key 'train' (lines 2 and 3)")


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
        for i in range(1, 9)
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 700
    _refused(bomb, f"config file '{bomb}': its aliases expand to more than 1,000,000 values")


def test_check_on_the_command_line_says_it_in_one_line(make_config, tmp_path):
    path = _yaml(tmp_path, make_config(optimizer={"lr": float("inf")}))
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu"))
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsdistill: error: optimizer.lr"), proc.stderr
    assert not Path(make_config()["output"]["run_dir"]).exists()  # check leaves no run directory behind


def test_a_run_whose_every_step_was_skipped_does_not_end_completed(make_config, assets, tmp_path):
    """A student whose weights are NaN: every step is skipped; fewer steps than max_bad_steps once ended
    "completed" with rc 0."""
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM

    from dsdistill.config import validate
    from dsdistill.schema import METRICS_FILE, RunEnd, parse_line
    from dsdistill.train import train

    model = AutoModelForCausalLM.from_pretrained(assets["student"])
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_student")
    (tmp_path / "nan_student").joinpath("tokenizer.json").write_bytes(Path(assets["student"], "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if Path(assets["student"], name).exists():
            (tmp_path / "nan_student" / name).write_bytes(Path(assets["student"], name).read_bytes())
    cfg = make_config(
        student={"path": str(tmp_path / "nan_student")}, train={"max_steps": 3}, eval={"every": 0, "at_start": False}
    )
    with pytest.raises(DistillError, match=r"^train: all 3 optimizer steps of this run were skipped"):
        with contextlib.redirect_stdout(io.StringIO()):
            train(validate(cfg))
    recs = [parse_line(x) for x in (Path(cfg["output"]["run_dir"]) / METRICS_FILE).read_text().splitlines()]
    assert isinstance(recs[-1], RunEnd) and recs[-1].reason == "error"


def test_student_weights_of_another_shape_name_the_weight(make_config, assets, tmp_path):
    import contextlib
    import io
    import shutil

    from dsdistill.config import validate
    from dsdistill.demo import tiny_llama
    from dsdistill.train import train

    wrong = tmp_path / "student"
    shutil.copytree(assets["student"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    tiny_llama(config["vocab_size"], hidden=48, layers=2, heads=2, kv_heads=1, max_pos=128, seed=2).save_pretrained(
        tmp_path / "wide"
    )
    shutil.copy(tmp_path / "wide" / "model.safetensors", wrong / "model.safetensors")  # weights of a wider model
    cfg = make_config(student={"path": str(wrong)}, train={"max_steps": 1})
    with pytest.raises(DistillError) as e, contextlib.redirect_stdout(io.StringIO()):
        train(validate(cfg))
    msg = str(e.value)
    assert msg.startswith(f"student.path: '{wrong}' does not match its config.json: weight ") and "has shape [" in msg
    assert "in the config" in msg and "\n" not in msg


def test_a_relative_deepspeed_config_resolves_from_the_config_folder_then_the_bundled_ones(make_config, tmp_path, monkeypatch):
    from dsdistill.config import BUNDLED_DS_CONFIGS

    (tmp_path / "cfgs").mkdir()
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 1}}
    (tmp_path / "cfgs" / "mine.json").write_text(json.dumps(ds))
    cfg = make_config(deepspeed={"student": "mine.json", "teacher": "teacher_zero3.json"})
    path = tmp_path / "cfgs" / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # not the config's folder: "mine.json" is not here
    loaded = load_config(path)
    assert loaded.deepspeed.student == str((tmp_path / "cfgs" / "mine.json").resolve())
    assert loaded.deepspeed.teacher == str((BUNDLED_DS_CONFIGS / "teacher_zero3.json").resolve())
    preflight(loaded, world=1)


@pytest.mark.parametrize("family", ["gemma2", "mistral-window", "qwen2-window"])
def test_attention_terms_on_layers_the_rebuild_cannot_reproduce_are_left_out_by_check(make_config, assets, tmp_path, family):
    """Gemma-2: check said ok with sdpa, then loading refused it; with eager the rebuilt attention ignored
    the sliding window (80-90% of its mass outside it) and the soft-cap. check's verdict now matches what
    loading and the loss can do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, MistralConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    base = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    config = {
        "gemma2": lambda: Gemma2Config(**base, head_dim=8, sliding_window=8),
        "mistral-window": lambda: MistralConfig(**base, sliding_window=8),
        "qwen2-window": lambda: Qwen2Config(**base, use_sliding_window=True, sliding_window=8, max_window_layers=0),
    }[family]()
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    cfg = make_config(teacher={"path": str(tmp_path / "teacher")}, curriculum={"weights": {"kd": 1.0, "attention": 0.5}})
    if family == "gemma2":
        _refused(
            _yaml(tmp_path, cfg),
            "teacher.attn_implementation: Gemma2ForCausalLM does not support 'sdpa'; set teacher.attn_implementation: eager",
        )
        cfg["teacher"]["attn_implementation"] = "eager"
    plan, _ = preflight(load_config(_yaml(tmp_path, cfg)), world=1)
    why = plan.left_out.get("attention", "")
    assert "attention" not in plan.curriculum.active and why, plan.left_out
    if family == "mistral-window":
        assert "sliding window of 8 tokens, shorter than the rows (32)" in why
    short = {**cfg, "train": {**cfg["train"], "seq_len": 8}}  # rows no longer than the window: exact again
    if family != "gemma2":
        plan, _ = preflight(load_config(_yaml(tmp_path, short)), world=1)
        assert "attention" in plan.curriculum.active, plan.left_out
