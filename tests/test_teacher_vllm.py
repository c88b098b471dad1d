"""The vLLM path of a server teacher, against a stand-in that speaks vLLM's documented OpenAI-compatible
API (tests/vllm_standin.py) in a real process on 127.0.0.1: KD from its prompt_logprobs equals live top-k +
rest KD at T = 1, the teacher's perplexity is exact, and what vLLM cannot serve is refused in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dsdistill.config import validate
from dsdistill.dist import free_port, without_world_env
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight
from tests.test_teacher_server import _base, _session_eval

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def vllm(assets):
    port = free_port()
    cmd = [
        sys.executable,
        str(HERE / "vllm_standin.py"),
        str(assets["teacher"]),
        str(port),
        "--name",
        "tiny",
        "--max-logprobs",
        "16",
    ]
    proc = subprocess.Popen(
        cmd,
        env=without_world_env(dict(os.environ)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in proc.stdout:  # it says when it listens, or ends (and so does this loop)
        seen.append(line)
        if line.startswith("vllm stand-in:"):
            break
    else:
        raise AssertionError("the vLLM stand-in ended before it listened:\n" + "".join(seen))
    yield f"http://127.0.0.1:{port}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_vllm_fed_kd_equals_live_top_k_and_rest(vllm, assets, tmp_path):
    cfg = _base(assets, tmp_path)
    live_loss = {"kd": {"top_k": 16, "top_k_rest": True, "top_k_support": "teacher"}}
    live, live_ppl, _ = _session_eval({**cfg, "loss": live_loss}, tmp_path / "live")
    teacher = {"path": None, "url": vllm, "options": {"api": "vllm", "model": "tiny", "top_k": 16}}
    remote, remote_ppl, session = _session_eval({**cfg, "teacher": teacher}, tmp_path / "remote")
    assert session.teacher.capabilities().remote and remote.losses["lm"] == live.losses["lm"]
    assert remote.losses["kd"] == pytest.approx(live.losses["kd"], rel=1e-4)  # the rest's mass from the float32 top-k
    assert remote_ppl == pytest.approx(live_ppl, rel=1e-5)  # the prompt token's own log-prob: exact


def test_what_vllm_cannot_serve_is_refused_in_one_line(vllm, assets, tmp_path):
    cfg = _base(assets, tmp_path)
    teacher = {"path": None, "url": vllm, "options": {"api": "vllm", "top_k": 16}}
    with pytest.raises(DistillError) as err:  # vLLM's log-probs are at T = 1 only
        preflight(validate({**cfg, "teacher": teacher, "curriculum": {"weights": {"kd": 1.0}, "temperature": 2.0}}), world=1)
    assert str(err.value).startswith(
        "curriculum.temperature: this run uses T = 2, but a vLLM server sends log-probs at T = 1 only"
    )
    with pytest.raises(DistillError, match=rf"^teacher.url: {vllm} serves tiny, not 'other'$"):
        preflight(validate({**cfg, "teacher": {**teacher, "options": {"api": "vllm", "model": "other"}}}), world=1)
