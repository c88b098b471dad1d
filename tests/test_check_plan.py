"""What `dsdistill check` tells a user before a run: the token that separates text documents (and a way
to pick another), the on-policy schedule and generation settings, and rendered examples with the tokens
that carry loss marked; run through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight


def _check(cfg: dict, tmp_path, *args) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, "-m", "dsdistill", "check", "--config", str(path), *args], capture_output=True, text=True, env=env
    )


def test_check_names_the_document_separator_and_data_separator_changes_it(make_config, tmp_path):
    from transformers import AutoTokenizer

    cfg = make_config()
    tok = AutoTokenizer.from_pretrained(cfg["student"]["path"])
    proc = _check(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"documents end with {tok.eos_token!r} (id {tok.eos_token_id}, the tokenizer's EOS; set data.separator" in proc.stdout
    other = next(t for t in tok.get_vocab() if t != tok.eos_token and t.startswith("<"))
    plan, data = preflight(validate(make_config(data={"separator": other})), world=1)
    rows = data.splits.train
    ids = [int(x) for i in range(len(rows)) for x in rows[i]["input_ids"]]
    assert tok.get_vocab()[other] in ids and tok.eos_token_id not in ids
    try:
        preflight(validate(make_config(data={"separator": "<no-such-token>"})), world=1)
        raise AssertionError("accepted a separator outside the vocabulary")
    except DistillError as e:
        assert str(e).startswith("data.separator: '<no-such-token>' is not a token of the tokenizer's vocabulary")


def test_check_shows_on_policy_settings_and_a_marked_example(chat_config, tmp_path):
    cfg = chat_config(
        data={"packing": "none"},
        curriculum={
            "weights": {"kd": 1.0},
            "on_policy": {"kind": "linear", "start": 0, "end": 1, "start_value": 0, "end_value": 0.5},
        },
        generation={"max_new_tokens": 24, "temperature": 0.7},
    )
    proc = _check(cfg, tmp_path, "--show-example", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "on-policy: linear 0 -> 0.5 over progress 0-1 sampled from the student" in out
    assert "max_new_tokens 24, temperature 0.7" in out
    assert out.count("«» marks the tokens that carry loss") == 2
    shown = [line for line in out.splitlines() if "«" in line and "marks" not in line]
    assert shown and all("assistant«" in line for line in shown)  # the answers carry loss, the prompts do not
    assert not (tmp_path / "run").exists()  # check leaves no run directory behind
