"""The teacher on its own machine: `dsdistill teacher-serve` in a real process on 127.0.0.1, and the run's
client of it (`teacher: {url: ...}`): server-fed KD equals live top-k + rest KD, the teacher's perplexity
is exact, a server that is down, gone or for another tokenizer ends the run in one line, and a server that
dies mid-run leaves a checkpoint of the state before the window it could not serve."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dsdistill.config import validate
from dsdistill.dist import free_port, without_world_env
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight
from dsdistill.schema import METRICS_FILE, RunEnd, parse_line
from dsdistill.train import EXIT_PREEMPTED, open_session
from tests.test_teacher_cache import _base

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """`dsdistill teacher-serve` as a user starts it, in its own process group."""

    def __init__(self, config: Path | None, port: int, *, model: Path | None = None):
        self.config, self.port, self.url = config, port, f"http://127.0.0.1:{port}"
        self.model = model
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        given = ["--config", str(self.config)] if self.config is not None else ["--model", str(self.model), "--precision", "fp32"]
        cmd = [sys.executable, "-m", "dsdistill", "teacher-serve", *given, "--port", str(self.port)]
        env = {**without_world_env(dict(os.environ)), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        seen = []
        for line in self.proc.stdout:  # the server says when it listens (or the process ends, and so does this loop)
            seen.append(line)
            if line.startswith("teacher-serve:") and f":{self.port}" in line:
                return self
        raise AssertionError("teacher-serve ended before it listened:\n" + "".join(seen))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def served(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    cfg = _base(assets, root)
    path = root / "teacher.yaml"
    path.write_text(yaml.safe_dump(cfg))
    server = Server(path, free_port()).start()
    yield {"cfg": cfg, "server": server, "root": root}
    server.kill()


def _session_eval(cfg: dict, run_dir: Path):
    cfg = {**cfg, "output": {**cfg["output"], "run_dir": str(run_dir)}}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
        return s.evaluate(step=0), s.evaluator.teacher_perplexity(s.eval_batches()), s


@pytest.mark.parametrize(
    "temperature, reply, packing",
    [(1.0, "binary", None), (2.0, "binary", None), (2.0, "json", None), (2.0, "codec", None), (2.0, "binary", "documents")],
)
def test_server_fed_kd_equals_live_top_k_and_rest(served, tmp_path, temperature, reply, packing):
    """`documents`: each packed example reaches the server as a sequence of its own, as the live teacher reads
    it (its positions restart), not with the examples packed before it as context."""
    cfg = {**served["cfg"], "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}, "temperature": temperature}}
    if packing is not None:  # rows of several examples each
        cfg["data"] = {**cfg["data"], "packing": packing}
        cfg["train"] = {**cfg["train"], "seq_len": 96}
    live_loss = {"kd": {"top_k": 16, "top_k_rest": True, "top_k_support": "teacher"}}
    live, live_ppl, _ = _session_eval({**cfg, "loss": live_loss}, tmp_path / "live")
    url = {"path": None, "url": served["server"].url, "options": {"top_k": 16, "reply": reply}}
    remote, remote_ppl, session = _session_eval({**cfg, "teacher": url}, tmp_path / "remote")
    assert not session.teacher.capabilities().model_in_job and session.teacher.capabilities().scores_new_text
    assert remote.losses["lm"] == live.losses["lm"]
    # float32 as JSON or arrays: exact up to fp32; the cache's codec (8 bits): within its quantisation, as a cache
    assert remote.losses["kd"] == pytest.approx(live.losses["kd"], rel=2e-3 if reply == "codec" else 1e-5)
    assert remote_ppl == pytest.approx(live_ppl, rel=1e-5)  # the label's own log-prob: exact, never estimated


def test_a_live_teacher_and_a_served_one_mix_by_their_shares(served, tmp_path):
    """`teachers:` of two kinds: the live model (full vocabulary) and the server (top-16 + rest), at T = 2.
    The eval KD is the share-weighted sum of each one's KD alone, and each one's own KD is recorded."""
    cfg = {**served["cfg"], "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}, "temperature": 2.0}}
    url = {"url": served["server"].url, "options": {"top_k": 16}}
    live, _, _ = _session_eval(cfg, tmp_path / "live")
    remote, _, _ = _session_eval({**cfg, "teacher": url}, tmp_path / "remote")
    both = [{"name": "live", "path": cfg["teacher"]["path"], "weight": 1.0}, {"name": "served", **url, "weight": 3.0}]
    mixed, mixed_ppl, session = _session_eval({**cfg, "teacher": None, "teachers": both}, tmp_path / "mixed")
    assert session.teacher.capabilities().remote and session.teacher.capabilities().model_in_job
    assert mixed.metrics["kd.live"] == pytest.approx(live.losses["kd"], rel=1e-5)
    assert mixed.metrics["kd.served"] == pytest.approx(remote.losses["kd"], rel=1e-5)
    assert mixed.losses["kd"] == pytest.approx(0.25 * live.losses["kd"] + 0.75 * remote.losses["kd"], rel=1e-5)
    assert mixed.losses["lm"] == live.losses["lm"]


def test_a_server_that_is_down_or_for_another_tokenizer_is_refused_in_one_line(served, assets, chat_config, tmp_path):
    cfg = served["cfg"]
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DistillError) as err:
        preflight(validate({**cfg, "teacher": {"path": None, "url": closed}}), world=1)
    assert str(err.value).startswith(f"teacher.url: cannot reach {closed} (") and "teacher-serve" in str(err.value)
    other = {**chat_config(), "teacher": {"path": None, "url": served["server"].url}}  # another tokenizer
    with pytest.raises(DistillError, match=rf"^teacher.url: {served['server'].url} serves tokenizer \w+; this run's is \w+$"):
        preflight(validate(other), world=1)


@pytest.mark.slow
def test_a_server_killed_mid_run_leaves_a_checkpoint_and_one_line(assets, tmp_path):
    """The server is SIGKILLed while the run trains: its requests fail, are retried, then every rank agrees
    to stop; the window is abandoned, a checkpoint of the state before it saved, run_end says why, exit 75.
    (A relaunch resumes from that checkpoint as from any stop mid-window: test_reliability shows the resumed
    run equals the uninterrupted one.)"""
    cfg = _base(assets, tmp_path)
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(cfg))
    server = Server(teacher_yaml, free_port()).start()
    run = {
        **cfg,
        "teacher": {"path": None, "url": server.url, "options": {"top_k": 16, "retries": 1, "timeout_s": 5}},
        "train": {**cfg["train"], "max_steps": 40},
        "eval": {"every": 0, "max_batches": 1},
        "checkpoint": {"every": 1000, "save_final": True},
    }
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(run))
    cmd = [sys.executable, "-m", "dsdistill", "train", "--config", str(run_yaml)]
    env = without_world_env(dict(os.environ))
    trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / METRICS_FILE
    for line in trainer.stdout:  # the console's step lines: the server dies once training is under way
        if line.startswith("step 3/"):
            break
    server.kill()
    out, err = trainer.communicate()
    assert trainer.returncode == EXIT_PREEMPTED, err[-2000:]
    said = [line for line in err.splitlines() if line.startswith("dsdistill: ")]
    assert said and said[-1].startswith(f"dsdistill: teacher.url: {server.url} stopped answering"), err[-2000:]
    records = [parse_line(line) for line in metrics.read_text().splitlines()]
    end = records[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted" and "stopped answering" in end.message
    assert 3 <= end.step < 40 and (tmp_path / "run" / "checkpoints" / f"step{end.step}").is_dir()


def test_on_policy_samples_are_scored_by_the_server(chat_config, chat_assets, tmp_path):
    """The student's own completions, sampled at the step's weights, scored by the server teacher: the
    first on-policy step's KD equals the live teacher's top-k + rest on the same samples."""
    on_policy = {
        "data": {"path": str(chat_assets["pairs"]), "format": "prompt_completion", "packing": "none"},
        "train": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1, "seq_len": 48},
        "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}, "on_policy": 1.0},
        "generation": {"max_new_tokens": 8, "temperature": 1.0},
        "eval": {"every": 0, "at_start": False, "max_batches": 1},
    }
    cfg = chat_config(**on_policy)
    server = Server(None, free_port(), model=chat_assets["teacher"]).start()  # `--model DIR`: no config on that node
    try:
        firsts = {}
        for name, over in (
            ("live", {"loss": {"kd": {"top_k": 8, "top_k_rest": True, "top_k_support": "teacher"}}}),
            ("served", {"teacher": {"path": None, "url": server.url, "options": {"top_k": 8}}}),
        ):
            run = validate({**cfg, **over, "output": {**cfg["output"], "run_dir": str(tmp_path / name)}})
            with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
                firsts[name] = s.trainer.step([next(iter(s.data.stream))], stop_requested=False)
    finally:
        server.kill()
    live, served = firsts["live"], firsts["served"]
    assert served.rollout is not None and served.rollout["sequences"] == 2 and served.rollout["tokens"] > 0
    assert served.rollout["tokens"] == live.rollout["tokens"]  # the same weights and seed: the same samples
    assert served.losses["kd"] == pytest.approx(live.losses["kd"], rel=1e-5)


def _scored(url: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/dsdistill/v1/info", timeout=60) as reply:
        return int(json.loads(reply.read())["positions_scored"])


def test_the_next_window_is_fetched_while_this_one_computes(served, tmp_path):
    """A step given the next window (`upcoming`) leaves its request with the server; the next step takes those
    signals and asks for nothing more, with the numbers of a step that asked then."""

    from dsdistill.objective import shifted_valid

    cfg = {
        **served["cfg"],
        "teacher": {"url": served["server"].url, "options": {"top_k": 16}},
        "train": {**served["cfg"]["train"], "grad_accum": 2, "max_steps": 4},
    }
    url = served["server"].url

    def positions(window) -> int:
        return sum(int(shifted_valid(mb["labels"], -100).sum()) for mb in window)

    results = {}
    for ahead in (True, False):
        run = validate({**cfg, "output": {**cfg["output"], "run_dir": str(tmp_path / f"ahead-{ahead}")}})
        with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
            batches = iter(s.data.stream)
            w0, w1 = [next(batches) for _ in range(2)], [next(batches) for _ in range(2)]
            start = _scored(url)
            s.trainer.step(w0, stop_requested=False, upcoming=w1 if ahead else None)
            if ahead:  # the server is asked for w1 in the background: wait for it (a generous outer limit)
                expected = start + positions(w0) + positions(w1)
                for _ in range(6000):
                    if _scored(url) >= expected:
                        break
                    time.sleep(0.05)
                assert _scored(url) == expected
            results[ahead] = s.trainer.step(w1, stop_requested=False)
            assert _scored(url) == start + positions(w0) + positions(w1)  # w1 was asked for once either way
    assert results[True].losses == results[False].losses and results[True].objective == results[False].objective


def test_a_run_fed_ahead_saves_the_position_of_the_window_it_trained_on(served, tmp_path):
    """Windows are drawn one ahead for a server teacher; a stop saves the position after the last trained
    window, not after the one drawn ahead: stopped at step 2 and resumed equals uninterrupted."""
    cfg = {
        **served["cfg"],
        "teacher": {"url": served["server"].url, "options": {"top_k": 16}},
        "train": {**served["cfg"]["train"], "max_steps": 4},
        "eval": {"every": 0, "max_batches": 1, "at_start": False},
        "checkpoint": {"save_final": True},
    }

    def kd_by_step(run_dir, **train) -> dict[int, float]:
        run = validate({**cfg, "train": {**cfg["train"], **train}, "output": {**cfg["output"], "run_dir": str(run_dir)}})
        with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
            s.fit()
        return {r.step: r.losses["kd"] for r in _records(run_dir) if getattr(r, "kind", None) == "train"}

    whole = kd_by_step(tmp_path / "whole")
    kd_by_step(tmp_path / "parts", stop_at_step=2)
    parts = kd_by_step(tmp_path / "parts")
    starts = [(r.resumed, r.step) for r in _records(tmp_path / "parts") if getattr(r, "kind", None) == "run_start"]
    assert starts == [(False, 0), (True, 2)]  # the second run resumed at step 2
    waits = [r.teacher_wait for r in _records(tmp_path / "parts") if getattr(r, "kind", None) == "train"]
    assert len(waits) == 4 and all(w is not None and 0 <= w <= 1 for w in waits)  # what the step spent waiting
    assert sorted(parts) == [0, 1, 2, 3] and parts == pytest.approx(whole, rel=1e-6)


def _records(run_dir: Path) -> list:
    return [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_server_fed_kd_on_two_ranks_through_the_launcher_equals_live_top_k_and_rest(served, tmp_path):
    """`deepspeed --num_gpus 2` with the teacher behind the server, at T = 2 (the rest's statistic at another
    temperature; T = 1 is checked in one process above): the step-0 eval KD over both ranks' shards (and the
    teacher's perplexity) equals live top-16 + rest on the same eval split."""
    temperature = 2.0
    from dsdistill.demo import launcher_command, launcher_env

    cfg = {
        **served["cfg"],
        "teacher": {"url": served["server"].url, "options": {"top_k": 16}},
        "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}, "temperature": temperature},
        "train": {**served["cfg"]["train"], "max_steps": 2, "micro_batch_size": 2},
        "eval": {"every": 2, "max_batches": 4, "at_start": True, "micro_batch_size": 2},
        "output": {**served["cfg"]["output"], "run_dir": str(tmp_path / "two")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        launcher_command(ROOT / "dsdistill" / "train.py", path, nprocs=2, master_port=free_port()),
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = next(r for r in _records(tmp_path / "two") if getattr(r, "kind", None) == "eval")
    assert first.step == 0 and first.tokens > 0
    live = {
        **cfg,
        "teacher": {"path": served["cfg"]["teacher"]["path"]},
        "loss": {"kd": {"top_k": 16, "top_k_rest": True, "top_k_support": "teacher"}},
        # one rank reads the eval split whole: the same tokens the two ranks' shards hold together
        "eval": {**cfg["eval"], "max_batches": 8},
    }
    ev, ppl, _ = _session_eval(live, tmp_path / "live")
    assert ev.tokens == first.tokens
    assert first.losses["kd"] == pytest.approx(ev.losses["kd"], rel=1e-5)
    assert first.losses["lm"] == pytest.approx(ev.losses["lm"], rel=1e-5)
    assert first.teacher_ppl == pytest.approx(ppl, rel=1e-5)


def test_a_server_gone_before_an_evaluation_stops_the_run_with_its_state_saved(assets, tmp_path):
    """The teacher's perplexity and the evaluations ask the server too: a server that stops answering there
    ends the run as a failed training window does (checkpoint, run_end interrupted, one line), not with an error."""
    cfg = _base(assets, tmp_path)
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(cfg))
    server = Server(teacher_yaml, free_port()).start()
    run = validate(
        {
            **cfg,
            "teacher": {"url": server.url, "options": {"top_k": 16, "retries": 0, "timeout_s": 5}},
            "eval": {"every": 2, "max_batches": 2, "at_start": True},
        }
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()), open_session(run) as s:
            server.kill()  # after the run checked and opened it, before the run's first request
            with pytest.raises(DistillError) as err:
                s.evaluate(step=0)
            summary = s.fit()
    finally:
        server.kill()
    assert "\n" not in str(err.value) and str(err.value).startswith(f"teacher.url: {server.url} stopped answering")
    assert summary.reason == "interrupted" and summary.steps == 0
    end = _records(tmp_path / "run")[-1]
    assert isinstance(end, RunEnd) and end.reason == "interrupted" and "stopped answering" in end.message
    assert (tmp_path / "run" / "checkpoints" / "step0").is_dir()  # relaunching resumes from it


def test_requests_that_wait_together_are_scored_in_one_forward_with_the_same_numbers(served):
    """Clients (ranks, runs) asking at once are merged into one forward; each gets what it gets alone."""
    import json
    import urllib.request

    url = served["server"].url
    info = json.loads(urllib.request.urlopen(f"{url}/dsdistill/v1/info", timeout=60).read())

    def ask(i: int) -> dict:
        seq = [(5 * i + 3 * j) % info["vocab"] for j in range(24 + 4 * i)]  # lengths differ: padding is exercised
        body = {"sequences": [seq], "positions": [list(range(len(seq) - 1))], "k": 8, "temperatures": [2.0],
                "labels": True, "tokenizer": info["tokenizer"], "reply": "json"}  # fmt: skip
        req = urllib.request.Request(f"{url}/dsdistill/v1/score", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())["results"][0]

    alone = [ask(i) for i in range(4)]
    for _ in range(200):  # bursts until the forward thread has found several waiting (a generous outer limit)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, range(4)))
        for a, b in zip(alone, together):
            assert a["ids"] == b["ids"]
            for key in ("logp", "log_rest", "tails", "label_logp"):
                torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-5, atol=1e-6)
        stats = json.loads(urllib.request.urlopen(f"{url}/dsdistill/v1/info", timeout=60).read())
        if stats["most_merged"] > 1:
            break
    assert stats["most_merged"] > 1 and stats["forwards"] < stats["requests"]


@pytest.mark.slow
def test_a_teacher_sharded_over_two_ranks_answers_as_one_device_does(served, assets):
    """`deepspeed --num_gpus 2 dsdistill/serve.py --model DIR`: ZeRO-3 shards the teacher over the ranks, rank 0
    answers, every rank runs each forward; the answers are the one-device server's. Ctrl-C stops every rank."""
    import json
    import urllib.request

    from dsdistill.demo import launcher_env

    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [str(ROOT / "dsdistill" / "serve.py"), "--model", str(assets["teacher"]), "--precision", "fp32", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        seen = []
        for line in proc.stdout:  # the launcher's output ends if the ranks fail, and so does this loop
            seen.append(line)
            if line.startswith("teacher-serve:"):
                break
        assert "sharded over 2 ranks" in seen[-1], "".join(seen[-30:])

        def ask(url: str) -> dict:
            info = json.loads(urllib.request.urlopen(f"{url}/dsdistill/v1/info", timeout=60).read())
            seqs = [[(7 * i + j) % info["vocab"] for j in range(20 + 5 * i)] for i in range(3)]
            body = {"sequences": seqs, "positions": [list(range(len(s) - 1)) for s in seqs], "k": 8,
                    "temperatures": [2.0], "labels": True, "tokenizer": info["tokenizer"], "reply": "json"}  # fmt: skip
            req = urllib.request.Request(f"{url}/dsdistill/v1/score", data=json.dumps(body).encode())
            with urllib.request.urlopen(req, timeout=300) as r:
                return {**json.loads(r.read()), "ranks": info["ranks"]}

        sharded, single = ask(f"http://127.0.0.1:{port}"), ask(served["server"].url)
        assert sharded["ranks"] == 2 and single["ranks"] == 1 and sharded["model"] == single["model"]
        for a, b in zip(sharded["results"], single["results"]):
            assert a["ids"] == b["ids"]
            for key in ("logp", "log_rest", "tails", "label_logp"):
                torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), rtol=1e-5, atol=1e-6)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the launcher's terminal
        proc.communicate(timeout=600)
    from tests.test_preemption import _session

    for _ in range(6000):  # every rank leaves (a generous outer limit)
        if not _session(proc):
            break
        time.sleep(0.05)
    assert not _session(proc), [p.cmdline() for p in _session(proc)]


@pytest.mark.slow
def test_a_server_that_stops_answering_ends_the_run_saved_and_the_resumed_run_equals_an_uninterrupted_one(assets, tmp_path):
    """The server is frozen (SIGSTOP: connections open, no answer ever) under a training run: each request
    times out, is retried, then the run saves and exits 75 in one line. Thawed, a relaunch resumes, and every
    step's numbers equal an uninterrupted run's."""
    cfg = _base(assets, tmp_path)
    teacher_yaml = tmp_path / "teacher.yaml"
    teacher_yaml.write_text(yaml.safe_dump(cfg))
    server = Server(teacher_yaml, free_port()).start()
    run = {
        **cfg,
        "teacher": {"url": server.url, "options": {"top_k": 16, "retries": 1, "timeout_s": 3}},
        "train": {**cfg["train"], "max_steps": 6},
        "eval": {"every": 0, "max_batches": 1, "at_start": False},
        "checkpoint": {"every": 1000, "save_final": True},
    }

    def kd(run_dir: Path) -> dict[int, float]:
        return {r.step: r.losses["kd"] for r in _records(run_dir) if getattr(r, "kind", None) == "train"}

    try:
        whole = {**run, "output": {**run["output"], "run_dir": str(tmp_path / "whole")}}
        with contextlib.redirect_stdout(io.StringIO()), open_session(validate(whole)) as s:
            s.fit()
        run_yaml = tmp_path / "run.yaml"
        run_yaml.write_text(yaml.safe_dump(run))
        cmd = [sys.executable, "-m", "dsdistill", "train", "--config", str(run_yaml)]
        env = without_world_env(dict(os.environ))
        trainer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in trainer.stdout:  # the console's step lines: the server freezes once training is under way
            if line.startswith("step 2/"):
                break
        os.killpg(server.proc.pid, signal.SIGSTOP)
        out, err = trainer.communicate(timeout=600)
        os.killpg(server.proc.pid, signal.SIGCONT)
        assert trainer.returncode == EXIT_PREEMPTED, err[-2000:]
        said = [line for line in err.splitlines() if line.startswith("dsdistill: ")]
        assert said[-1].startswith(f"dsdistill: teacher.url: {server.url} stopped answering"), err[-2000:]
        end = _records(tmp_path / "run")[-1]
        assert isinstance(end, RunEnd) and end.reason == "interrupted" and end.step < 6
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        server.kill()
    assert "resumed from" in again.stdout
    assert sorted(kd(tmp_path / "run")) == list(range(6)) and kd(tmp_path / "run") == pytest.approx(
        kd(tmp_path / "whole"), rel=1e-6
    )
