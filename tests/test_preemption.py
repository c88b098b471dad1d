"""Stopping a real 2-rank CPU run the way terminals, launchers and schedulers do.

Each run starts in its own session (as a job in a terminal or a SLURM step), and the signal goes where
that stopper sends it: the whole process group (Ctrl-C, `timeout`, `kill -TERM -PGID`), one PID, or every
process of the run one by one followed by SIGKILL after KillWait (slurmstepd). Every case must end with a
complete checkpoint, `run_end` reason `interrupted`, and no process of the run left alive.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from dsdistill import checkpoint
from dsdistill.demo import launcher_command
from dsdistill.dist import free_port, without_world_env
from dsdistill.preempt import EXIT_PREEMPTED
from dsdistill.schema import RunEnd, TrainRecord
from tests.runs import records, wait_for_train_records

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "dsdistill" / "train.py"
pytestmark = pytest.mark.slow


def _start(cmd: list[str], tmp_path: Path) -> subprocess.Popen:
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHON=sys.executable))
    log = open(tmp_path / "launch.log", "w")
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_training(run_dir: Path, proc: subprocess.Popen) -> None:
    wait_for_train_records(run_dir, 2, proc, timeout=240, output=lambda: (run_dir.parent / "launch.log").read_text())


def _session(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every live process of the run's session (the launcher tree, ranks included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return out


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in _session(proc)
        if any("train.py" in part for part in p.cmdline()) and any(part.startswith("--local_rank") for part in p.cmdline())
    ]


def _wait_gone(proc: subprocess.Popen, timeout: float = 180) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None and not _session(proc):
            return
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())[:120]) for p in _session(proc)]
    for p in _session(proc):
        p.kill()
    raise AssertionError(f"processes of the run survive: {left}")


def _assert_saved_and_ended(run_dir: Path) -> int:
    recs = records(run_dir)
    end = recs[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted", recs[-3:]
    last = [r for r in recs if isinstance(r, TrainRecord)][-1]
    assert end.step == last.step + 1
    tag = checkpoint.latest_tag(run_dir)
    assert tag == f"step{end.step}"
    assert len(list((checkpoint.checkpoint_dir(run_dir) / tag).glob("*model_states.pt"))) >= 1
    assert not list(checkpoint.checkpoint_dir(run_dir).glob(".*partial"))
    return end.step


@pytest.fixture
def long_run(make_config, tmp_path):
    cfg = make_config(train={"max_steps": 2000, "micro_batch_size": 2}, eval={"every": 0, "max_batches": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Path(cfg["output"]["run_dir"])


def _launch_sh(config: Path) -> list[str]:
    return ["bash", str(ROOT / "launch.sh"), "--config", str(config), "--gpus-per-node", "2", "--master-port", str(free_port())]


def _deepspeed(config: Path) -> list[str]:
    return launcher_command(TRAIN_PY, config, nprocs=2, master_port=free_port())


# -------------------------------------------------------------- launch.sh: every stopper gets exit 75


def _group(proc, sig):
    os.killpg(proc.pid, sig)


def _launcher_pid(proc, sig):
    proc.send_signal(sig)  # launch.sh execs the per-node launcher: this is its PID


def _one_rank(proc, sig):
    _ranks(proc)[-1].send_signal(sig)


@pytest.mark.parametrize(
    "deliver, sig",
    [
        (_group, signal.SIGINT),  # Ctrl-C in the terminal (a group SIGTERM: the relaunch test below)
        (_launcher_pid, signal.SIGTERM),
        (_one_rank, signal.SIGTERM),
    ],
    ids=["group-SIGINT-ctrl-c", "launcher-pid", "one-rank"],
)
def test_launch_sh_stop_saves_ends_and_exits_75(long_run, tmp_path, deliver, sig):
    config, run_dir = long_run
    proc = _start(_launch_sh(config), tmp_path)
    _wait_training(run_dir, proc)
    deliver(proc, sig)
    proc.wait(timeout=180)
    _wait_gone(proc)
    assert proc.returncode == EXIT_PREEMPTED, (tmp_path / "launch.log").read_text()[-3000:]
    _assert_saved_and_ended(run_dir)
    assert "exiting now without saving" not in (tmp_path / "launch.log").read_text()


def test_slurm_style_sigterm_to_every_process_then_sigkill_after_killwait(long_run, tmp_path):
    """slurmstepd signals every process of the step, then SIGKILLs what is left after KillWait (30 s)."""
    config, run_dir = long_run
    proc = _start(_launch_sh(config), tmp_path)
    _wait_training(run_dir, proc)
    for p in _session(proc):
        p.send_signal(signal.SIGTERM)
    kill_wait = 30.0
    try:
        proc.wait(timeout=kill_wait)
    except subprocess.TimeoutExpired as late:
        for p in _session(proc):
            p.kill()
        proc.wait()
        raise AssertionError("the run was still going when KillWait ran out") from late
    _wait_gone(proc)
    assert proc.returncode == EXIT_PREEMPTED
    _assert_saved_and_ended(run_dir)


def _group_sigterm(cmd: list[str], run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    """Start `cmd`, let it train, SIGTERM its whole process group, wait until every process is gone."""
    proc = _start(cmd, tmp_path)
    _wait_training(run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=180)
    _wait_gone(proc)
    return proc


def test_relaunch_after_preemption_resumes_at_the_saved_step(long_run, tmp_path):
    """A group SIGTERM (SLURM, `timeout`, kill -TERM -PGID) to launch.sh: saved, ended, exit 75; then the
    relaunch resumes at the saved step."""
    config, run_dir = long_run
    first = _group_sigterm(_launch_sh(config), run_dir, tmp_path)
    log = (tmp_path / "launch.log").read_text()
    assert first.returncode == EXIT_PREEMPTED, log[-3000:]
    assert "exiting now without saving" not in log
    step = _assert_saved_and_ended(run_dir)
    again = _start(_launch_sh(config) + ["--", "--set", f"train.stop_at_step={step + 1}"], tmp_path)
    again.wait(timeout=240)
    assert again.returncode == 0, (tmp_path / "launch.log").read_text()[-3000:]
    trains = [r.step for r in records(run_dir) if isinstance(r, TrainRecord)]
    assert trains[-1] == step and trains.count(step) == 1


# -------------------------------------------------------------- the plain `deepspeed` command


def test_deepspeed_runner_group_sigterm_saves_and_leaves_no_process(long_run, tmp_path):
    """`deepspeed train.py` under a group SIGTERM: the ranks count the group's and the launcher's deliveries
    as one, save and end. (DeepSpeed's runner itself dies on the signal: launch.sh is what returns 75.)"""
    config, run_dir = long_run
    _group_sigterm(_deepspeed(config), run_dir, tmp_path)
    _assert_saved_and_ended(run_dir)
    assert "exiting now without saving" not in (tmp_path / "launch.log").read_text()


@pytest.mark.parametrize("target", ["runner", "per-node-launcher"])
def test_deepspeed_launcher_killed_alone_still_saves_and_leaves_no_orphan(long_run, tmp_path, target):
    config, run_dir = long_run
    proc = _start(_deepspeed(config), tmp_path)
    _wait_training(run_dir, proc)
    if target == "runner":
        victim = psutil.Process(proc.pid)
    else:
        victim = next(p for p in _session(proc) if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGTERM)
    _wait_gone(proc)
    _assert_saved_and_ended(run_dir)


# -------------------------------------------------------------- real step times


@pytest.fixture
def slow_run(assets, make_config, tmp_path):
    """A run whose micro-batches take seconds on CPU (wider models, longer rows): what a real model's steps
    look like to a stop, where DeepSpeed's launcher SIGKILLs a rank 30 s after it forwards a signal."""
    from transformers import AutoTokenizer

    from dsdistill.demo import tiny_llama

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    for name, width, seed in (("wide_teacher", 384, 1), ("wide_student", 256, 2)):
        tiny_llama(len(tok), hidden=width, layers=4, heads=4, kv_heads=2, max_pos=256, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cfg = make_config(
        teacher={"path": str(tmp_path / "wide_teacher")},
        student={"path": str(tmp_path / "wide_student")},
        train={"max_steps": 2000, "micro_batch_size": 8, "grad_accum": 4, "seq_len": 128},
        curriculum={"weights": {"kd": 0.9, "lm": 0.1}},
        eval={"every": 0, "at_start": False, "max_batches": 1},
    )
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Path(cfg["output"]["run_dir"])


def test_ctrl_c_under_deepspeed_with_multi_second_steps_stops_within_a_micro_batch(slow_run, tmp_path):
    """The audit lost a whole run this way: ~30 s steps, Ctrl-C, the runner SIGKILLed rank 0 30 s later.
    Now the stop is agreed at the next micro-batch boundary: the window in flight is abandoned (or ends, if
    it was at its last micro-batch), the save follows, and no step starts after the signal."""
    config, run_dir = slow_run
    proc = _start(_deepspeed(config), tmp_path)
    wait_for_train_records(run_dir, 1, proc, timeout=600, output=lambda: (tmp_path / "launch.log").read_text())
    done_before = sum(isinstance(r, TrainRecord) for r in records(run_dir))
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    proc.wait(timeout=600)
    _wait_gone(proc)
    log = (tmp_path / "launch.log").read_text()
    assert "exiting now without saving" not in log, log[-3000:]
    step = _assert_saved_and_ended(run_dir)
    assert step <= done_before + 1  # at most the window in flight, never one more
