"""Bad input found in the wild: each case is one `dsdistill: error:` line naming the file or field, a
non-zero exit, and nothing written before is damaged. Every case runs the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsdistill import checkpoint
from dsdistill.demo import launcher_command
from dsdistill.dist import free_port, without_world_env
from dsdistill.schema import METRICS_FILE, AlertRecord, parse_line

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "dsdistill" / "train.py"


def _cli(*args, timeout=300):
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    return subprocess.run([sys.executable, "-m", "dsdistill", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(proc, code=2) -> str:
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("dsdistill: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0][len("dsdistill: error: ") :]


# ------------------------------------------------------------------ data files


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.jsonl", b"", "is empty; expected at least one document"),
        ("blank.txt", b"\n\n  \n", "is empty; expected at least one document"),
        (
            "latin1.txt",
            "caf\u00e9 cr\u00e8me\n".encode("latin-1") * 50,
            "is not UTF-8 text (byte 0xe9 at offset 3); expected UTF-8 encoded text",
        ),
    ],
)
def test_unreadable_data_files_are_named(make_config, tmp_path, name, content, expected):
    data = tmp_path / name
    data.write_bytes(content)
    msg = _one_error_line(_cli("check", "--config", str(_write(tmp_path, make_config(data={"path": str(data)})))))
    assert msg == f"data.path: '{data}' {expected}"


def test_null_and_empty_texts_are_counted_and_reported(make_config, assets, tmp_path):
    docs = [json.loads(line) for line in Path(assets["corpus"]).read_text().splitlines()]
    for i in range(0, len(docs), 10):
        docs[i]["text"] = None if i % 20 == 0 else ""
    data = tmp_path / "holes.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    skipped = len(range(0, len(docs), 10))
    proc = _cli("check", "--config", str(_write(tmp_path, make_config(data={"path": str(data)}))))
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {skipped} documents with a null or empty 'text' are skipped" in proc.stdout


def test_only_null_texts_is_an_error(make_config, tmp_path):
    data = tmp_path / "nulls.jsonl"
    data.write_text("".join(json.dumps({"text": None}) + "\n" for _ in range(50)))
    msg = _one_error_line(_cli("check", "--config", str(_write(tmp_path, make_config(data={"path": str(data)})))))
    assert msg.startswith("data.text_field: every one of the ")


def test_data_in_another_vocabulary_is_refused(make_config, tmp_path):
    data = tmp_path / "foreign.jsonl"
    data.write_text("".join(json.dumps({"text": "zebra quokka wombat " * 10}) + "\n" for _ in range(200)))
    msg = _one_error_line(_cli("check", "--config", str(_write(tmp_path, make_config(data={"path": str(data)})))))
    assert msg.startswith("data.path: 9") and msg.endswith(
        f"% of the tokens of '{data}' are the tokenizer's unknown token "
        "('<unk>'); the data does not match the student's tokenizer"
    )


# ------------------------------------------------------------------ world size, run directory


@pytest.mark.parametrize("world", ["0", "-1"])
def test_check_refuses_a_world_size_below_one(make_config, tmp_path, world):
    msg = _one_error_line(_cli("check", "--config", str(_write(tmp_path, make_config())), "--world-size", world))
    assert msg == f"check: --world-size {world}: expected a positive number of ranks"


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
def test_a_directory_where_a_run_file_belongs_is_refused_before_training(make_config, tmp_path, name):
    cfg = make_config()
    run_dir = Path(cfg["output"]["run_dir"])
    (run_dir / name).mkdir(parents=True)
    msg = _one_error_line(_cli("train", "--config", str(_write(tmp_path, cfg))))
    assert msg == f"output.run_dir: '{run_dir / name}' is not a regular file; expected the run's {name} (or nothing) there"


# ------------------------------------------------------------------ checkpoints that do not fit the architecture


def test_a_checkpoint_missing_weights_is_refused_not_randomly_filled(make_config, assets, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    student = tmp_path / "student-partial"
    shutil.copytree(assets["student"], student)
    weights = load_file(student / "model.safetensors")
    dropped = sorted(k for k in weights if k.endswith("mlp.down_proj.weight"))[-1]
    del weights[dropped]
    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    msg = _one_error_line(_cli("train", "--config", str(_write(tmp_path, make_config(student={"path": str(student)})))))
    assert msg.startswith(
        f"student.path: the checkpoint in '{student}' lacks 1 weight(s) the LlamaForCausalLM architecture needs (e.g. {dropped})"
    )


def test_tied_embeddings_are_not_mistaken_for_missing_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dsdistill.config import ModelSpec
    from dsdistill.models import load_causal_lm

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, tie_word_embeddings=True)).save_pretrained(
        tmp_path / "g"
    )
    model = load_causal_lm(ModelSpec(path=str(tmp_path / "g")), field="teacher", precision="fp32", zero3_ds_config=None)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ------------------------------------------------------------------ the LR follows the optimizer step through skipped steps


def test_lr_stays_a_function_of_the_optimizer_step_after_a_skipped_step(make_config):
    """A non-finite step is skipped by DeepSpeed, which then does not advance the LR schedule; the loop
    advances it, so the LR at every later step is the schedule's value at that step (as the curriculum)."""
    import contextlib
    import io

    import torch

    from dsdistill.config import validate
    from dsdistill.engines import lr_multiplier
    from dsdistill.schema import TrainRecord
    from dsdistill.train import train

    calls = {"n": 0}

    def nan_at_step_2(module, args, output):
        if type(module).__name__ == "LlamaModel" and module.config.hidden_size == 32 and module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    cfg = validate(
        make_config(
            train={"max_steps": 6, "max_bad_steps": 2},
            eval={"every": 0, "max_batches": 1},
            scheduler={"kind": "linear", "warmup_steps": 1},
        )
    )
    handle = torch.nn.modules.module.register_module_forward_hook(nan_at_step_2)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train(cfg)
    finally:
        handle.remove()
    recs = [parse_line(ln) for ln in (Path(summary.run_dir) / METRICS_FILE).read_text().splitlines()]
    assert [r.step for r in recs if isinstance(r, AlertRecord) and r.code == "nonfinite_step"] == [2]
    for r in (r for r in recs if isinstance(r, TrainRecord)):
        expected = cfg.optimizer.lr * lr_multiplier(r.step, sched=cfg.scheduler, total_steps=6)
        assert r.lr == pytest.approx(expected, rel=1e-12), r.step


# ------------------------------------------------------------------ an error on a rank other than 0


@pytest.mark.slow
def test_an_error_found_only_on_rank_1_reaches_the_user_as_one_line(make_config, tmp_path):
    """Rank 1's optimizer shard is damaged: rank 1 alone fails to resume. Its error is the one line the
    user sees; rank 0 waits for nobody and prints no gloo traceback."""
    cfg = make_config(
        train={"max_steps": 4, "micro_batch_size": 2},
        eval={"every": 0, "max_batches": 1},
        checkpoint={"save_final": True},
        deepspeed={
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 2},
            }
        },
    )
    path = _write(tmp_path, {**cfg, "train": {**cfg["train"], "max_steps": 2}})
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    first = subprocess.run(
        launcher_command(TRAIN_PY, path, nprocs=2, master_port=free_port()), capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = Path(cfg["output"]["run_dir"])
    shard = next((checkpoint.checkpoint_dir(run_dir) / "step2").glob("*zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:200])
    # without the checksums rank 0 verifies first, only rank 1 reads its own shard and finds it damaged
    (checkpoint.checkpoint_dir(run_dir) / "step2" / "checksums.json").unlink()
    path = _write(tmp_path, cfg)
    proc = subprocess.run(
        launcher_command(TRAIN_PY, path, nprocs=2, master_port=free_port()), capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "dsdistill: error:" in ln]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"dsdistill: error: rank 1: checkpoint: '{checkpoint.checkpoint_dir(run_dir) / 'step2'}' cannot be read" in errors[0]
    assert "Traceback" not in proc.stderr


def test_a_full_disk_under_the_metrics_stream_is_one_line_and_keeps_what_was_written(make_config, tmp_path):
    """The metrics file may not grow past its current size (RLIMIT_FSIZE, as a full disk): the run stops
    with one line naming the file, and every record written before is intact."""
    import resource
    import signal

    cfg = make_config(train={"max_steps": 2}, eval={"every": 0, "max_batches": 1}, checkpoint={"save_final": False})
    run_dir = Path(cfg["output"]["run_dir"])
    first = _cli("train", "--config", str(_write(tmp_path, cfg)))
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run_dir / METRICS_FILE).read_bytes()
    limit = len(before) + 100  # room for less than one record

    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    fresh = {**cfg, "checkpoint": {"save_final": False, "resume": "never"}}
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "train", "--config", str(_write(tmp_path, fresh))],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=cap,
        timeout=300,
    )
    msg = _one_error_line(proc)
    assert msg.startswith(f"output.run_dir: cannot write '{run_dir / METRICS_FILE}' (File too large)")
    assert (run_dir / METRICS_FILE).read_bytes().startswith(before)
