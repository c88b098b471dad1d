"""Preemption, the non-finite step guard, atomic/best checkpoints, export, and damaged input on disk."""

import contextlib
import io
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dsdistill import checkpoint
from dsdistill.config import validate
from dsdistill.dist import without_world_env
from dsdistill.errors import DistillError
from dsdistill.export import export
from dsdistill.schema import METRICS_FILE, AlertRecord, EvalRecord, RunEnd, RunStart, TrainRecord
from dsdistill.train import EXIT_PREEMPTED, open_session, train
from tests.runs import records, wait_for_train_records

TRAIN_PY = Path(__file__).resolve().parent.parent / "dsdistill" / "train.py"


def quiet_train(cfg):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(validate(cfg))


def start_script(cfg: dict, tmp_path: Path, preexec=None) -> subprocess.Popen:
    path = tmp_path / f"run-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))  # not this pytest process's world
    return subprocess.Popen(
        [sys.executable, str(TRAIN_PY), "--config", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )


# ------------------------------------------------------------------ preemption


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_resumably(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 400}, eval={"every": 0, "max_batches": 1})
    run_dir = Path(cfg["output"]["run_dir"])
    proc = start_script(cfg, tmp_path)
    wait_for_train_records(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "SIGTERM received: finishing this micro-batch" in err
    recs = records(run_dir)
    end = recs[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted" and "SIGTERM" in end.message
    last = [r for r in recs if isinstance(r, TrainRecord)][-1]
    assert end.step == last.step + 1 and checkpoint.latest_tag(run_dir) == f"step{end.step}"
    # relaunch continues from that step
    again = start_script({**cfg, "train": {**cfg["train"], "max_steps": end.step + 2}}, tmp_path)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-2000:]
    recs = records(run_dir)
    assert [r.step for r in recs if isinstance(r, RunStart)][-1] == end.step
    assert [r.step for r in recs if isinstance(r, TrainRecord)][-2:] == [end.step, end.step + 1]


@pytest.mark.slow
def test_a_signal_repeated_within_the_grace_period_is_the_same_preemption(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 400}, eval={"every": 0, "max_batches": 1})
    run_dir = Path(cfg["output"]["run_dir"])
    proc = start_script(cfg, tmp_path)
    wait_for_train_records(run_dir, 2, proc)
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # group + launcher + a Ctrl-C, at once
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "exiting now without saving" not in err
    end = records(run_dir)[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted"
    assert checkpoint.latest_tag(run_dir) == f"step{end.step}"


def _until_said(proc: subprocess.Popen, text: str) -> str:
    """Read the run's stderr until `text` appears (the handler ran); what was read."""
    seen = ""
    for line in proc.stderr:
        seen += line
        if text in line:
            return seen
    raise AssertionError(f"the run never said {text!r}: {seen[-2000:]}")


@pytest.mark.slow
def test_a_second_ctrl_c_after_the_grace_period_exits_at_once(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 400, "signal_grace_s": 0.0}, eval={"every": 0, "max_batches": 1})
    proc = start_script(cfg, tmp_path)
    wait_for_train_records(Path(cfg["output"]["run_dir"]), 2, proc)
    proc.send_signal(signal.SIGINT)
    _until_said(proc, "SIGINT received")
    proc.send_signal(signal.SIGINT)  # the person insists
    _, err = proc.communicate(timeout=600)
    assert "second SIGINT: exiting now without saving" in err
    assert proc.returncode == 128 + signal.SIGINT


@pytest.mark.slow
def test_a_late_repeated_sigterm_is_the_same_request(make_config, tmp_path):
    """DeepSpeed's launcher SIGTERMs its ranks one after another, up to 30 s apart: a rank that already
    stops for the terminal's signal must not take the launcher's late SIGTERM as an order to die unsaved."""
    cfg = make_config(train={"max_steps": 400, "signal_grace_s": 0.0}, eval={"every": 0, "max_batches": 1})
    run_dir = Path(cfg["output"]["run_dir"])
    proc = start_script(cfg, tmp_path)
    wait_for_train_records(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C
    _until_said(proc, "SIGINT received")
    proc.send_signal(signal.SIGTERM)  # the launcher's, after the grace period
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == EXIT_PREEMPTED and "without saving" not in err, err[-2000:]
    end = records(run_dir)[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted" and checkpoint.latest_tag(run_dir) == f"step{end.step}"


class SignalAt:
    """Sends this process a SIGTERM from inside the student's forward on a chosen call (a stop arriving in
    the middle of an accumulation window), through PyTorch's public global forward hook."""

    def __init__(self, call: int):
        self.call, self.calls = call, 0

    def __call__(self, module, args, output):
        if type(module).__name__ == "LlamaModel" and module.config.hidden_size == 32 and module.training:
            if self.calls == self.call:
                os.kill(os.getpid(), signal.SIGTERM)
            self.calls += 1
        return output


def test_a_stop_mid_window_abandons_it_and_the_resumed_run_equals_the_uninterrupted_one(make_config, tmp_path):
    """grad_accum 4: a SIGTERM during micro-batch 1 of step 2 stops before micro-batch 2 (not after the
    window, nor after one more step). The checkpoint is the state after step 2's predecessor; resuming
    from it gives the uninterrupted run's numbers exactly."""
    base = make_config(
        train={"max_steps": 5, "micro_batch_size": 2, "grad_accum": 4}, eval={"every": 0, "at_start": False, "max_batches": 1}
    )
    whole = quiet_train({**base, "output": {**base["output"], "run_dir": str(tmp_path / "whole")}})
    assert whole.reason == "completed"
    cfg = {**base, "output": {**base["output"], "run_dir": str(tmp_path / "stopped")}}
    hook = torch.nn.modules.module.register_module_forward_hook(SignalAt(call=2 * 4 + 1))
    try:
        stopped = quiet_train(cfg)
    finally:
        hook.remove()
    assert stopped.reason == "interrupted"
    run_dir = tmp_path / "stopped"
    recs = records(run_dir)
    assert [r.step for r in recs if isinstance(r, TrainRecord)] == [0, 1]  # step 2 was abandoned, not logged
    assert isinstance(recs[-1], RunEnd) and recs[-1].step == 2 and checkpoint.latest_tag(run_dir) == "step2"
    resumed = quiet_train(cfg)
    assert resumed.reason == "completed"
    ours = {r.step: r for r in records(run_dir) if isinstance(r, TrainRecord)}
    theirs = {r.step: r for r in records(tmp_path / "whole") if isinstance(r, TrainRecord)}
    assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3, 4]
    for step in range(5):
        assert ours[step].losses == theirs[step].losses and ours[step].objective == theirs[step].objective, step


# ------------------------------------------------------------------ non-finite guard


class NaNLogits:
    """Fault injection through PyTorch's public global forward hook: the student decoder's final hidden
    state (hence its logits, on the fused and the plain path alike) becomes NaN on chosen forward calls
    (student = the decoder with hidden size 32, in training mode), and a weight is recorded per call."""

    def __init__(self, bad_calls):
        self.bad_calls = set(bad_calls)
        self.calls = 0
        self.weights_at_call = {}

    def __call__(self, module, args, output):
        if type(module).__name__ != "LlamaModel" or module.config.hidden_size != 32 or not module.training:
            return output
        self.weights_at_call[self.calls] = module.embed_tokens.weight.detach().clone()
        bad = self.calls in self.bad_calls
        self.calls += 1
        if bad:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output


def test_one_nonfinite_step_is_skipped_with_weights_untouched(make_config):
    hook = NaNLogits(bad_calls={2})  # grad_accum 1: forward call i is optimizer step i
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = quiet_train(make_config(train={"max_steps": 5, "max_bad_steps": 2}, eval={"every": 0, "max_batches": 1}))
    finally:
        handle.remove()
    assert summary.reason == "completed" and summary.steps == 5
    assert torch.equal(hook.weights_at_call[2], hook.weights_at_call[3])  # the bad step changed nothing
    assert not torch.equal(hook.weights_at_call[1], hook.weights_at_call[2])  # good steps do change weights
    recs = records(summary.run_dir)
    alerts = [r for r in recs if isinstance(r, AlertRecord) and r.code == "nonfinite_step"]
    assert [a.step for a in alerts] == [2] and "weights untouched" in alerts[0].message
    trains = {r.step: r for r in recs if isinstance(r, TrainRecord)}
    assert trains[2].losses["kd"] != trains[2].losses["kd"]  # NaN is logged as it was
    assert all(v == v for s in (1, 3, 4) for v in trains[s].losses.values())


def test_consecutive_nonfinite_steps_stop_the_run(make_config):
    hook = NaNLogits(bad_calls=range(1, 100))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        with pytest.raises(DistillError) as e:
            quiet_train(make_config(train={"max_steps": 10, "max_bad_steps": 3}, eval={"every": 0, "max_batches": 1}))
    finally:
        handle.remove()
    assert str(e.value).startswith(
        "train.max_bad_steps: 3 consecutive optimizer steps had a non-finite loss (last at step 3); stopped."
    )
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ checkpoints: best, atomic, damaged


def test_best_checkpoint_is_kept_and_partial_saves_never_published(make_config, tmp_path):
    summary = quiet_train(
        make_config(
            train={"max_steps": 6},
            optimizer={"lr": 3e-3},
            eval={"every": 2, "max_batches": 1},
            checkpoint={"every": 1, "keep_last": 1, "save_final": True},
        )
    )
    run_dir = Path(summary.run_dir)
    evals = [r for r in records(run_dir) if isinstance(r, EvalRecord) and r.step > 0]
    best = min(evals, key=lambda e: e.ppl)
    assert checkpoint.best_tag(run_dir) == f"step{best.step}"
    kept = sorted(p.name for p in checkpoint.checkpoint_dir(run_dir).iterdir() if p.is_dir())
    assert kept == sorted({f"step{best.step}", "step6"})  # keep_last 1 plus the best
    assert not list(checkpoint.checkpoint_dir(run_dir).glob(".*partial"))


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_during_save_keeps_the_previous_checkpoint(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 2}, eval={"every": 0, "max_batches": 1}, checkpoint={"save_final": True})
    quiet_train(cfg)
    run_dir = Path(cfg["output"]["run_dir"])
    assert checkpoint.latest_tag(run_dir) == "step2"
    metrics_before = (run_dir / METRICS_FILE).read_text()
    files_before = {p: p.read_bytes() for p in (checkpoint.checkpoint_dir(run_dir) / "step2").rglob("*") if p.is_file()}
    # resume to step 4 with every file capped below a checkpoint's size: the save at the end must fail
    proc = start_script({**cfg, "train": {**cfg["train"], "max_steps": 4}}, tmp_path, preexec=_limit_file_size(60_000))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("dsdistill: error: checkpoint: writing step4 to") and "'latest' are intact" in line
    assert checkpoint.latest_tag(run_dir) == "step2" and not list(checkpoint.checkpoint_dir(run_dir).glob(".*partial"))
    assert all(p.read_bytes() == b for p, b in files_before.items())  # the previous checkpoint is untouched
    after = (run_dir / METRICS_FILE).read_text()
    assert after.startswith(metrics_before)  # earlier records intact; the failed run appended its own
    assert isinstance(records(run_dir)[-1], RunEnd) and records(run_dir)[-1].reason == "error"


def test_corrupt_checkpoint_is_a_one_line_error_and_damages_nothing(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 2}, eval={"every": 0, "max_batches": 1}, checkpoint={"save_final": True})
    quiet_train(cfg)
    run_dir = Path(cfg["output"]["run_dir"])
    states = next((checkpoint.checkpoint_dir(run_dir) / "step2").glob("mp_rank_*_model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    metrics_before = (run_dir / METRICS_FILE).read_text()
    with pytest.raises(DistillError) as e:
        quiet_train({**cfg, "train": {**cfg["train"], "max_steps": 4}})
    msg = str(e.value)  # the checksums recorded at save catch it before DeepSpeed opens the file
    assert msg.startswith(f"checkpoint: '{states}' has 100 bytes, ") and "(the checkpoint step2 is damaged)" in msg
    assert "\n" not in msg
    assert (run_dir / METRICS_FILE).read_text().startswith(metrics_before)  # earlier records intact
    end = records(run_dir)[-1]
    assert isinstance(end, RunEnd) and end.reason == "error" and "is damaged" in end.message
    # a checkpoint from before checksums: DeepSpeed's own load fails, still in one line
    (states.parent / "checksums.json").unlink()
    with pytest.raises(DistillError) as e:
        quiet_train({**cfg, "train": {**cfg["train"], "max_steps": 4}})
    msg = str(e.value)
    assert msg.startswith(f"checkpoint: '{states.parent}' cannot be read") and "\n" not in msg
    assert "(RuntimeError: PytorchStreamReader failed" in msg and msg.endswith("or start fresh with checkpoint.resume: never")
    assert checkpoint.latest_tag(run_dir) == "step2"


def test_trainer_appends_after_garbage_lines_and_monitor_skips_them(make_config, tmp_path):
    from dsmonitor.app import load_states

    cfg = make_config(train={"max_steps": 2}, eval={"every": 0, "max_batches": 1})
    run_dir = Path(cfg["output"]["run_dir"])
    run_dir.mkdir(parents=True)
    (run_dir / METRICS_FILE).write_text('not json\n{"kind": "train"}\n\x00\x01 binary')  # no final newline
    quiet_train(cfg)
    state = load_states([str(run_dir)])[0]
    assert state.end is not None and state.end.reason == "completed" and len(state.train["objective"]) == 2
    assert state.corrupt >= 2


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("stage", [2, 3])
def test_export_loads_with_from_pretrained_and_matches_the_engine(make_config, tmp_path, stage):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(
        train={"max_steps": 3},
        eval={"every": 0, "max_batches": 1},
        checkpoint={"save_final": True},
        deepspeed={
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": stage},
            }
        },
    )
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as session:
        summary = session.fit()
    engine = session.student
    ids = torch.stack([session.data.splits.eval[i]["input_ids"] for i in range(2)])
    engine.eval()
    with torch.no_grad():
        expected = engine(ids, valid=ids > -1)["logits"]
    out = export(summary.run_dir, tmp_path / "exported")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "aux" in k or "router" in k]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == session.data.tokenizer.get_vocab()
    with pytest.raises(DistillError, match="exists and is not an empty directory"):
        export(summary.run_dir, out)


def test_export_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "export", str(tmp_path), "--out", str(tmp_path / "o")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dsdistill: error: export: '{tmp_path}' has no config.yaml; expected a dsdistill run directory"
