"""The offline teacher cache: the codec's round-trip bounds over random, peaked and flat distributions; a
cache written by `dsdistill teacher-cache` gives the same KD as the live teacher's exact top-k + rest within
the measured quantisation error, for every divergence; two ranks write the bytes one rank writes; a write
killed midway resumes to the same bytes; a cache of anything else is refused in one line; and training
from a cache loads no teacher."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dsdistill.codec import decode, encode
from dsdistill.config import validate
from dsdistill.dist import without_world_env
from dsdistill.errors import DistillError
from dsdistill.preflight import preflight
from dsdistill.schema import METRICS_FILE, AlertRecord, RunStart, TrainRecord, parse_line
from dsdistill.train import open_session, write_teacher_cache

ROOT = Path(__file__).resolve().parent.parent


def _topk(logits: np.ndarray, k: int):
    m = logits.max(1, keepdims=True)
    lp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    idx = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, idx, 1)
    rest = np.log(np.clip(1 - np.exp(top).sum(1), 1e-30, None))
    return idx, top, rest


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", ["random", "peaked", "flat", "zipf"])
@pytest.mark.parametrize("level_bits", [3, 5, 8])
def test_codec_round_trip_bounds(seed, shape, level_bits):
    rng = np.random.default_rng(seed)
    V = int(rng.choice([50, 1000, 151936]))
    k = int(min(V - 1, rng.choice([1, 16, 64, 128])))
    n = 40
    logits = {
        "random": rng.normal(size=(n, V)) * 3,
        "peaked": np.where(rng.random((n, V)) < 1.0 / V, 30.0, 0.0) + rng.normal(size=(n, V)),
        "flat": rng.normal(size=(n, V)) * 0.01,
        "zipf": -1.1 * np.log(rng.permutation(V) + 1.0)[None, :] + rng.gumbel(size=(n, V)),
    }[shape]
    idx, top, rest = _topk(logits, k)
    d = decode(encode(idx, top, rest, level_bits=level_bits), n, k, level_bits=level_bits)
    order = np.argsort(idx, axis=1, kind="stable")
    ids_sorted = np.take_along_axis(idx, order, 1)
    true = np.take_along_axis(top, order, 1)
    assert (d.ranks == ids_sorted).all()  # ids are exact
    # probabilities: uniform steps in sqrt(p / p_top1) bound |p' - p| by p_top1 * (s / L + 1 / (4 L^2)), plus
    # the fixed-point top-1 log-prob's half step (1/8192 nat) as a relative error
    L = (1 << level_bits) - 1
    p1 = np.exp(true.max(1, keepdims=True))
    s = np.exp((true - true.max(1, keepdims=True)) / 2)
    bound = (p1 * (s / L + 0.25 / L**2)) * (1 + 2e-4) + 2e-4 * np.exp(true) + 1e-9
    assert (np.abs(np.exp(d.logp) - np.exp(true)) <= bound).all()
    assert np.allclose(d.log_rest, np.clip(rest, -65504, None).astype(np.float16), rtol=0, atol=1e-6)


def _write(cfg: dict, out: Path, *, top_k=16, level_bits=5, shard_rows=16):
    with contextlib.redirect_stdout(io.StringIO()):
        return write_teacher_cache(validate(cfg), out, top_k=top_k, level_bits=level_bits, shard_rows=shard_rows)


@pytest.fixture(scope="module")
def written(tmp_path_factory, assets):
    """One cache of the tiny run at k = 16 with 5-bit and 8-bit levels (written once for the module)."""
    root = tmp_path_factory.mktemp("cache")
    cfg = _base(assets, root)
    _write(cfg, root / "b5")
    _write(cfg, root / "b8", level_bits=8)
    return {"cfg": cfg, "b5": root / "b5", "b8": root / "b8"}


def _base(assets, root: Path) -> dict:
    return {
        "teacher": {"path": str(assets["teacher"])},
        "student": {"path": str(assets["student"])},
        "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1, "max_documents": 200},
        "train": {"max_steps": 2, "micro_batch_size": 4, "seq_len": 32, "precision": "fp32"},
        "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}},
        "eval": {"every": 2, "max_batches": 4, "at_start": False},
        "output": {"run_dir": str(root / "run"), "log_every": 1},
        "checkpoint": {"save_final": False},
    }


def _eval(cfg: dict, run_dir: Path):
    cfg = {**cfg, "output": {**cfg["output"], "run_dir": str(run_dir)}}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
        return s.evaluate(step=0), s


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_cache_fed_kd_equals_live_top_k_kd_within_the_quantisation_error(written, tmp_path, divergence):
    cfg = written["cfg"]
    live_cfg = {
        **cfg,
        "loss": {"kd": {"top_k": 16, "top_k_rest": True, "top_k_support": "teacher", "divergence": divergence}},
    }
    live, _ = _eval(live_cfg, tmp_path / "live")
    gaps = {}
    for bits in ("b5", "b8"):
        cached_cfg = {**cfg, "teacher": {"cache": str(written[bits])}, "loss": {"kd": {"divergence": divergence}}}
        cached, session = _eval(cached_cfg, tmp_path / bits)
        assert not session.teacher.capabilities().model_in_job  # no teacher model was loaded
        assert cached.losses["lm"] == live.losses["lm"]  # the student's side is the same computation
        gaps[bits] = abs(cached.losses["kd"] - live.losses["kd"]) / live.losses["kd"]
    # the manifest's measured quantisation overhead (KL to the full teacher) bounds the KD difference
    overhead = json.loads((written["b5"] / "manifest.json").read_text())["fidelity"]["quantisation_overhead"]
    assert gaps["b5"] < max(0.02, 2 * overhead) and gaps["b8"] < gaps["b5"] and gaps["b8"] < 2e-3, gaps


def test_the_manifest_and_fidelity_figures(written):
    m = json.loads((written["b5"] / "manifest.json").read_text())
    assert m["k"] == 16 and m["level_bits"] == 5 and m["tokens"] > 0
    assert m["bytes_per_token"] < 0.25 * m["plain_bytes_per_token"]
    f = m["fidelity"]
    assert f["positions"] > 0 and f["kl_top_k_exact"] > 0 and 0 <= f["quantisation_overhead"] < 0.05
    m8 = json.loads((written["b8"] / "manifest.json").read_text())
    assert m8["fidelity"]["quantisation_overhead"] < f["quantisation_overhead"] and m8["bytes_per_token"] > m["bytes_per_token"]


def test_training_from_the_cache(written, tmp_path):
    cfg = {
        **written["cfg"],
        "teacher": {"cache": str(written["b5"])},
        "output": {"run_dir": str(tmp_path / "run"), "log_every": 1},
    }
    cfg["eval"] = {"every": 2, "max_batches": 2, "at_start": True}
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
        s.fit()
        assert not s.teacher.capabilities().model_in_job
        # step 1's rows were decoded on the read-ahead thread while step 0 ran
        assert s.teacher.taken_ahead >= 1
    recs = [parse_line(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert [t.step for t in trains] == [0, 1] and all(t.losses["kd"] > 0 for t in trains)
    # the share of each step its training thread spent getting the cache's rows is recorded
    assert all(t.teacher_wait is not None and 0 <= t.teacher_wait < 1 for t in trains)
    start = next(r for r in recs if isinstance(r, RunStart))
    assert start.kd == {"divergence": "forward_kl", "t2_scaled": True, "top_k_support": "teacher"}
    evals = [r for r in recs if r.kind == "eval"]
    assert evals and all(0 < e.teacher_ppl_exact_share < 1 for e in evals)  # an estimate, and said to be one
    assert any(isinstance(r, AlertRecord) and r.code == "teacher_ppl_from_cache" for r in recs)


def test_a_mismatched_cache_is_refused_in_one_line(written, make_config, chat_config, tmp_path, assets):
    cache = str(written["b5"])
    base = {**written["cfg"], "teacher": {"cache": cache}}
    other = tmp_path / "other.jsonl"
    lines = Path(assets["corpus"]).read_text().splitlines()
    other.write_text("\n".join(reversed(lines)) + "\n")
    for change, expected in (
        ({"train": {**base["train"], "seq_len": 16}}, f"teacher.cache: '{cache}' is of other seq_len (cache: 32; this run: 16)"),
        ({"data": {**base["data"], "path": str(other)}}, f"teacher.cache: '{cache}' is of other training data (cache: "),
        (
            {"curriculum": {"weights": {"kd": 1.0, "feature": 0.1}}},
            "teacher.cache: feature need the teacher's hidden states or attention, which a cache does not hold; "
            "train with --set curriculum.weights='{kd: 1.0}'",
        ),
        ({"loss": {"kd": {"top_k": 8}}}, "loss.kd.top_k: a cache sets k (16, with a rest bucket)"),
        (
            {"curriculum": {"weights": {"kd": 1.0}, "temperature": 2.0}},
            f"curriculum.temperature: this run uses T = 2, but the teacher cache '{cache}' holds exact tails for T in {{1}} only",
        ),
    ):
        with pytest.raises(DistillError) as err:
            preflight(validate({**base, **change}), world=1)
        assert str(err.value).startswith(expected) and "\n" not in str(err.value), str(err.value)
    chat = {**chat_config(), "teacher": {"cache": cache}}
    with pytest.raises(DistillError, match=rf"^teacher.cache: '{cache}' was written with another tokenizer"):
        preflight(validate(chat), world=1)
    with pytest.raises(DistillError, match=rf"^teacher.cache: '{tmp_path}' has no teacher/config.json"):
        preflight(validate({**base, "teacher": {"cache": str(tmp_path)}}), world=1)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "skew_rkl"])
def test_cache_at_temperature_two_equals_live_top_k_and_rest(written, tmp_path, divergence):
    """The audit found KD from the cache 6.8% low at T = 2 (the tail spread evenly). With the tail statistic
    stored for each scheduled temperature, it equals live top-k + rest within the codec's error."""
    cfg = {**written["cfg"], "curriculum": {"weights": {"kd": 1.0, "lm": 0.5}, "temperature": 2.0}}
    out = written["b8"].parent / "t2"
    if not (out / "manifest.json").exists():
        _write(cfg, out, level_bits=8)
    assert json.loads((out / "manifest.json").read_text())["tail_temperatures"] == [2.0]
    loss = {"kd": {"top_k": 16, "top_k_rest": True, "top_k_support": "teacher", "divergence": divergence}}
    live, _ = _eval({**cfg, "loss": loss}, tmp_path / "live")
    cached, _ = _eval({**cfg, "teacher": {"cache": str(out)}, "loss": {"kd": {"divergence": divergence}}}, tmp_path / "cached")
    assert abs(cached.losses["kd"] - live.losses["kd"]) / live.losses["kd"] < 0.005, (cached.losses, live.losses)


def test_a_ramped_temperature_with_many_values_is_refused_by_the_writer(written, tmp_path):
    ramp = {"kind": "linear", "start": 0.0, "end": 1.0, "start_value": 3.0, "end_value": 1.0}
    cfg = {
        **written["cfg"],
        "train": {**written["cfg"]["train"], "max_steps": 40},
        "curriculum": {"weights": {"kd": 1.0}, "temperature": ramp},
    }
    with pytest.raises(
        DistillError, match=r"^curriculum.temperature: this schedule takes more than 16 distinct values over 40 steps"
    ):
        _write(cfg, tmp_path / "ramp")


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_write_killed_midway_resumes_to_the_same_bytes(written, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(written["cfg"]))
    out = tmp_path / "cache"
    argv = [
        sys.executable,
        "-m",
        "dsdistill",
        "teacher-cache",
        "--config",
        str(cfg_path),
        "--out",
        str(out),
        "--top-k",
        "16",
        "--shard-rows",
        "4",
    ]
    env = without_world_env(dict(os.environ, DS_ACCELERATOR="cpu"))  # a fresh process, not a rank of this one
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=env)
    deadline = time.monotonic() + 120
    while len(list((out / "train").glob("*.bin"))) < 5:  # some shards whole, the next one in flight
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # a preemption without warning
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = proc.returncode
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr
    assert "shards were already written and kept" in again.stdout, (done, again.stdout)
    reference = tmp_path / "reference"
    _write(written["cfg"], reference, shard_rows=4)
    assert _digest(out) == _digest(reference)


@pytest.mark.slow
def test_two_ranks_write_the_bytes_one_rank_writes(written, tmp_path):
    from dsdistill.demo import launcher_command, launcher_env
    from dsdistill.dist import free_port

    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(written["cfg"]))
    cmd = launcher_command(ROOT / "dsdistill" / "train.py", cfg_path, nprocs=2, master_port=free_port())
    cmd += ["--teacher-cache", str(tmp_path / "two"), "--top-k", "16", "--shard-rows", "16"]
    proc = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _digest(written["b5"])
    two = _digest(tmp_path / "two")
    assert set(one) == set(two) and one == two
    assert math.isfinite(float(json.loads((tmp_path / "two" / "manifest.json").read_text())["bytes_per_token"]))


def test_launch_sh_launches_a_cache_write_like_training(written, tmp_path):
    """The writer's arguments pass through launch.sh: its preflight accepts them, every node's command has them."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(written["cfg"]))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    env = without_world_env(dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu"))
    proc = subprocess.run(
        ["bash", str(ROOT / "launch.sh"), "--config", str(cfg_path), "--hostfile", str(hostfile), "--dry-run", "--",
         "--teacher-cache", str(tmp_path / "cache"), "--top-k", "32"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert len(nodes) == 2 and all(line.endswith(f"--teacher-cache {tmp_path / 'cache'} --top-k 32") for line in nodes), nodes


@pytest.mark.parametrize("k", [16, 48])
def test_auto_level_bits_keep_the_quantisation_under_five_percent_of_the_truncation(written, tmp_path, k):
    """`--level-bits auto` (the default) measures the first rows; also where k nears the vocabulary (77 here)
    and truncation loses almost nothing, which 5 fixed bits cannot match."""
    m = _write(written["cfg"], tmp_path / "auto", top_k=k, level_bits=None)
    assert 4 <= m["level_bits"] <= 10 and m["fidelity"]["quantisation_overhead"] < 0.05, m["fidelity"]


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("manifest_no_data", "has no valid 'data' (a damaged manifest)"),
        ("manifest_no_k", "has no valid 'k' (a damaged manifest)"),
        ("manifest_not_object", "is not a JSON object (a damaged manifest)"),
        ("no_ranks", "ranks.bin' cannot be read"),
        ("short_ranks", "ranks.bin' is not a ranking of"),
        ("flipped_shard", "does not match the checksum in the manifest (damaged)"),
    ],
)
def test_a_damaged_cache_is_refused_in_one_line_before_training(written, tmp_path, damage, expected):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(written["b5"], cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    if damage.startswith("manifest"):
        if damage == "manifest_no_data":
            del manifest["data"]
        elif damage == "manifest_no_k":
            del manifest["k"]
        (cache / "manifest.json").write_text(json.dumps(manifest if damage != "manifest_not_object" else [1, 2]))
    elif damage == "no_ranks":
        (cache / "ranks.bin").unlink()
    elif damage == "short_ranks":
        (cache / "ranks.bin").write_bytes((cache / "ranks.bin").read_bytes()[:-8])
    else:
        shard = cache / "train" / "00000.bin"
        data = bytearray(shard.read_bytes())
        data[-40:-8] = bytes(b ^ 0x5A for b in data[-40:-8])  # inside the payload: the header still parses
        shard.write_bytes(bytes(data))
    cfg = {**written["cfg"], "teacher": {"cache": str(cache)}, "output": {"run_dir": str(tmp_path / "run"), "log_every": 1}}
    with pytest.raises(DistillError) as e:
        with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as s:
            s.fit()
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
