"""Bad data, models and run directories stop a run before any weights load, with one line."""

import json
import subprocess
import sys

import pytest
import yaml

from dsdistill.config import validate
from dsdistill.demo import tiny_llama
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight


def fails(cfg: dict, message: str, world: int = 1):
    with pytest.raises(DistillError) as e:
        preflight(validate(cfg), world=world)
    text = str(e.value)
    assert message in text, text
    assert "\n" not in text


def test_missing_and_unsupported_data_files(make_config, tmp_path):
    fails(
        make_config(data={"path": str(tmp_path / "nope.jsonl")}),
        "data.path: '" + str(tmp_path / "nope.jsonl") + "' does not exist",
    )
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    fails(make_config(data={"path": str(odd)}), "has extension '.xml'; expected one of .jsonl")


def test_text_field_missing_lists_columns(make_config):
    fails(make_config(data={"text_field": "body"}), "data.text_field: 'body' is not a column of")
    fails(make_config(data={"text_field": "body"}), "columns are: text")


def test_empty_and_too_small_datasets(make_config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DistillError, match="data.path: cannot load|is empty"):
        preflight(validate(make_config(data={"path": str(empty)})), world=1)
    tiny = tmp_path / "tiny.jsonl"
    tiny.write_text("\n".join(json.dumps({"text": "count : one two three ."}) for _ in range(40)))
    fails(make_config(data={"path": str(tiny)}), "the eval split holds fewer than seq_len=32 tokens")
    with pytest.raises(DistillError, match=r"packs into \d+ sequences of 32 tokens; one optimizer step needs 64 \(micro"):
        preflight(
            validate(
                make_config(data={"path": str(tiny), "eval_path": str(tiny)}, train={"micro_batch_size": 8, "grad_accum": 4})
            ),
            world=2,
        )


def test_missing_model_paths(make_config, tmp_path):
    fails(
        make_config(teacher={"path": str(tmp_path / "no-teacher")}),
        "teacher.path: '" + str(tmp_path / "no-teacher") + "' does not exist",
    )
    (tmp_path / "empty-model").mkdir()
    fails(
        make_config(student={"path": str(tmp_path / "empty-model")}),
        "student.path: '" + str(tmp_path / "empty-model") + "' has no config.json",
    )


def test_seq_len_beyond_the_model(make_config):
    fails(make_config(train={"seq_len": 4096}), "train.seq_len: 4096 exceeds the teacher's max_position_embeddings (128)")


def test_vocab_mismatch_for_logit_kd(make_config, assets, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    teacher = tiny_llama(96, hidden=16, layers=1, heads=2, kv_heads=1)
    teacher.save_pretrained(tmp_path / "t")
    other.save_pretrained(tmp_path / "t")
    fails(make_config(teacher={"path": str(tmp_path / "t")}), "teacher and student vocabularies differ (3 vs")
    # without logit KD the same pair is allowed
    plan, _ = preflight(
        validate(make_config(teacher={"path": str(tmp_path / "t")}, curriculum={"weights": {"lm": 1.0}})), world=1
    )
    assert plan.curriculum.active == ("lm",)


def test_unwritable_run_dir(make_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fails(make_config(output={"run_dir": str(blocker / "run")}), "output.run_dir: '" + str(blocker / "run") + "' is not writable")


def test_kd_early_stopping_needs_kd(make_config):
    fails(
        make_config(curriculum={"weights": {"lm": 1.0}}, eval={"early_stopping": {"metric": "kd"}}),
        "eval.early_stopping.metric: 'kd' is not computed in this run",
    )


def test_check_prints_the_plan(make_config, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(make_config(train={"grad_accum": 2, "max_steps": None, "epochs": 2})))
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(cfg), "--world-size", "2"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "world size 2; global batch 16 sequences = micro 4 x accumulation 2 x world 2" in proc.stdout
    assert "ZeRO-3, frozen" in proc.stdout and proc.stdout.strip().endswith("check: ok")
