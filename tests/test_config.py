import json
import subprocess
import sys

import pytest
import yaml

from dsdistill.config import apply_overrides, load_config, validate
from dsdistill.ds_config import resolve_student, resolve_teacher
from dsdistill.errors import ConfigError


def write(tmp_path, data, name="run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return p


BAD = [
    # (mutation of the good config, expected message fragment)
    (lambda c: c["train"].update(micro_batch_size=0), "train.micro_batch_size: got 0; expected greater than or equal to 1"),
    (lambda c: c["train"].update(precision="fp8"), "train.precision: got \"fp8\"; expected 'auto', 'fp32', 'bf16' or 'fp16'"),
    (lambda c: c["train"].update(max_steps=10, epochs=2), "train: got {...}; set max_steps or epochs, not both"),
    (lambda c: c["train"].update(batch_size=4), "train.batch_size: unknown key; expected one of: epochs, grad_accum, grad_clip"),
    (
        lambda c: c.update(trainer={}),
        "trainer: unknown key; expected one of: checkpoint, curriculum, data, deepspeed, eval, generation, loss",
    ),
    (lambda c: c.pop("teacher"), "teacher: set teacher (one teacher) or teachers (a list of named teachers), exactly one"),
    (lambda c: c.update(teachers=[{"name": "a b", "path": "x"}, {"name": "c", "path": "y"}]), 'teachers.0.name: got "a b"'),
    (lambda c: c["optimizer"].update(lr="fast"), 'optimizer.lr: got "fast"; expected a valid number'),
    (lambda c: c["optimizer"].update(lr=-1), "optimizer.lr: got -1; expected greater than 0"),
    (lambda c: c["data"].update(eval_fraction=1.5), "data.eval_fraction: got 1.5; expected less than 1"),
    (
        lambda c: c["scheduler"].update(warmup_ratio=0.1, warmup_steps=5),
        "scheduler: got {...}; set warmup_steps or warmup_ratio, not both",
    ),
    (
        lambda c: c["eval"].update(early_stopping={"metric": "accuracy"}),
        "eval.early_stopping.metric: got \"accuracy\"; expected 'ppl', 'lm_ce', 'kd' or 'objective'",
    ),
    (lambda c: c["deepspeed"].update(student=5), "deepspeed.student: got 5; expected a valid string"),
    (lambda c: c["loss"].update(kd={"top_k": 0}), "loss.kd.top_k: got 0; expected greater than or equal to 1"),
]


@pytest.mark.parametrize("mutate, message", BAD)
def test_bad_config_gives_one_line_naming_the_field(tmp_path, make_config, mutate, message):
    cfg = make_config(deepspeed={}, loss={})
    mutate(cfg)
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+ column \d+"):
        load_config(bad)
    badj = tmp_path / "bad.json"
    badj.write_text('{"teacher": ')
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        load_config(badj)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(lst)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)


def test_overrides_parse_values_and_reject_bad_paths(tmp_path, make_config):
    p = write(tmp_path, make_config(), "run.json")
    cfg = load_config(
        p, ["train.max_steps=42", "optimizer.betas=[0.8, 0.9]", "checkpoint.save_final=true", "data.text_field=body"]
    )
    assert cfg.train.max_steps == 42 and cfg.optimizer.betas == (0.8, 0.9) and cfg.checkpoint.save_final is True
    assert cfg.data.text_field == "body"
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="'seed' is a value, not a section"):
        apply_overrides({"train": {"seed": 1}}, ["train.seed.x=1"])
    with pytest.raises(ConfigError, match="train.max_stepz: unknown key"):
        load_config(p, ["train.max_stepz=3"])


def test_ds_auto_filled_by_the_batch_arithmetic(make_config):
    cfg = validate(make_config(train={"micro_batch_size": 3, "grad_accum": 4, "grad_clip": 0.5}))
    ds = resolve_student(cfg, world_size=8, total_steps=100, warmup_steps=10, hidden_size=32)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 3 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    from transformers import Qwen2Config

    # Qwen2.5-1.5B's shapes: the teacher prefetches a whole layer and keeps its grouped-query k/v projections
    qwen = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2)
    teacher = resolve_teacher(cfg, model_config=qwen)
    zero = teacher["zero_optimization"]
    assert zero["stage"] == 3 and "optimizer" not in teacher
    kv = 1536 * 2 * 128
    assert zero["stage3_prefetch_bucket_size"] == 2 * 1536 * 1536 + 2 * kv + 3 * 1536 * 8960
    assert zero["stage3_param_persistence_threshold"] == kv + 1  # k/v and below stay whole; q/o and the MLP are sharded
    plain = resolve_teacher(cfg)  # no model config: DeepSpeed's own defaults
    assert "stage3_prefetch_bucket_size" not in plain["zero_optimization"]


def test_ds_user_values_kept_and_conflicts_named(make_config, tmp_path):
    user = {
        "train_batch_size": 64,
        "gradient_accumulation_steps": "auto",
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto", "warmup_max_lr": "auto", "warmup_min_lr": 0}},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    raw = make_config(train={"micro_batch_size": 4, "grad_accum": 2}, deepspeed={"student": str(path)})
    raw["scheduler"] = {"warmup_steps": 5}  # the DeepSpeed block is the schedule; run.yaml fills its "auto"
    cfg = validate(raw)
    ds = resolve_student(cfg, world_size=8, total_steps=50, warmup_steps=5)
    assert ds["train_batch_size"] == 64 and ds["optimizer"]["params"] == {"lr": 2e-3, "weight_decay": 0.1}
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5 and ds["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError) as e:
        resolve_student(cfg, world_size=2, total_steps=50, warmup_steps=5)
    assert str(e.value) == (
        "deepspeed.student: train_batch_size=64 conflicts with micro_batch_size*grad_accum*world_size "
        '(4*2*2)=16; set it to "auto" or make them agree'
    )


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        (
            {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}},
            None,
            "deepspeed.student: train.precision='fp32' but bf16.enabled is true",
        ),
        ({"zero_optimization": {"stage": 7}}, None, "zero_optimization.stage=7; expected 1, 2 or 3"),
        (
            {"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}},
            None,
            'zero_optimization.allgather_bucket_size is "auto" but dsdistill has no run-config value',
        ),
        (
            None,
            {"zero_optimization": {"stage": 2}},
            "deepspeed.teacher: zero_optimization.stage=2; the teacher engine must be stage 3",
        ),
        (None, {"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "deepspeed.teacher: has an 'optimizer' block"),
        ("missing.json", None, "deepspeed.student DeepSpeed config 'missing.json' does not exist"),
    ],
)
def test_ds_config_errors(make_config, student, teacher, message):
    cfg = validate(make_config(deepspeed={"student": student, "teacher": teacher}))
    with pytest.raises(ConfigError) as e:
        resolve_student(cfg, world_size=1, total_steps=10, warmup_steps=0)
        resolve_teacher(cfg)
    assert message in str(e.value)


def test_cli_prints_one_line_and_no_traceback(tmp_path, make_config):
    cfg = make_config()
    cfg["train"]["seq_len"] = 1
    p = write(tmp_path, cfg)
    proc = subprocess.run([sys.executable, "-m", "dsdistill", "check", "--config", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dsdistill: error: train.seq_len: got 1; expected greater than or equal to 2"
    assert "Traceback" not in proc.stderr


def test_flat_loss_keys_of_earlier_configs_still_work_with_a_one_line_note(tmp_path, make_config, capsys):
    """Each component's options are its own section now (`loss.kd.top_k`); a config written with the flat
    keys (`loss.kd_top_k`) means the same run, and `check` says once, in one line per key, what they are now."""
    old = make_config(loss={"kd_top_k": 8, "kd_top_k_rest": True, "router_conditioned": True, "attention_chunk": 16})
    new = make_config(loss={"kd": {"top_k": 8, "top_k_rest": True}, "router": {"conditioned": True}, "attention": {"chunk": 16}})
    assert validate(old).model_dump() == validate(new).model_dump()
    from dsdistill import cli, config

    config._SAID.clear()  # said once per process: the validations above said them already
    capsys.readouterr()
    assert cli.main(["check", "--config", str(write(tmp_path, old))]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dsdistill: note: loss.")]
    assert notes == [
        "dsdistill: note: loss.kd_top_k is now loss.kd.top_k (the old key still works)",
        "dsdistill: note: loss.kd_top_k_rest is now loss.kd.top_k_rest (the old key still works)",
        "dsdistill: note: loss.attention_chunk is now loss.attention.chunk (the old key still works)",
        "dsdistill: note: loss.router_conditioned is now loss.router.conditioned (the old key still works)",
    ]
    with pytest.raises(ConfigError, match=r"^loss.kd_top_k: given twice \(also as loss.kd.top_k\); keep loss.kd.top_k$"):
        validate(make_config(loss={"kd_top_k": 8, "kd": {"top_k": 4}}))
